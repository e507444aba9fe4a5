//! Agent kinds: a job kind that runs in a sandbox, defined by its
//! `worker.toml`, split by concern: the payload (`payload`), the admission
//! policy (`admission`), where sandboxes run (`host`), running them
//! (`run`), what the git stage needs (`git_host`) and the lifecycle of a
//! job on a repository (`lifecycle`: spawn → git → gates → complete).

mod admission;
mod git_host;
mod host;
mod lifecycle;
mod payload;
mod run;

use std::sync::Arc;

use serde_json::Value;

use self::payload::parse_payload;
use self::run::{outcome_result, run_sandbox};
use crate::job::PayloadError;
use crate::pipeline::kinds::KindDef;
use crate::pipeline::{Handler, HandlerFuture, JobContext, JobError};

pub use admission::{AdmissionSettings, RateSetting};
pub use git_host::GitHost;
pub use host::{HostOptions, SandboxHost};
pub use lifecycle::NoChanges;

/// The handler of one agent kind: validates its payloads at enqueue and
/// runs its jobs (with a repository, through the lifecycle).
pub struct SandboxKind {
    def: Arc<KindDef>,
    host: SandboxHost,
    git: Option<GitHost>,
    admission: Arc<AdmissionSettings>,
}

impl SandboxKind {
    pub fn new(
        def: KindDef,
        host: SandboxHost,
        git: Option<GitHost>,
        admission: Arc<AdmissionSettings>,
    ) -> Self {
        SandboxKind {
            def: Arc::new(def),
            host,
            git,
            admission,
        }
    }
}

impl Handler for SandboxKind {
    fn validate(&self, payload: &Value) -> Result<(), PayloadError> {
        let p = parse_payload(payload, self.git.as_ref(), &self.admission)?;
        // At enqueue the host is resolved too (and again before every
        // fetch and push, since DNS may change in between). getaddrinfo
        // blocks, but only for a name outside /etc/hosts and the cache.
        if let (Some(repo), Some(git)) = (&p.repo, &self.git) {
            git.policy
                .check_now(repo)
                .map_err(|e| format!("payload.repo: {e}"))?;
        }
        if p.gates.is_some() && p.repo.is_none() {
            return Err(
                "payload.gates needs payload.repo: gates check the committed change".into(),
            );
        }
        self.def
            .gates
            .select(p.gates.as_ref())
            .map(drop)
            .map_err(PayloadError::Invalid)
    }

    /// A job on a repository defaults to one key per repository and the
    /// branch it pushes to (its own `branch`, else its `base`, else the
    /// remote's default), so two agents never push to one branch at once.
    fn concurrency(&self, payload: &Value) -> super::KindConcurrency {
        let text = |field: &str| payload.get(field).and_then(Value::as_str);
        super::KindConcurrency {
            default_key: text("repo").map(|repo| {
                let branch = text("branch").or(text("base")).unwrap_or("HEAD");
                let key = format!("{repo}#{branch}");
                // A key must fit its column; a longer one stands for itself
                // by its digest.
                if key.len() > crate::job::MAX_CONCURRENCY_KEY_LEN {
                    format!("sha256:{}", crate::digest::sha256_hex(key.as_bytes()))
                } else {
                    key
                }
            }),
            max_per_key: self.def.max_per_key,
        }
    }

    fn privileges(&self, payload: &Value) -> super::Privileges {
        let mut p = super::Privileges::default();
        if payload.get("yolo") == Some(&Value::Bool(true)) {
            p.yolo = true;
            p.needs_admin.push((
                "payload.yolo".into(),
                "payload.yolo skips the quality gates".into(),
            ));
        }
        if payload.get("allow_existing_branch") == Some(&Value::Bool(true))
            && !self.def.allow_existing_branch
        {
            p.needs_admin.push((
                "payload.allow_existing_branch".into(),
                "payload.allow_existing_branch pushes to a branch that exists on the remote".into(),
            ));
        }
        // Gates run only on a repository's change.
        if payload.get("repo").is_some() && !p.yolo {
            if let Ok(selected) = self.def.gates.select(payload.get("gates")) {
                let dropped = self.def.gates.dropped(&selected);
                if !dropped.is_empty() {
                    p.yolo = true;
                    p.needs_admin.push((
                        "payload.gates".into(),
                        format!(
                            "payload.gates leaves out the required gates {} (that is YOLO)",
                            dropped.join(", ")
                        ),
                    ));
                }
            }
        }
        p
    }

    fn run(&self, ctx: JobContext) -> HandlerFuture {
        let def = self.def.clone();
        let host = self.host.clone();
        let git = self.git.clone();
        let admission = self.admission.clone();
        Box::pin(async move {
            let payload = parse_payload(&ctx.job.payload, git.as_ref(), &admission)
                .map_err(|e| JobError::Fatal(e.to_string()))?;
            match (&payload.repo, &git) {
                (Some(_), Some(git)) => lifecycle::run(&def, &host, git, &payload, ctx).await,
                _ => {
                    // No repository: the agent's sandbox is the one stage.
                    if let Err(err) = ctx.set_stage("spawn").await {
                        tracing::warn!(job.id = %ctx.job.id, error = %err, "could not record the stage");
                    }
                    let (finished, log, runtime) =
                        run_sandbox(&def, &host, &ctx, payload.text(), None).await?;
                    outcome_result(&def, finished, log, runtime)
                }
            }
        })
    }
}
