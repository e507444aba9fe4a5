//! Schedules, and the scheduler's tick: enqueue what is due and move the
//! schedule on, in one transaction.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::jobs::insert_jobs_on;
use super::{Store, StoreError};
use crate::job::{
    due_ticks, CronSpec, Job, JobId, JobRequest, NewJob, NewSchedule, Overlap, Schedule, ScheduleId,
};

const SCHEDULE_COLUMNS: &str = "id, name, cron, timezone, job, paused, overlap, catch_up, \
    catch_up_limit, next_tick, last_tick, last_job_id, last_error, version, created_by, \
    created_at, updated_at";

#[derive(sqlx::FromRow)]
struct ScheduleRow {
    id: Uuid,
    name: String,
    cron: String,
    timezone: String,
    job: serde_json::Value,
    paused: bool,
    overlap: String,
    catch_up: String,
    catch_up_limit: i32,
    next_tick: Option<DateTime<Utc>>,
    last_tick: Option<DateTime<Utc>>,
    last_job_id: Option<Uuid>,
    last_error: Option<String>,
    version: i64,
    created_by: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<ScheduleRow> for Schedule {
    type Error = StoreError;

    fn try_from(r: ScheduleRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("schedules.{what} of {}", r.id));
        Ok(Schedule {
            id: ScheduleId(r.id),
            job: serde_json::from_value(r.job.clone()).map_err(|_| corrupt("job"))?,
            overlap: serde_json::from_value(serde_json::Value::String(r.overlap.clone()))
                .map_err(|_| corrupt("overlap"))?,
            catch_up: serde_json::from_value(serde_json::Value::String(r.catch_up.clone()))
                .map_err(|_| corrupt("catch_up"))?,
            catch_up_limit: u32::try_from(r.catch_up_limit)
                .map_err(|_| corrupt("catch_up_limit"))?,
            name: r.name,
            cron: r.cron,
            timezone: r.timezone,
            paused: r.paused,
            next_tick: r.next_tick,
            last_tick: r.last_tick,
            last_job_id: r.last_job_id.map(JobId),
            last_error: r.last_error,
            version: r.version,
            created_by: r.created_by,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// What one scheduler pass did.
#[derive(Debug, Default)]
pub struct TickRun {
    /// The jobs enqueued (committed), to index in Valkey.
    pub enqueued: Vec<Job>,
    /// Ticks skipped because the schedule's last job was unfinished.
    pub skipped_overlap: u64,
    /// Ticks whose job could not be made (its kind is gone, say).
    pub invalid: u64,
}

/// Why a schedule write was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleWriteError {
    #[error("a schedule named {0:?} exists already")]
    NameTaken(String),
    #[error("schedule {0} does not exist")]
    NotFound(ScheduleId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn write_error(err: sqlx::Error, name: &str) -> ScheduleWriteError {
    let taken = err
        .as_database_error()
        .and_then(|d| d.constraint())
        .is_some_and(|c| c == "schedules_name_key");
    if taken {
        ScheduleWriteError::NameTaken(name.to_owned())
    } else {
        ScheduleWriteError::Store(err.into())
    }
}

fn job_json(job: &JobRequest) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(job).map_err(|e| StoreError::Corrupt(format!("schedule job: {e}")))
}

impl Store {
    /// Postgres' clock: the scheduler's, so a schedule written from a host
    /// whose clock is off starts where the scheduler will look.
    async fn db_now(&self) -> Result<DateTime<Utc>, StoreError> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn create_schedule(
        &self,
        new: &NewSchedule,
        actor: &str,
    ) -> Result<Schedule, ScheduleWriteError> {
        let next_tick = new.spec.next_after(self.db_now().await?);
        let sql = format!(
            "INSERT INTO schedules (id, name, cron, timezone, job, paused, overlap, catch_up,
                 catch_up_limit, next_tick, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             RETURNING {SCHEDULE_COLUMNS}"
        );
        let row: ScheduleRow = sqlx::query_as(&sql)
            .bind(ScheduleId::new().0)
            .bind(&new.name)
            .bind(new.spec.expression())
            .bind(new.spec.timezone())
            .bind(job_json(&new.job)?)
            .bind(new.paused)
            .bind(new.overlap.as_str())
            .bind(new.catch_up.as_str())
            .bind(new.catch_up_limit as i32)
            .bind(next_tick)
            .bind(actor)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| write_error(e, &new.name))?;
        Ok(Schedule::try_from(row)?)
    }

    /// Replaces a schedule's fields (a PATCH merged onto it). A new cron
    /// expression or time zone, or a resume, starts from the next tick
    /// after now: what a paused schedule missed is not caught up. So does
    /// any edit of a stopped schedule (`next_tick` null after a tick that
    /// failed for good), since the edit is how its template gets fixed.
    pub async fn update_schedule(
        &self,
        id: ScheduleId,
        new: &NewSchedule,
    ) -> Result<Schedule, ScheduleWriteError> {
        let next_tick = new.spec.next_after(self.db_now().await?);
        let sql = format!(
            "UPDATE schedules SET name = $2, cron = $3, timezone = $4, job = $5, paused = $6,
                 overlap = $7, catch_up = $8, catch_up_limit = $9,
                 next_tick = CASE WHEN cron <> $3 OR timezone <> $4 OR (paused AND NOT $6)
                                       OR next_tick IS NULL
                                  THEN $10 ELSE next_tick END,
                 last_error = CASE WHEN next_tick IS NULL AND $10 IS NOT NULL THEN NULL
                                   ELSE last_error END,
                 version = version + 1, updated_at = now()
             WHERE id = $1
             RETURNING {SCHEDULE_COLUMNS}"
        );
        let row: Option<ScheduleRow> = sqlx::query_as(&sql)
            .bind(id.0)
            .bind(&new.name)
            .bind(new.spec.expression())
            .bind(new.spec.timezone())
            .bind(job_json(&new.job)?)
            .bind(new.paused)
            .bind(new.overlap.as_str())
            .bind(new.catch_up.as_str())
            .bind(new.catch_up_limit as i32)
            .bind(next_tick)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| write_error(e, &new.name))?;
        let row = row.ok_or(ScheduleWriteError::NotFound(id))?;
        Ok(Schedule::try_from(row)?)
    }

    pub async fn schedule(&self, id: ScheduleId) -> Result<Option<Schedule>, StoreError> {
        let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = $1");
        let row: Option<ScheduleRow> = sqlx::query_as(&sql)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        row.map(Schedule::try_from).transpose()
    }

    pub async fn schedules(&self) -> Result<Vec<Schedule>, StoreError> {
        let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name");
        let rows: Vec<ScheduleRow> = sqlx::query_as(&sql).fetch_all(&self.pool).await?;
        rows.into_iter().map(Schedule::try_from).collect()
    }

    /// Deletes a schedule; the jobs it enqueued stay. Returns whether it
    /// existed.
    pub async fn delete_schedule(&self, id: ScheduleId) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM schedules WHERE id = $1")
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// One scheduler pass: up to `batch` due schedules, each in its own
    /// transaction: the schedule is taken `FOR UPDATE SKIP LOCKED` (rows
    /// other replicas hold are skipped), a job is enqueued for each due tick
    /// that `catch_up` and `overlap` let through, and the schedule moves to
    /// its next tick. Time is Postgres' clock, so every replica agrees on
    /// what is due. A replica that dies mid-pass rolls back and another
    /// takes the ticks; the unique index on `(schedule_id, scheduled_for)`
    /// makes a second job for a tick impossible whatever happens. One
    /// transaction per schedule keeps one schedule's failure from holding
    /// back the others, and holds at most one schedule's unique key.
    pub async fn run_due_schedules<F>(
        &self,
        batch: i64,
        grace: chrono::Duration,
        make_job: F,
    ) -> Result<TickRun, StoreError>
    where
        F: Fn(&Schedule, DateTime<Utc>) -> Result<NewJob, String>,
    {
        let mut run = TickRun::default();
        for _ in 0..batch {
            let mut tx = self.pool.begin().await?;
            let sql = format!(
                "SELECT {SCHEDULE_COLUMNS} FROM schedules
                 WHERE NOT paused AND next_tick <= now()
                 ORDER BY next_tick LIMIT 1
                 FOR UPDATE SKIP LOCKED"
            );
            let Some(row) = sqlx::query_as::<_, ScheduleRow>(&sql)
                .fetch_optional(&mut *tx)
                .await?
            else {
                break;
            };
            let id = ScheduleId(row.id);
            let version = row.version;
            let outcome = match Schedule::try_from(row) {
                Ok(schedule) => tick(&mut tx, &schedule, grace, &make_job, &mut run).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => tx.commit().await?,
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    // A row that cannot be read or enqueued stops: it would
                    // fail every pass, first in line. `last_error` says why.
                    // Only the row as read: an edit since (the lock went
                    // with the transaction) may have mended it.
                    drop(tx);
                    tracing::warn!(schedule.id = %id, error = %e, "schedule stopped");
                    run.invalid += 1;
                    sqlx::query(
                        "UPDATE schedules SET next_tick = NULL, last_error = $2, updated_at = now()
                         WHERE id = $1 AND version = $3",
                    )
                    .bind(id.0)
                    .bind(format!("stopped: {e}"))
                    .bind(version)
                    .execute(&self.pool)
                    .await?;
                }
            }
        }
        Ok(run)
    }
}

/// Enqueues a locked schedule's due ticks and moves it on.
async fn tick<F>(
    tx: &mut sqlx::PgConnection,
    schedule: &Schedule,
    grace: chrono::Duration,
    make_job: &F,
    run: &mut TickRun,
) -> Result<(), StoreError>
where
    F: Fn(&Schedule, DateTime<Utc>) -> Result<NewJob, String>,
{
    let Some(next_tick) = schedule.next_tick else {
        return Ok(());
    };
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    let spec = match CronSpec::parse(&schedule.cron, &schedule.timezone) {
        Ok(spec) => spec,
        // Checked when written: only a change of the crate or the time
        // zone database gets here.
        Err(e) => {
            return Err(StoreError::Corrupt(format!(
                "schedule {}: {e}",
                schedule.id
            )))
        }
    };
    let (due, next) = due_ticks(
        &spec,
        next_tick,
        now,
        grace,
        schedule.catch_up,
        schedule.catch_up_limit,
    );
    // Ticks that have their job already are not enqueued again: a schedule
    // moved back (an operator's edit, a clock change) must not fail on the
    // unique index. Every insert for a schedule happens under its row lock,
    // held here, so this read cannot race one.
    let done: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT scheduled_for FROM jobs WHERE schedule_id = $1 AND scheduled_for = ANY($2)",
    )
    .bind(schedule.id.0)
    .bind(&due)
    .fetch_all(&mut *tx)
    .await?;
    let due: Vec<DateTime<Utc>> = due.into_iter().filter(|t| !done.contains(t)).collect();
    let ticks: Vec<DateTime<Utc>> = match schedule.overlap {
        Overlap::Allow => due,
        Overlap::Skip => {
            let busy: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE schedule_id = $1 AND finished_at IS NULL)",
            )
            .bind(schedule.id.0)
            .fetch_one(&mut *tx)
            .await?;
            // One at most, the newest: its job is unfinished for the others.
            let runs = usize::from(!busy && !due.is_empty());
            run.skipped_overlap += (due.len() - runs) as u64;
            due.last()
                .filter(|_| runs == 1)
                .copied()
                .into_iter()
                .collect()
        }
    };
    let mut jobs = Vec::with_capacity(ticks.len());
    let mut error = None;
    for t in ticks {
        match make_job(schedule, t) {
            Ok(job) => jobs.push(job),
            Err(e) => {
                run.invalid += 1;
                error = Some(e);
            }
        }
    }
    let stored = insert_jobs_on(&mut *tx, &jobs).await?;
    // Only what this tick created: a `unique` duplicate is another's job.
    let created: Vec<Job> = stored
        .into_iter()
        .filter(|(_, created)| *created)
        .map(|(job, _)| job)
        .collect();
    let last = created.last().map(|job| (job.scheduled_for, job.id));
    set_outcome(&mut *tx, schedule.id, next, last, error).await?;
    run.enqueued.extend(created);
    Ok(())
}

/// Moves a schedule on after a pass.
async fn set_outcome(
    tx: &mut sqlx::PgConnection,
    id: ScheduleId,
    next_tick: Option<DateTime<Utc>>,
    last: Option<(Option<DateTime<Utc>>, JobId)>,
    error: Option<String>,
) -> Result<(), StoreError> {
    let (last_tick, last_job) = match last {
        Some((tick, job)) => (tick, Some(job.0)),
        None => (None, None),
    };
    sqlx::query(
        "UPDATE schedules SET next_tick = $2,
             last_tick = COALESCE($3, last_tick), last_job_id = COALESCE($4, last_job_id),
             last_error = $5, updated_at = now()
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(next_tick)
    .bind(last_tick)
    .bind(last_job)
    .bind(error)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::CatchUp;

    #[test]
    fn policies_read_back_as_written() {
        for o in [Overlap::Skip, Overlap::Allow] {
            let v: Overlap =
                serde_json::from_value(serde_json::Value::String(o.as_str().into())).expect("o");
            assert_eq!(v, o);
        }
        for c in [CatchUp::None, CatchUp::Latest, CatchUp::All] {
            let v: CatchUp =
                serde_json::from_value(serde_json::Value::String(c.as_str().into())).expect("c");
            assert_eq!(v, c);
        }
    }
}
