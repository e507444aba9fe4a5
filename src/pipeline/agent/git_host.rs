//! What the git stage needs, as the agent kinds hold it.

use super::lifecycle::NoChanges;
use crate::git::names::RepoPolicy;
use crate::git::repo::GitStage;

/// What the git stage needs: the stage itself and the repository policy.
#[derive(Clone)]
pub struct GitHost {
    pub stage: GitStage,
    pub policy: RepoPolicy,
    pub no_changes: NoChanges,
    /// Skip every job's quality gates (`git.yolo`): loudly, in each trail.
    pub yolo: bool,
    /// Where `http` gates send the change, and how they sign it.
    pub coordinator: Option<crate::pipeline::gates::Coordinator>,
}
