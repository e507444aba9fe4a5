//! The reaper: leases whose deadline passed are ended in Postgres (counted as
//! a failed attempt: retried after backoff, or dead-lettered), then the index
//! follows. Two sources: Valkey's active set (every `reap_interval`, primary
//! key lookups) and a scan of Postgres (every `lease_scan_interval` and in
//! every full reconcile: leases the index lost).

use std::collections::{HashMap, HashSet};

use super::{repair, MaintenanceError};
use super::{Maintenance, REAP_LIMIT};
use crate::job::{JobId, QueueName, Status};
use crate::metrics as m;
use crate::queue::IndexEntry;
use crate::store::Reaped;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReapCounts {
    /// Leases ended in Postgres.
    pub reaped: usize,
    /// Expired Valkey entries that Postgres did not reap (repaired instead).
    pub repaired: usize,
}

impl Maintenance {
    pub async fn reap_once(&self) -> Result<ReapCounts, MaintenanceError> {
        let mut counts = ReapCounts::default();
        for queue in &self.queues {
            let ids = self
                .valkey
                .reap(queue, REAP_LIMIT as usize, self.cfg.reap_hold)
                .await?;
            if ids.is_empty() {
                continue;
            }
            let reaped = self.reap_ids(&ids).await?;
            let rest: Vec<JobId> = ids
                .iter()
                .copied()
                .filter(|id| !reaped.iter().any(|r| r.id == *id))
                .collect();
            counts.reaped += reaped.len();
            counts.repaired += rest.len();
            self.apply(reaped).await?;
            if !rest.is_empty() {
                repair::resolve(&self.store, &self.valkey, queue, &rest).await?;
            }
        }
        Ok(counts)
    }

    /// Expired leases Valkey no longer knows about (it was flushed while the
    /// jobs ran and their workers died): a scan of unfinished jobs in
    /// Postgres, run at a slower pace than [`Maintenance::reap_once`].
    pub async fn reap_lost_once(&self) -> Result<usize, MaintenanceError> {
        let mut total = 0;
        loop {
            let ids = self.store.expired_leases(REAP_LIMIT).await?;
            let reaped = self.reap_ids(&ids).await?;
            let n = reaped.len();
            total += n;
            self.apply(reaped).await?;
            // Done, or nothing could be reaped now (rows locked by another
            // replica, cancel requests unreadable): try again next period.
            if ids.len() < REAP_LIMIT as usize || n == 0 {
                return Ok(total);
            }
        }
    }

    /// Ends the expired leases among `ids` in Postgres. A job with a cancel
    /// request ends `cancelled` (its worker died while stopping it); the
    /// others are retried or dead-lettered.
    async fn reap_ids(&self, ids: &[JobId]) -> Result<Vec<Reaped>, MaintenanceError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cancels = |locked: Vec<JobId>| async move {
            match self.valkey.cancel_requests(&locked).await {
                Ok(found) => Some(found.into_iter().map(|c| (c.id, c)).collect()),
                Err(err) => {
                    // Without them a cancelled job could be retried: wait.
                    tracing::warn!(error = %err, "cannot read cancel requests; reaping later");
                    None
                }
            }
        };
        Ok(self
            .store
            .reap_expired(Some(ids), REAP_LIMIT, &self.actor, cancels)
            .await?)
    }

    async fn apply(&self, reaped: Vec<Reaped>) -> Result<(), MaintenanceError> {
        let mut acks: HashMap<QueueName, Vec<JobId>> = HashMap::new();
        let mut back: HashMap<QueueName, Vec<IndexEntry>> = HashMap::new();
        let mut cancelled = Vec::new();
        for r in reaped {
            let queue = r.queue.clone();
            tracing::warn!(job.id = %r.id, queue = %queue, to = %r.to, "lease expired; job reaped");
            metrics::counter!(m::LEASE_EXPIRATIONS, "queue" => queue.to_string()).increment(1);
            match r.to {
                Status::Dead => {
                    metrics::counter!(m::JOBS_DEAD, "queue" => queue.to_string()).increment(1);
                    acks.entry(queue).or_default().push(r.id);
                }
                Status::Cancelled => {
                    m::count_cancel(queue.as_str(), r.stage.as_deref().unwrap_or("running"));
                    cancelled.push((r.id, queue.clone(), r.cancel_requested_ms));
                    acks.entry(queue).or_default().push(r.id);
                }
                _ => {
                    metrics::counter!(m::JOB_RETRIES, "queue" => queue.to_string()).increment(1);
                    back.entry(queue).or_default().push(IndexEntry {
                        id: r.id,
                        priority: r.priority,
                        due_ms: r.run_at.map(|t| t.timestamp_millis()),
                    });
                }
            }
        }
        for (queue, ids) in acks {
            self.valkey.ack(&queue, &ids).await?;
        }
        for (queue, entries) in back {
            self.valkey.schedule(&queue, &entries).await?;
        }
        if !cancelled.is_empty() {
            self.finish_cancels(&cancelled).await?;
        }
        Ok(())
    }

    /// The cleanup a dead worker did not do: the jobs are finished now, so
    /// the orphan reapers remove their sandboxes and worktrees (on this
    /// host: those on the dead worker's host go when that host's reapers
    /// run). A stop is confirmed only when nothing of the job is left on
    /// this host, and only if this host can look.
    async fn finish_cancels(
        &self,
        cancelled: &[(JobId, QueueName, Option<i64>)],
    ) -> Result<(), MaintenanceError> {
        let ids: Vec<JobId> = cancelled.iter().map(|(id, _, _)| *id).collect();
        let sandboxes = self.reap_sandboxes_once().await;
        let worktrees = self.reap_worktrees_once().await;
        for (what, result) in [
            ("sandboxes", sandboxes.map(drop)),
            ("worktrees", worktrees.map(drop)),
        ] {
            if let Err(err) = result {
                tracing::warn!(error = %err, what, "cleanup after reaped cancels failed; the orphan reapers will retry");
            }
        }
        let containers: HashSet<JobId> = match &self.sandboxes {
            Some(host) => match host.runtime().await {
                Ok(rt) => rt
                    .list_ours(&host.deployment)
                    .await?
                    .into_iter()
                    .filter_map(|c| c.job_id)
                    .collect(),
                // Cannot look: confirm nothing (the jobs are cancelled all
                // the same; kill-all reports them unconfirmed).
                Err(err) => {
                    tracing::warn!(error = %err, "no sandbox runtime to check; reaped cancels stay unconfirmed");
                    self.valkey.clear_cancel(&ids).await?;
                    return Ok(());
                }
            },
            None => HashSet::new(),
        };
        for (id, queue, requested_ms) in cancelled {
            let worktree = self
                .git
                .as_ref()
                .is_some_and(|g| g.worktrees_dir().join(id.to_string()).exists());
            if containers.contains(id) || worktree {
                tracing::warn!(job.id = %id, "cancel completed by the reaper; its sandbox or worktree is still here");
                continue;
            }
            self.valkey.confirm_stopped(*id).await?;
            if let Some(ms) = requested_ms {
                m::record_cancel_duration(queue.as_str(), *ms);
            }
            tracing::warn!(job.id = %id, "cancel completed by the reaper");
        }
        self.valkey.clear_cancel(&ids).await?;
        Ok(())
    }
}
