//! The orphan-sandbox reaper: removes containers (with our labels, and only
//! those) whose job is finished, or whose attempt no worker holds a live
//! lease on any longer, or that outlived their expiry; records each removal
//! in the job's events. Runs at worker start and then periodically.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use super::Maintenance;
use crate::job::Status;
use crate::pool::PoolError;
use crate::sandbox::{Labelled, SandboxError};

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
    pub async fn reap_sandboxes_once(&self) -> Result<OrphanReport, PoolError> {
        let Some(host) = &self.sandboxes else {
            return Ok(OrphanReport::default());
        };
        let Ok(runtime) = host.runtime().await else {
            return Ok(OrphanReport::default());
        };
        let ours = runtime
            .list_ours(&host.deployment)
            .await
            .map_err(sandbox_err)?;
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
) -> Result<(), PoolError> {
    runtime
        .remove(&c.id, ORPHAN_GRACE)
        .await
        .map_err(sandbox_err)?;
    tracing::warn!(container = %c.name, job.id = ?c.job_id, reason, "orphaned sandbox removed");
    if let Some(job) = c.job_id {
        let data = json!({ "container": c.name, "attempt": c.attempt, "worker_id": c.worker_id, "reason": reason });
        m.store
            .record_event(job, "sandbox_removed", &m.actor, data)
            .await?;
    }
    Ok(())
}

fn sandbox_err(e: SandboxError) -> PoolError {
    PoolError::Sandbox(e.to_string())
}
