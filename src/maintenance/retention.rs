//! Retention: finished jobs and their trails are deleted once they are old
//! enough, in small batches, by one replica at a time.

use std::time::Duration;

use super::{Maintenance, MaintenanceError};
use crate::job::Status;
use crate::metrics as m;
use crate::store::{Store, StoreError};

/// How long finished jobs are kept, by status (`None`: for ever).
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    pub succeeded: Option<Duration>,
    pub cancelled: Option<Duration>,
    pub dead: Option<Duration>,
    /// Jobs deleted per transaction: small, so no lock is held long.
    pub batch: u32,
    /// Most batches per status in one pass (the next pass goes on).
    pub max_batches: u32,
    /// The pause after each full batch, so pruning a backlog leaves
    /// Postgres to the queue (measured: flat out, it cost a no-op burst on
    /// two cores 20% of its throughput).
    pub batch_pause: Duration,
    pub interval: Duration,
}

/// What one pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneCounts {
    pub jobs: u64,
    pub events: u64,
    /// Another replica was pruning: this one did nothing.
    pub busy: bool,
}

impl Maintenance {
    /// One pass of [`prune`] over this maintenance's store.
    pub async fn prune_once(&self, cfg: &RetentionConfig) -> Result<PruneCounts, MaintenanceError> {
        Ok(prune(&self.store, cfg).await?)
    }
}

/// One pass: for each status with a retention, batches of the oldest
/// finished jobs past it, until a batch comes back short.
pub async fn prune(store: &Store, cfg: &RetentionConfig) -> Result<PruneCounts, StoreError> {
    let mut counts = PruneCounts::default();
    for (status, keep) in [
        (Status::Succeeded, cfg.succeeded),
        (Status::Cancelled, cfg.cancelled),
        (Status::Dead, cfg.dead),
    ] {
        let Some(keep) = keep else { continue };
        for _ in 0..cfg.max_batches {
            let Some((jobs, events)) = store.prune_finished(status, keep, cfg.batch).await? else {
                counts.busy = true;
                return Ok(counts);
            };
            counts.jobs += jobs;
            counts.events += events;
            if jobs > 0 {
                metrics::counter!(m::RETENTION_PRUNED, "table" => "jobs", "status" => status.as_str()).increment(jobs);
                metrics::counter!(m::RETENTION_PRUNED, "table" => "job_events", "status" => status.as_str()).increment(events);
            }
            if jobs < u64::from(cfg.batch) {
                break;
            }
            tokio::time::sleep(cfg.batch_pause).await;
        }
    }
    if counts.jobs > 0 {
        tracing::info!(
            jobs = counts.jobs,
            events = counts.events,
            "retention pruned finished jobs"
        );
    }
    Ok(counts)
}
