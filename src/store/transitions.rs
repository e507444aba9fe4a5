//! Status transitions, one statement (and so one transaction) per batch.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::rows::{job_kind, parse_status, queue_name};
use super::{Store, StoreError};
use crate::job::{
    CancelRequest, Job, JobId, JobKind, QueueName, RetryDecision, RetryPolicy, Status,
};

/// What a worker needs to run a job it claimed.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: JobId,
    pub queue: QueueName,
    pub kind: JobKind,
    pub priority: u8,
    pub payload: serde_json::Value,
    pub attempt: u32,
    pub retry: RetryPolicy,
    pub timeout_secs: u32,
    /// The fencing token: every later change must present it.
    pub lease_id: i64,
    pub created_at: DateTime<Utc>,
    pub run_at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
}

/// One requested end of a running attempt, guarded by its lease.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: JobId,
    pub lease_id: i64,
    pub to: Status,
    /// For `Scheduled`: when to run again.
    pub run_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    /// Give the attempt back (graceful release at shutdown).
    pub refund_attempt: bool,
    /// Event type recorded in the audit trail.
    pub event: &'static str,
    pub event_data: serde_json::Value,
}

impl Finish {
    pub fn succeeded(id: JobId, lease_id: i64, result: serde_json::Value) -> Self {
        Finish {
            id,
            lease_id,
            to: Status::Succeeded,
            run_at: None,
            error: None,
            result: Some(result),
            refund_attempt: false,
            event: "succeeded",
            event_data: serde_json::Value::Null,
        }
    }

    /// A failed attempt: retried after backoff, or dead-lettered.
    pub fn failed(
        id: JobId,
        lease_id: i64,
        attempt: u32,
        retry: &RetryPolicy,
        error: String,
    ) -> Self {
        match retry.after_failure(attempt) {
            RetryDecision::RetryAfter(delay) => {
                let run_at =
                    Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
                Finish {
                    id,
                    lease_id,
                    to: Status::Scheduled,
                    run_at: Some(run_at),
                    event: "failed",
                    event_data: serde_json::json!({
                        "error": error,
                        "retry_at": run_at,
                        "delay_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    }),
                    error: Some(error),
                    result: None,
                    refund_attempt: false,
                }
            }
            RetryDecision::Dead => Finish::dead(id, lease_id, error),
        }
    }

    /// Throttled from outside: due again after `delay`. The attempt is given
    /// back unless it `counts`; one that counts and was the last is dead.
    pub fn throttled(
        id: JobId,
        lease_id: i64,
        attempt: u32,
        retry: &RetryPolicy,
        delay: std::time::Duration,
        counts: bool,
        error: String,
    ) -> Self {
        if counts && retry.after_failure(attempt) == RetryDecision::Dead {
            return Finish::dead(id, lease_id, error);
        }
        let run_at =
            Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        Finish {
            id,
            lease_id,
            to: Status::Scheduled,
            run_at: Some(run_at),
            event: "throttled",
            event_data: serde_json::json!({
                "error": error,
                "retry_at": run_at,
                "delay_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "counts_attempt": counts,
            }),
            error: Some(error),
            result: None,
            refund_attempt: !counts,
        }
    }

    /// Straight to the dead-letter state: retrying cannot help.
    pub fn dead(id: JobId, lease_id: i64, error: String) -> Self {
        Finish {
            id,
            lease_id,
            to: Status::Dead,
            run_at: None,
            event: "dead",
            event_data: serde_json::json!({ "error": error }),
            error: Some(error),
            result: None,
            refund_attempt: false,
        }
    }

    /// Cancelled while running, on `actor`'s request.
    pub fn cancelled(id: JobId, lease_id: i64, actor: &str, reason: &str) -> Self {
        Finish {
            id,
            lease_id,
            to: Status::Cancelled,
            run_at: None,
            error: Some(format!("cancelled: {reason}")),
            result: None,
            refund_attempt: false,
            event: "cancelled",
            event_data: serde_json::json!({ "reason": reason, "requested_by": actor, "from": "running" }),
        }
    }

    /// Back to the queue without using up the attempt (shutdown).
    pub fn released(id: JobId, lease_id: i64) -> Self {
        Finish {
            id,
            lease_id,
            to: Status::Queued,
            run_at: None,
            error: None,
            result: None,
            refund_attempt: true,
            event: "released",
            event_data: serde_json::Value::Null,
        }
    }
}

#[derive(Debug, Default)]
pub struct FinishOutcome {
    /// Committed: the caller may now update Valkey for these.
    pub applied: Vec<(JobId, Status)>,
    /// Refused because the lease was no longer current; nothing changed.
    pub stale: Vec<JobId>,
}

/// A lease the reaper ended in Postgres.
#[derive(Debug, Clone)]
pub struct Reaped {
    pub id: JobId,
    pub queue: QueueName,
    pub priority: u8,
    pub to: Status,
    pub run_at: Option<DateTime<Utc>>,
    /// The stage the job was in when its worker stopped renewing the lease.
    pub stage: Option<String>,
    /// For a cancelled job: when the cancel was asked for (Unix ms).
    pub cancel_requested_ms: Option<i64>,
}

/// Which leases a finish statement accepts: live ones (a worker finishing
/// its own attempt) or expired ones (the reaper, holding the row lock).
#[derive(Clone, Copy)]
enum LeaseState {
    Live,
    Expired,
}

#[derive(sqlx::FromRow)]
struct ClaimRow {
    id: Uuid,
    queue: String,
    kind: String,
    priority: i16,
    payload: serde_json::Value,
    attempt: i32,
    max_attempts: i32,
    backoff_base_ms: i64,
    backoff_cap_ms: i64,
    timeout_secs: i32,
    lease_id: i64,
    created_at: DateTime<Utc>,
    run_at: DateTime<Utc>,
    started_at: DateTime<Utc>,
}

impl TryFrom<ClaimRow> for ClaimedJob {
    type Error = StoreError;

    fn try_from(r: ClaimRow) -> Result<Self, StoreError> {
        Ok(ClaimedJob {
            id: JobId(r.id),
            queue: queue_name(r.queue)?,
            kind: job_kind(r.kind)?,
            priority: r.priority.clamp(1, 10) as u8,
            payload: r.payload,
            attempt: r.attempt.max(0) as u32,
            retry: RetryPolicy {
                max_attempts: r.max_attempts.max(1) as u32,
                backoff_base_ms: r.backoff_base_ms.max(1) as u64,
                backoff_cap_ms: r.backoff_cap_ms.max(1) as u64,
            },
            timeout_secs: r.timeout_secs.max(1) as u32,
            lease_id: r.lease_id,
            created_at: r.created_at,
            run_at: r.run_at,
            started_at: r.started_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ExpiredRow {
    id: Uuid,
    queue: String,
    priority: i16,
    attempt: i32,
    max_attempts: i32,
    backoff_base_ms: i64,
    backoff_cap_ms: i64,
    lease_id: i64,
    worker_id: Option<String>,
    stage: Option<String>,
}

fn statuses(list: &[Status]) -> Vec<&'static str> {
    list.iter().map(|s| s.as_str()).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Which of `ids` have a concurrency key already at its limit in
/// Postgres: the claim leaves them (they go back to wait). Valkey's claim
/// script holds them first; this is what still holds after Valkey lost its
/// running sets, until the reconciler restores them. The keys are locked
/// for the claim's transaction (in key order), so two claims cannot both
/// take a key's last slot; only batches with keyed ids pay for it.
async fn over_key_limits(
    tx: &mut sqlx::PgConnection,
    ids: &[JobId],
) -> Result<HashSet<Uuid>, StoreError> {
    let uuids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    let keyed: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT id, concurrency_key, concurrency_limit FROM jobs
         WHERE id = ANY($1) AND concurrency_key IS NOT NULL ORDER BY id",
    )
    .bind(&uuids)
    .fetch_all(&mut *tx)
    .await?;
    let mut over = HashSet::new();
    if keyed.is_empty() {
        return Ok(over);
    }
    let keys = super::lock_keys(
        &mut *tx,
        "orchestrator.ckey:",
        keyed.iter().map(|(_, k, _)| k.as_str()),
    )
    .await?;
    // A new statement after the locks: it sees every claim committed
    // before them.
    let running: Vec<(String, i64)> = sqlx::query_as(
        "SELECT concurrency_key, count(*) FROM jobs
         WHERE concurrency_key = ANY($1) AND finished_at IS NULL
           AND status = 'running' AND lease_expires_at > now()
         GROUP BY concurrency_key",
    )
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?;
    let mut taken: std::collections::HashMap<&str, i64> =
        running.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    for (id, key, limit) in &keyed {
        let n = taken.entry(key.as_str()).or_default();
        if *n >= i64::from(*limit) {
            over.insert(*id);
        } else {
            *n += 1;
        }
    }
    Ok(over)
}

impl Store {
    /// Starts the given jobs under a new lease for `worker_id`: `queued` (or
    /// due `scheduled`) → `running`, `attempt` and `lease_id` incremented, one
    /// `started` event each. Ids Postgres refuses are returned with the reason.
    pub async fn claim(
        &self,
        ids: &[JobId],
        worker_id: &str,
        lease: Duration,
    ) -> Result<(Vec<ClaimedJob>, Vec<JobId>), StoreError> {
        if ids.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut tx = self.pool.begin().await?;
        let over = over_key_limits(&mut tx, ids).await?;
        let uuids: Vec<Uuid> = ids
            .iter()
            .map(|id| id.0)
            .filter(|id| !over.contains(id))
            .collect();
        let rows: Vec<ClaimRow> = sqlx::query_as(
            "WITH locked AS (
                SELECT id FROM jobs
                WHERE id = ANY($1) AND status = ANY($4)
                  AND (status <> 'scheduled' OR run_at <= now())
                ORDER BY id
                FOR UPDATE
            ),
            upd AS (
                UPDATE jobs j SET status = 'running', attempt = j.attempt + 1,
                    lease_id = j.lease_id + 1, worker_id = $2,
                    lease_expires_at = now() + $3 * interval '1 millisecond',
                    started_at = now(), updated_at = now(), stage = NULL,
                    -- Each attempt reports its own progress (and another
                    -- worker's clock must not make it look older).
                    progress = NULL
                -- Rows by primary key, never a scan of the table.
                WHERE j.id = ANY(ARRAY(SELECT id FROM locked))
                RETURNING j.id, j.queue, j.kind, j.priority, j.payload, j.attempt,
                    j.max_attempts, j.backoff_base_ms, j.backoff_cap_ms, j.timeout_secs,
                    j.lease_id, j.created_at, j.run_at, j.started_at
            ),
            ev AS (
                INSERT INTO job_events (job_id, type, actor, data)
                SELECT id, 'started', $2, jsonb_build_object('attempt', attempt, 'lease_id', lease_id)
                FROM upd
            )
            SELECT * FROM upd",
        )
        .bind(&uuids)
        .bind(worker_id)
        .bind(ms(lease))
        .bind(statuses(&Status::sources_of(Status::Running)))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let claimed = rows
            .into_iter()
            .map(ClaimedJob::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut refused = Vec::new();
        if claimed.len() < ids.len() {
            let got: HashSet<JobId> = claimed.iter().map(|j| j.id).collect();
            refused.extend(ids.iter().copied().filter(|id| !got.contains(id)));
        }
        Ok((claimed, refused))
    }

    /// Ends running attempts in one transaction. Each row must still be
    /// `running` under the given `lease_id` with a live lease; the others are
    /// reported stale and left untouched.
    pub async fn finish(&self, batch: &[Finish], actor: &str) -> Result<FinishOutcome, StoreError> {
        let mut conn = self.pool.acquire().await?;
        finish_on(&mut conn, batch, actor, LeaseState::Live).await
    }

    /// Finishes one attempt, with [`StoreError::StaleLease`] if the lease is gone.
    pub async fn finish_one(&self, finish: Finish, actor: &str) -> Result<Status, StoreError> {
        let (id, lease_id) = (finish.id, finish.lease_id);
        let outcome = self.finish(&[finish], actor).await?;
        match outcome.applied.first() {
            Some((_, status)) => Ok(*status),
            None => Err(StoreError::StaleLease { job: id, lease_id }),
        }
    }

    /// Extends live leases; returns the ids whose lease is still ours (the
    /// others were lost: expired, reaped or taken by another worker).
    pub async fn heartbeat(
        &self,
        leases: &[(JobId, i64)],
        lease: Duration,
    ) -> Result<Vec<JobId>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = leases.iter().map(|(id, _)| id.0).collect();
        let tokens: Vec<i64> = leases.iter().map(|(_, t)| *t).collect();
        let held: Vec<Uuid> = sqlx::query_scalar(
            "WITH locked AS (
                SELECT j.id FROM jobs j
                JOIN UNNEST($1::uuid[], $2::bigint[]) AS i(id, lease_id)
                  ON i.id = j.id AND i.lease_id = j.lease_id
                WHERE j.status = 'running' AND j.lease_expires_at > now()
                ORDER BY j.id
                FOR UPDATE OF j
            )
            UPDATE jobs j SET lease_expires_at = now() + $3 * interval '1 millisecond'
            WHERE j.id = ANY(ARRAY(SELECT id FROM locked))
            RETURNING j.id",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(ms(lease))
        .fetch_all(&self.pool)
        .await?;
        Ok(held.into_iter().map(JobId).collect())
    }

    /// Running jobs whose lease has expired, in id order.
    pub async fn expired_leases(&self, limit: u32) -> Result<Vec<JobId>, StoreError> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM jobs
             WHERE finished_at IS NULL AND status = 'running' AND lease_expires_at <= now()
             ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(JobId).collect())
    }

    /// Ends expired leases: each attempt counts as failed ("lease expired"),
    /// so the job is scheduled for a retry after backoff or dead-lettered,
    /// except a job in `cancels`, which ends `cancelled` (its worker died
    /// while stopping it). `only` limits the search to ids Valkey reported
    /// (primary-key lookups); `None` scans every unfinished job, for leases
    /// the index lost. Safe to run in every replica at once (`SKIP LOCKED`).
    ///
    /// `cancels` is asked which of the locked jobs have a cancel request,
    /// while their rows are locked: a request made while the reaper waited
    /// for Postgres is still seen. `None` from it reaps nothing this time.
    pub async fn reap_expired<F, Fut>(
        &self,
        only: Option<&[JobId]>,
        limit: u32,
        actor: &str,
        cancels: F,
    ) -> Result<Vec<Reaped>, StoreError>
    where
        F: FnOnce(Vec<JobId>) -> Fut,
        Fut: std::future::Future<Output = Option<HashMap<JobId, CancelRequest>>>,
    {
        let only: Option<Vec<Uuid>> = only.map(|ids| ids.iter().map(|id| id.0).collect());
        let mut tx = self.pool.begin().await?;
        // Two statements, so each can use its index: the primary key for
        // given ids, jobs_unfinished_idx for the scan.
        let which = if only.is_some() {
            "id = ANY($1)"
        } else {
            "finished_at IS NULL AND $1::uuid[] IS NULL"
        };
        let sql = format!(
            "SELECT id, queue, priority, attempt, max_attempts, backoff_base_ms, backoff_cap_ms,
                    lease_id, worker_id, stage
             FROM jobs
             WHERE {which} AND status = 'running' AND lease_expires_at <= now()
             ORDER BY id
             LIMIT $2
             FOR UPDATE SKIP LOCKED"
        );
        let rows: Vec<ExpiredRow> = sqlx::query_as(&sql)
            .bind(&only)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let Some(cancels) = cancels(rows.iter().map(|r| JobId(r.id)).collect()).await else {
            return Ok(Vec::new());
        };
        let mut batch = Vec::with_capacity(rows.len());
        let mut meta = Vec::with_capacity(rows.len());
        for r in rows {
            let retry = RetryPolicy {
                max_attempts: r.max_attempts.max(1) as u32,
                backoff_base_ms: r.backoff_base_ms.max(1) as u64,
                backoff_cap_ms: r.backoff_cap_ms.max(1) as u64,
            };
            let worker = r.worker_id.as_deref().unwrap_or("?");
            let finish = match cancels.get(&JobId(r.id)) {
                // Its worker died while stopping it: the cancel ends here.
                Some(c) => {
                    let mut finish =
                        Finish::cancelled(JobId(r.id), r.lease_id, &c.actor, &c.reason);
                    if let Some(data) = finish.event_data.as_object_mut() {
                        data.insert("completed_by".into(), serde_json::json!(actor));
                        data.insert("lease_expired_from".into(), serde_json::json!(worker));
                    }
                    finish
                }
                None => {
                    let error = format!("lease expired: worker {worker} stopped renewing it");
                    let mut finish = Finish::failed(
                        JobId(r.id),
                        r.lease_id,
                        r.attempt.max(0) as u32,
                        &retry,
                        error,
                    );
                    finish.event = "lease_expired";
                    finish
                }
            };
            meta.push((
                JobId(r.id),
                queue_name(r.queue)?,
                r.priority.clamp(1, 10) as u8,
                finish.run_at,
                r.stage,
                cancels.get(&JobId(r.id)).and_then(|c| c.requested_ms),
            ));
            batch.push(finish);
        }
        let outcome = finish_on(&mut tx, &batch, actor, LeaseState::Expired).await?;
        tx.commit().await?;
        Ok(meta
            .into_iter()
            .filter_map(
                |(id, queue, priority, run_at, stage, cancel_requested_ms)| {
                    outcome
                        .applied
                        .iter()
                        .find(|(a, _)| *a == id)
                        .map(|(_, to)| Reaped {
                            id,
                            queue,
                            priority,
                            to: *to,
                            run_at,
                            stage,
                            cancel_requested_ms,
                        })
                },
            )
            .collect())
    }

    /// Cancels a job that waits (queued or scheduled): `cancelled`, with an
    /// event naming actor, reason and the status it left. Cancelling a
    /// cancelled job again changes nothing and succeeds (idempotent); any
    /// other status is an [`StoreError::InvalidTransition`].
    pub async fn cancel_waiting(
        &self,
        id: JobId,
        actor: &str,
        reason: &str,
    ) -> Result<(Job, Option<Status>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let from = parse_status(&status.ok_or(StoreError::NotFound(id))?)?;
        let changed = match from {
            Status::Cancelled => None,
            Status::Queued | Status::Scheduled if from.can_transition_to(Status::Cancelled) => {
                sqlx::query(
                    "UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now(),
                         last_error = $2
                     WHERE id = $1",
                )
                .bind(id.0)
                .bind(format!("cancelled: {reason}"))
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO job_events (job_id, type, actor, data)
                     VALUES ($1, 'cancelled', $2, jsonb_build_object('reason', $3::text, 'from', $4::text))",
                )
                .bind(id.0)
                .bind(actor)
                .bind(reason)
                .bind(from.as_str())
                .execute(&mut *tx)
                .await?;
                Some(from)
            }
            _ => {
                return Err(StoreError::InvalidTransition {
                    job: id,
                    from,
                    to: Status::Cancelled,
                })
            }
        };
        tx.commit().await?;
        Ok((self.get_job(id).await?, changed))
    }

    /// Admin retry of a dead-lettered job: `dead` → `queued` with a fresh
    /// set of attempts. Returns the job's queue and priority for indexing.
    pub async fn retry_dead(&self, id: JobId, actor: &str) -> Result<(QueueName, u8), StoreError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, String, i16)> =
            sqlx::query_as("SELECT status, queue, priority FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let (status, queue, priority) = row.ok_or(StoreError::NotFound(id))?;
        // Decoded before anything is written: a bad name changes nothing.
        let queue = queue_name(queue)?;
        let from = parse_status(&status)?;
        if !from.can_transition_to(Status::Queued) || from != Status::Dead {
            return Err(StoreError::InvalidTransition {
                job: id,
                from,
                to: Status::Queued,
            });
        }
        sqlx::query(
            "UPDATE jobs SET status = 'queued', attempt = 0, run_at = now(), finished_at = NULL,
                 updated_at = now(), progress = NULL
             WHERE id = $1",
        )
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO job_events (job_id, type, actor, data)
             VALUES ($1, 'retried', $2, jsonb_build_object('from', 'dead'))",
        )
        .bind(id.0)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((queue, priority.clamp(1, 10) as u8))
    }
}

async fn finish_on(
    conn: &mut sqlx::PgConnection,
    batch: &[Finish],
    actor: &str,
    lease_state: LeaseState,
) -> Result<FinishOutcome, StoreError> {
    if batch.is_empty() {
        return Ok(FinishOutcome::default());
    }
    for f in batch {
        // Every finish leaves `running`; the table says where it may go.
        if !Status::Running.can_transition_to(f.to) {
            return Err(StoreError::InvalidTransition {
                job: f.id,
                from: Status::Running,
                to: f.to,
            });
        }
    }
    // The same job twice in one batch (two racing completions): the first
    // one competes, the later ones are stale by definition.
    let mut seen = HashSet::with_capacity(batch.len());
    let (batch, duplicates): (Vec<&Finish>, Vec<&Finish>) =
        batch.iter().partition(|f| seen.insert(f.id));
    let ids: Vec<Uuid> = batch.iter().map(|f| f.id.0).collect();
    let tokens: Vec<i64> = batch.iter().map(|f| f.lease_id).collect();
    let to: Vec<&str> = batch.iter().map(|f| f.to.as_str()).collect();
    let run_at: Vec<Option<DateTime<Utc>>> = batch.iter().map(|f| f.run_at).collect();
    let errors: Vec<Option<&str>> = batch.iter().map(|f| f.error.as_deref()).collect();
    let results: Vec<Option<&serde_json::Value>> =
        batch.iter().map(|f| f.result.as_ref()).collect();
    let refunds: Vec<bool> = batch.iter().map(|f| f.refund_attempt).collect();
    let events: Vec<&str> = batch.iter().map(|f| f.event).collect();
    let data: Vec<&serde_json::Value> = batch.iter().map(|f| &f.event_data).collect();
    // Each step reads its rows by primary key or from the input arrays
    // (whose length the planner knows); no step joins two intermediate
    // results, which the planner may turn into quadratic nested loops.
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "WITH locked AS (
            SELECT j.id FROM jobs j
            JOIN UNNEST($1::uuid[], $2::bigint[]) AS i(id, lease_id)
              ON i.id = j.id AND i.lease_id = j.lease_id
            WHERE j.status = 'running'
              AND CASE WHEN $11 THEN j.lease_expires_at > now() ELSE j.lease_expires_at <= now() END
            ORDER BY j.id
            FOR UPDATE OF j
        ),
        upd AS (
            UPDATE jobs j SET status = i.status,
                run_at = COALESCE(i.run_at, CASE WHEN i.status = 'queued' THEN now() ELSE j.run_at END),
                last_error = COALESCE(i.error, j.last_error),
                result = COALESCE(i.result, j.result),
                attempt = j.attempt - CASE WHEN i.refund THEN 1 ELSE 0 END,
                worker_id = NULL, lease_expires_at = NULL,
                finished_at = CASE WHEN i.status IN ('succeeded', 'dead', 'cancelled') THEN now() END,
                updated_at = now()
            FROM UNNEST($1::uuid[], $3::text[], $4::timestamptz[], $5::text[], $6::jsonb[],
                        $7::bool[], $8::text[], $9::jsonb[])
                AS i(id, status, run_at, error, result, refund, event, data)
            WHERE j.id = i.id AND j.id = ANY(ARRAY(SELECT id FROM locked))
            RETURNING j.id, j.status, j.attempt, j.stage, i.event, i.data
        ),
        ev AS (
            INSERT INTO job_events (job_id, type, actor, data)
            SELECT id, event, $10,
                CASE WHEN jsonb_typeof(data) = 'object' THEN data ELSE '{}'::jsonb END
                    || jsonb_build_object('attempt', attempt)
                    || CASE WHEN stage IS NULL THEN '{}'::jsonb
                            ELSE jsonb_build_object('stage', stage) END
            FROM upd
        )
        SELECT id, status FROM upd",
    )
    .bind(&ids)
    .bind(&tokens)
    .bind(&to)
    .bind(&run_at)
    .bind(&errors)
    .bind(&results)
    .bind(&refunds)
    .bind(&events)
    .bind(&data)
    .bind(actor)
    .bind(matches!(lease_state, LeaseState::Live))
    .fetch_all(&mut *conn)
    .await?;
    let mut outcome = FinishOutcome::default();
    let mut applied = HashSet::with_capacity(rows.len());
    for (id, status) in rows {
        applied.insert(id);
        outcome.applied.push((JobId(id), parse_status(&status)?));
    }
    outcome.stale = batch
        .iter()
        .map(|f| f.id)
        .filter(|id| !applied.contains(&id.0))
        .chain(duplicates.iter().map(|f| f.id))
        .collect();
    Ok(outcome)
}
