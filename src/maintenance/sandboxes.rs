//! The orphan reapers. Worktrees of jobs that are finished or whose lease
//! nobody holds are removed (with their branch in the mirror). And the
//! orphan-sandbox reaper removes containers (with our labels, and only
//! those) whose job is finished, or whose attempt no worker holds a live
//! lease on any longer, or that outlived their expiry; records each removal
//! in the job's events. Runs at worker start and then periodically.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use super::Maintenance;
use super::MaintenanceError;
use crate::job::Status;
use crate::sandbox::Labelled;

/// Grace given to an orphan's processes before SIGKILL.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OrphanReport {
    /// Containers of ours that were looked at.
    pub seen: usize,
    /// Names of the containers removed.
    pub removed: Vec<String>,
}

impl Maintenance {
    /// Worktrees of jobs that are finished, or whose lease nobody holds.
    pub async fn reap_worktrees_once(&self) -> Result<Vec<String>, MaintenanceError> {
        let Some(git) = self.git.clone() else {
            tracing::debug!("no git stage: no worktrees to reap");
            return Ok(Vec::new());
        };
        let lister = git.clone();
        let names = tokio::task::spawn_blocking(move || lister.worktree_names()).await??;
        tracing::debug!(worktrees = names.len(), "looking for orphaned worktrees");
        let ids: Vec<crate::job::JobId> = names.iter().filter_map(|n| n.parse().ok()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let holders: HashMap<_, _> = self
            .store
            .lease_holders(&ids)
            .await?
            .into_iter()
            .map(|h| (h.id, h))
            .collect();
        let mut removed = Vec::new();
        for id in ids {
            let orphan = match holders.get(&id) {
                None => true,
                Some(h) => h.status.is_terminal() || !h.lease_live,
            };
            if !orphan {
                continue;
            }
            let (stage, name) = (git.clone(), id.to_string());
            let result = tokio::task::spawn_blocking(move || stage.remove_orphan(&name)).await?;
            if let Err(err) = result {
                tracing::warn!(job.id = %id, error = %err, "could not remove an orphaned worktree");
                continue;
            }
            tracing::warn!(job.id = %id, "orphaned worktree removed");
            self.store
                .record_event(
                    id,
                    "worktree_removed",
                    &self.actor,
                    json!({ "reason": "no live lease" }),
                )
                .await?;
            removed.push(id.to_string());
        }
        Ok(removed)
    }

    pub async fn reap_sandboxes_once(&self) -> Result<OrphanReport, MaintenanceError> {
        let Some(host) = &self.sandboxes else {
            return Ok(OrphanReport::default());
        };
        let Ok(runtime) = host.runtime().await else {
            return Ok(OrphanReport::default());
        };
        // Only this host's: another host's containers mount worktrees on
        // its disk, and its own live workers reap them.
        let ours: Vec<Labelled> = runtime
            .list_ours(&host.deployment)
            .await?
            .into_iter()
            .filter(|c| c.host.as_ref().is_none_or(|h| *h == host.host_name))
            .collect();
        let mut report = OrphanReport {
            seen: ours.len(),
            ..OrphanReport::default()
        };
        if ours.is_empty() {
            return Ok(report);
        }
        let ids: Vec<_> = ours.iter().filter_map(|c| c.job_id).collect();
        let owners: HashMap<_, _> = self
            .store
            .lease_holders(&ids)
            .await?
            .into_iter()
            .map(|h| (h.id, h))
            .collect();
        let now = chrono::Utc::now();
        for container in ours {
            let reason = match container.job_id.and_then(|id| owners.get(&id)) {
                None => Some("its job does not exist"),
                Some(h) if h.status.is_terminal() => Some("its job is finished"),
                Some(h) if h.status != Status::Running || !h.lease_live => {
                    Some("no worker holds the job's lease")
                }
                Some(h)
                    if Some(h.attempt) != container.attempt
                        || h.worker_id.as_deref() != container.worker_id.as_deref() =>
                {
                    Some("it belongs to an earlier attempt")
                }
                Some(_) if container.expires_at.is_some_and(|t| t < now) => {
                    Some("it outlived its expiry")
                }
                Some(_) => None,
            };
            let Some(reason) = reason else { continue };
            remove(self, runtime, &container, reason).await?;
            report.removed.push(container.name);
        }
        Ok(report)
    }
}

async fn remove(
    m: &Maintenance,
    runtime: &crate::sandbox::Runtime,
    c: &Labelled,
    reason: &str,
) -> Result<(), MaintenanceError> {
    runtime.remove(&c.id, ORPHAN_GRACE).await?;
    tracing::warn!(container = %c.name, job.id = ?c.job_id, reason, "orphaned sandbox removed");
    if let Some(job) = c.job_id {
        let data = json!({ "container": c.name, "attempt": c.attempt, "worker_id": c.worker_id, "reason": reason });
        m.store
            .record_event(job, "sandbox_removed", &m.actor, data)
            .await?;
    }
    Ok(())
}
