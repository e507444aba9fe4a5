//! The reconciler: rebuilds Valkey's index from Postgres. Queued and
//! scheduled jobs missing from Valkey are indexed again (ids already there
//! are left alone), so a flushed or restarted Valkey loses no job. Running
//! jobs need no index entry to be safe: expired leases are found in
//! Postgres by the same pass.

use std::collections::HashMap;

use super::MaintenanceError;
use super::{Maintenance, RECONCILE_PAGE};
use crate::job::{JobId, QueueName, Status};
use crate::metrics as m;
use crate::queue::{IndexEntry, KillSwitchState};
use crate::store::ControlKind;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileCounts {
    /// Whether a full pass ran.
    pub rebuilt: bool,
    /// Unfinished jobs read from Postgres.
    pub scanned: usize,
    /// Ids Valkey was missing and now has.
    pub reindexed: u64,
    /// Expired leases found in Postgres and ended.
    pub reaped: usize,
}

impl Maintenance {
    /// A full pass when `full` is set or when Valkey lost the rebuild
    /// sentinel (it was flushed or restarted empty); otherwise only the check.
    pub async fn reconcile_once(&self, full: bool) -> Result<ReconcileCounts, MaintenanceError> {
        let lost = !self.valkey.epoch_present().await?;
        if !full && !lost {
            return Ok(ReconcileCounts::default());
        }
        if lost {
            tracing::warn!("Valkey index sentinel missing (flushed or restarted empty); rebuilding from Postgres");
            self.restore_kill_switch().await?;
        }
        // Set first: a flush during the pass removes it again and triggers
        // another pass, rather than being hidden by this one.
        self.valkey
            .set_epoch(&format!(
                "{} {}",
                self.actor,
                chrono::Utc::now().to_rfc3339()
            ))
            .await?;
        let mut counts = ReconcileCounts {
            rebuilt: true,
            ..ReconcileCounts::default()
        };
        // After a loss, running jobs with a concurrency key go back first,
        // before any waiting job of their key can be indexed (and claimed)
        // again. (Only then: a job that finished since this read would hold
        // its key until its old lease ran out.)
        if lost {
            self.restore_running_keys().await?;
        }
        let mut after = None;
        loop {
            let page = self
                .store
                .unfinished_jobs_page(after, RECONCILE_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            counts.scanned += page.len();
            let mut by_queue: HashMap<&QueueName, Vec<JobId>> = HashMap::new();
            for job in &page {
                // A queue whose jobs all run is known too (kill-all asks
                // for the running jobs of the known queues).
                let ids = by_queue.entry(&job.queue).or_default();
                if matches!(job.status, Status::Queued | Status::Scheduled) {
                    ids.push(job.id);
                }
            }
            for (queue, ids) in by_queue {
                self.valkey.register_queues(&[queue]).await?;
                if !ids.is_empty() {
                    counts.reindexed += self.reindex_missing(queue, &ids).await?;
                }
            }
            if page.len() < RECONCILE_PAGE as usize {
                break;
            }
        }
        // Running jobs need no index entry: leases that expired while the
        // index had lost them are found here.
        counts.reaped = self.reap_lost_once().await?;
        self.observe(counts);
        if counts.reindexed > 0 {
            tracing::warn!(
                reindexed = counts.reindexed,
                "reconciler re-indexed jobs missing from Valkey"
            );
            metrics::counter!(m::RECONCILER_REINDEXED).increment(counts.reindexed);
        }
        Ok(counts)
    }

    /// Valkey lost its data, the kill switch with it: if Postgres' trail
    /// ends with a kill-all, the switch is engaged again as it was. (Only
    /// then: while Valkey has its data, its switch is newer than Postgres',
    /// whose record of a resume may still wait in the outbox.)
    async fn restore_kill_switch(&self) -> Result<(), MaintenanceError> {
        let Some(last) = self.store.latest_control_event().await? else {
            return Ok(());
        };
        if last.kind != ControlKind::KillAll.as_str() {
            return Ok(());
        }
        // A repeated kill-all names the engagement it repeated: restore that.
        let first = match last.data["engagement"]
            .as_str()
            .and_then(|s| s.parse().ok())
        {
            Some(id) if id != last.id => self.store.control_event(id).await?,
            _ => None,
        };
        let row = first.unwrap_or(last);
        let state = KillSwitchState {
            id: row.id,
            actor: row.actor,
            reason: row.reason,
            since: row.at,
        };
        self.valkey.engage_kill_switch(&state).await?;
        tracing::warn!(actor = %state.actor, reason = %state.reason, "kill switch engaged again from Postgres' trail after Valkey lost it");
        Ok(())
    }

    /// Puts running jobs with a concurrency key back in their key's running
    /// set (and the active set, where their heartbeat has not yet).
    async fn restore_running_keys(&self) -> Result<(), MaintenanceError> {
        let running = self.store.running_keyed_jobs().await?;
        let mut by_queue: HashMap<&QueueName, Vec<(JobId, i64, u32, &str)>> = HashMap::new();
        for job in &running {
            let (Some((key, limit)), Some(deadline)) = (&job.concurrency, job.lease_expires_at)
            else {
                continue;
            };
            by_queue.entry(&job.queue).or_default().push((
                job.id,
                deadline.timestamp_millis(),
                *limit,
                key.as_str(),
            ));
        }
        for (queue, entries) in by_queue {
            self.valkey.restore_running(queue, &entries).await?;
        }
        Ok(())
    }

    /// Indexes those of `ids` that Valkey lacks, after reading them again
    /// from Postgres: the page they came from may be stale by now (a job
    /// claimed and finished meanwhile must not be indexed again).
    async fn reindex_missing(
        &self,
        queue: &QueueName,
        ids: &[JobId],
    ) -> Result<u64, MaintenanceError> {
        let missing = self.valkey.missing(queue, ids).await?;
        if missing.is_empty() {
            return Ok(0);
        }
        let states: Vec<_> = self
            .store
            .index_states(&missing)
            .await?
            .into_iter()
            .filter(|s| s.queue == queue.as_str())
            .collect();
        let keys: Vec<(JobId, u32, &str)> = states
            .iter()
            .filter(|s| matches!(s.status, Status::Queued | Status::Scheduled))
            .filter_map(|s| s.concurrency.as_ref().map(|(k, l)| (s.id, *l, k.as_str())))
            .collect();
        self.valkey.set_concurrency(queue, &keys).await?;
        let entries: Vec<IndexEntry> = states
            .iter()
            .filter_map(|s| {
                let due_ms = match s.status {
                    Status::Queued => None,
                    Status::Scheduled => Some(s.run_at.timestamp_millis()),
                    _ => return None,
                };
                Some(IndexEntry {
                    id: s.id,
                    priority: s.priority,
                    due_ms,
                })
            })
            .collect();
        Ok(self.valkey.enqueue(queue, &entries).await?)
    }
}
