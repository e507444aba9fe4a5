//! Raw rows as Postgres returns them, converted into domain types.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::StoreError;
use crate::job::{Job, JobEvent, JobId, JobKind, QueueName, ScheduleId, Status};

/// Every column of `jobs`, in the order of [`JOB_COLUMNS`].
pub const JOB_COLUMNS: &str = "id, queue, kind, status, stage, priority, payload, attempt, \
    max_attempts, backoff_base_ms, backoff_cap_ms, timeout_secs, lease_id, worker_id, \
    lease_expires_at, run_at, idempotency_key, last_error, result, created_at, updated_at, \
    started_at, finished_at, version, progress, metadata, callback_url, unique_key, \
    concurrency_key, concurrency_limit, schedule_id, scheduled_for";

#[derive(sqlx::FromRow)]
pub struct JobRow {
    id: Uuid,
    queue: String,
    kind: String,
    status: String,
    stage: Option<String>,
    priority: i16,
    payload: serde_json::Value,
    attempt: i32,
    max_attempts: i32,
    backoff_base_ms: i64,
    backoff_cap_ms: i64,
    timeout_secs: i32,
    lease_id: i64,
    worker_id: Option<String>,
    lease_expires_at: Option<DateTime<Utc>>,
    run_at: DateTime<Utc>,
    idempotency_key: Option<String>,
    last_error: Option<String>,
    result: Option<serde_json::Value>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    version: i64,
    progress: Option<serde_json::Value>,
    metadata: serde_json::Value,
    callback_url: Option<String>,
    unique_key: Option<String>,
    concurrency_key: Option<String>,
    concurrency_limit: Option<i32>,
    schedule_id: Option<Uuid>,
    scheduled_for: Option<DateTime<Utc>>,
}

/// A queue name as stored: written validated, so a bad one is corruption.
pub fn queue_name(raw: String) -> Result<QueueName, StoreError> {
    QueueName::parse(raw).map_err(|e| StoreError::Corrupt(format!("jobs.queue: {e}")))
}

/// A job kind as stored (see [`queue_name`]).
pub fn job_kind(raw: String) -> Result<JobKind, StoreError> {
    JobKind::parse(raw).map_err(|e| StoreError::Corrupt(format!("jobs.kind: {e}")))
}

pub fn parse_status(s: &str) -> Result<Status, StoreError> {
    s.parse().map_err(|e| StoreError::Corrupt(format!("{e}")))
}

fn non_negative<T: TryFrom<i64>>(what: &str, v: i64) -> Result<T, StoreError> {
    T::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {v}")))
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(r: JobRow) -> Result<Self, StoreError> {
        Ok(Job {
            id: JobId(r.id),
            queue: queue_name(r.queue)?,
            kind: job_kind(r.kind)?,
            status: parse_status(&r.status)?,
            stage: r.stage,
            priority: non_negative("priority", r.priority.into())?,
            payload: r.payload,
            attempt: non_negative("attempt", r.attempt.into())?,
            max_attempts: non_negative("max_attempts", r.max_attempts.into())?,
            backoff_base_ms: non_negative("backoff_base_ms", r.backoff_base_ms)?,
            backoff_cap_ms: non_negative("backoff_cap_ms", r.backoff_cap_ms)?,
            timeout_secs: non_negative("timeout_secs", r.timeout_secs.into())?,
            lease_id: r.lease_id,
            worker_id: r.worker_id,
            lease_expires_at: r.lease_expires_at,
            run_at: r.run_at,
            idempotency_key: r.idempotency_key,
            last_error: r.last_error,
            result: r.result,
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            version: r.version,
            // Written only by `Store::set_progress`; unreadable is corrupt.
            progress: r
                .progress
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("jobs.progress: {e}")))?,
            metadata: r.metadata,
            callback_url: r.callback_url,
            unique_key: r.unique_key,
            concurrency_key: r.concurrency_key,
            concurrency_limit: r
                .concurrency_limit
                .map(|l| non_negative("concurrency_limit", l.into()))
                .transpose()?,
            schedule_id: r.schedule_id.map(ScheduleId),
            scheduled_for: r.scheduled_for,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct EventRow {
    id: i64,
    job_id: Uuid,
    at: DateTime<Utc>,
    #[sqlx(rename = "type")]
    kind: String,
    actor: String,
    data: serde_json::Value,
}

impl From<EventRow> for JobEvent {
    fn from(r: EventRow) -> Self {
        JobEvent {
            id: r.id,
            job_id: JobId(r.job_id),
            at: r.at,
            kind: r.kind,
            actor: r.actor,
            data: r.data,
        }
    }
}
