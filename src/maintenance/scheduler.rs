//! The scheduler: every replica looks for due schedules; Postgres' row
//! locks decide which replica enqueues a tick, and a unique index makes a
//! second job for a tick impossible (see `Store::run_due_schedules`). The
//! jobs are indexed in Valkey after the commit, as every enqueue is; should
//! that fail, the reconciler indexes them.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Maintenance, MaintenanceError};
use crate::job::{NewJob, Schedule};
use crate::metrics as m;

/// Makes the job of a schedule's tick (the application validates the
/// template against the kinds it knows); `Err` says why it cannot.
pub type JobFactory = Arc<dyn Fn(&Schedule, DateTime<Utc>) -> Result<NewJob, String> + Send + Sync>;

/// Most schedules handled per pass (the rest wait for the next one).
const SCHEDULE_BATCH: i64 = 100;

#[derive(Clone)]
pub struct SchedulerConfig {
    /// How often due schedules are looked for.
    pub interval: Duration,
    /// A tick older than this when seen was missed (see `catch_up`).
    pub grace: chrono::Duration,
    pub make_job: JobFactory,
}

impl std::fmt::Debug for SchedulerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerConfig")
            .field("interval", &self.interval)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Maintenance {
    /// One pass: enqueues the due ticks of up to a batch of schedules and
    /// indexes the jobs. Returns how many jobs it enqueued.
    pub async fn schedule_once(&self, cfg: &SchedulerConfig) -> Result<usize, MaintenanceError> {
        let make_job = cfg.make_job.clone();
        let run = self
            .store
            .run_due_schedules(SCHEDULE_BATCH, cfg.grace, move |s, tick| make_job(s, tick))
            .await?;
        if run.skipped_overlap > 0 {
            metrics::counter!(m::SCHEDULE_TICKS, "outcome" => "skipped_overlap")
                .increment(run.skipped_overlap);
        }
        if run.invalid > 0 {
            metrics::counter!(m::SCHEDULE_TICKS, "outcome" => "invalid").increment(run.invalid);
            tracing::warn!(
                ticks = run.invalid,
                "schedule ticks could not make their job; see the schedules' last_error"
            );
        }
        let n = run.enqueued.len();
        if n == 0 {
            return Ok(0);
        }
        metrics::counter!(m::SCHEDULE_TICKS, "outcome" => "enqueued").increment(n as u64);
        for job in &run.enqueued {
            tracing::info!(job.id = %job.id, schedule.id = ?job.schedule_id, tick = ?job.scheduled_for, "schedule enqueued a job");
        }
        for (queue, jobs, err) in self.valkey.index_jobs(&run.enqueued).await {
            tracing::warn!(queue = %queue, error = %err, jobs, "scheduled jobs stored but not yet indexed; the reconciler will index them");
        }
        Ok(n)
    }
}
