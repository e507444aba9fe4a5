//! Creating and reading jobs and their events.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::rows::{EventRow, JobRow, JOB_COLUMNS};
use super::{Store, StoreError};
use crate::job::{
    Job, JobEdit, JobEvent, JobFilter, JobId, JobKind, NewJob, Progress, QueueName, Status,
};

/// Attempts of an optimistic progress write before it gives up.
const PROGRESS_RETRIES: usize = 5;

/// What [`Store::set_progress`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressWrite {
    /// Recorded; the row is now at `version`.
    Written { version: i64 },
    /// The job no longer runs under that lease (finished, cancelled,
    /// reaped): nothing written.
    NotRunning,
    /// A newer progress is recorded already: nothing written.
    Older,
    /// Lost the race every time it was tried.
    Contended,
}

/// `(queue, status, count)` rows, decoded.
fn counts(rows: Vec<(String, String, i64)>) -> Result<Vec<QueueCounts>, StoreError> {
    rows.into_iter()
        .map(|(queue, status, count)| {
            Ok(QueueCounts {
                queue: super::rows::queue_name(queue)?,
                status: super::rows::parse_status(&status)?,
                count,
            })
        })
        .collect()
}

/// A failed attempt, as the audit trail recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub event_id: i64,
    pub job_id: JobId,
    pub at: DateTime<Utc>,
    /// The job went to the dead-letter state (otherwise it is retried).
    pub dead: bool,
    pub queue: QueueName,
    pub kind: JobKind,
    pub attempt: Option<u32>,
    pub error: String,
}

/// What the index needs to know about a job to repair its Valkey entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexState {
    pub id: JobId,
    pub queue: QueueName,
    pub status: Status,
    pub priority: u8,
    pub run_at: DateTime<Utc>,
    /// Running with a lease that has not expired yet.
    pub lease_live: bool,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Its concurrency key and limit.
    pub concurrency: Option<(String, u32)>,
}

#[derive(sqlx::FromRow)]
struct IndexRow {
    id: Uuid,
    queue: String,
    status: String,
    priority: i16,
    run_at: DateTime<Utc>,
    lease_live: bool,
    lease_expires_at: Option<DateTime<Utc>>,
    concurrency_key: Option<String>,
    concurrency_limit: Option<i32>,
}

impl TryFrom<IndexRow> for IndexState {
    type Error = StoreError;

    fn try_from(r: IndexRow) -> Result<Self, StoreError> {
        Ok(IndexState {
            id: JobId(r.id),
            queue: super::rows::queue_name(r.queue)?,
            status: super::rows::parse_status(&r.status)?,
            priority: r.priority.clamp(1, 10) as u8,
            run_at: r.run_at,
            lease_live: r.lease_live,
            lease_expires_at: r.lease_expires_at,
            concurrency: r
                .concurrency_key
                .zip(r.concurrency_limit)
                .map(|(k, l)| (k, l.max(1) as u32)),
        })
    }
}

const INDEX_COLUMNS: &str = "id, queue, status, priority, run_at, \
    COALESCE(status = 'running' AND lease_expires_at > now(), false) AS lease_live, \
    lease_expires_at, concurrency_key, concurrency_limit";

/// Who holds a job now, for telling orphaned sandboxes from live ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub id: JobId,
    pub status: Status,
    pub attempt: u32,
    pub worker_id: Option<String>,
    pub lease_live: bool,
}

/// Jobs per queue and status, from Postgres.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounts {
    pub queue: QueueName,
    pub status: Status,
    pub count: i64,
}

impl Store {
    /// Inserts jobs and their `enqueued` events, in one transaction. A job
    /// whose idempotency key already exists, or whose `unique` key an
    /// existing job holds (in the named states, within the window), is not
    /// inserted; the existing job is returned in its place with `false`.
    /// Output order matches input order.
    ///
    /// Unique keys are serialised by a transaction-scoped advisory lock per
    /// key, taken in key order (so two batches never deadlock): of any
    /// number of concurrent requests with one key, exactly one inserts.
    pub async fn insert_jobs(&self, jobs: &[NewJob]) -> Result<Vec<(Job, bool)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let out = insert_jobs_on(&mut tx, jobs).await?;
        tx.commit().await?;
        Ok(out)
    }
}

/// [`Store::insert_jobs`] on a connection (in a transaction the caller
/// commits): the scheduler enqueues a tick and moves its schedule on in one.
pub(super) async fn insert_jobs_on(
    conn: &mut sqlx::PgConnection,
    jobs: &[NewJob],
) -> Result<Vec<(Job, bool)>, StoreError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let (duplicates, behind) = unique_duplicates(conn, jobs).await?;
    let fresh: Vec<&NewJob> = jobs
        .iter()
        .filter(|j| !duplicates.contains_key(&j.id.0) && !behind.contains_key(&j.id.0))
        .collect();
    let mut inserted = insert_fresh(conn, &fresh).await?;
    // A job whose unique key an earlier job of this call took gets that
    // job back (or what that one got back).
    let mut duplicates = duplicates;
    for (dup, first) in behind {
        let holder = inserted
            .get(&first)
            .or_else(|| duplicates.get(&first))
            .cloned();
        if let Some(job) = holder {
            duplicates.insert(dup, job);
        }
    }
    let mut existing: HashMap<String, Job> = HashMap::new();
    if inserted.len() < fresh.len() {
        let wanted: Vec<String> = fresh
            .iter()
            .filter(|j| !inserted.contains_key(&j.id.0))
            .filter_map(|j| j.idempotency_key.clone())
            .collect();
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = ANY($1)");
        let rows: Vec<JobRow> = sqlx::query_as(&sql)
            .bind(&wanted)
            .fetch_all(&mut *conn)
            .await?;
        for row in rows {
            let job = Job::try_from(row)?;
            if let Some(key) = job.idempotency_key.clone() {
                existing.insert(key, job);
            }
        }
    }
    jobs.iter()
        .map(|j| {
            if let Some(job) = duplicates.get(&j.id.0) {
                return Ok((job.clone(), false));
            }
            if let Some(job) = inserted.remove(&j.id.0) {
                return Ok((job, true));
            }
            j.idempotency_key
                .as_ref()
                .and_then(|k| existing.get(k).cloned())
                .map(|job| (job, false))
                .ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "job {} was neither inserted nor found by its key",
                        j.id
                    ))
                })
        })
        .collect()
}

/// Duplicates by `unique` key: for each new job whose key an existing job
/// holds, that job; and for each whose key an earlier job of this call
/// holds, that job's id. Locks every key first (see [`Store::insert_jobs`]).
/// A job whose idempotency key exists already is a replay, left to the
/// idempotency path: it must get back its own job, not the key's holder.
async fn unique_duplicates(
    conn: &mut sqlx::PgConnection,
    jobs: &[NewJob],
) -> Result<(HashMap<Uuid, Job>, HashMap<Uuid, Uuid>), StoreError> {
    let mut keyed: Vec<(&str, &NewJob)> = jobs
        .iter()
        .filter_map(|j| j.unique.as_ref().map(|u| (u.key.as_str(), j)))
        .collect();
    let mut found = HashMap::new();
    let mut behind = HashMap::new();
    if keyed.is_empty() {
        return Ok((found, behind));
    }
    let replay_keys: Vec<&str> = keyed
        .iter()
        .filter_map(|(_, j)| j.idempotency_key.as_deref())
        .collect();
    if !replay_keys.is_empty() {
        let replays: Vec<String> =
            sqlx::query_scalar("SELECT idempotency_key FROM jobs WHERE idempotency_key = ANY($1)")
                .bind(&replay_keys)
                .fetch_all(&mut *conn)
                .await?;
        keyed.retain(|(_, j)| {
            j.idempotency_key
                .as_ref()
                .is_none_or(|k| !replays.contains(k))
        });
    }
    // Stable: of one key, the first in the call stays first.
    keyed.sort_by(|a, b| a.0.cmp(b.0));
    let keys: Vec<&str> = keyed.iter().map(|(k, _)| *k).collect();
    super::lock_keys(conn, "orchestrator.unique:", keys).await?;
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs
         WHERE unique_key = $1 AND status = ANY($2)
           AND ($3::bigint IS NULL OR created_at > now() - make_interval(secs => $3))
         ORDER BY created_at DESC LIMIT 1"
    );
    let mut first_of: HashMap<&str, Uuid> = HashMap::new();
    for (key, job) in keyed {
        if let Some(first) = first_of.get(key) {
            behind.insert(job.id.0, *first);
            continue;
        }
        first_of.insert(key, job.id.0);
        let Some(unique) = &job.unique else { continue };
        let states: Vec<&str> = unique.states.iter().map(|s| s.as_str()).collect();
        let row: Option<JobRow> = sqlx::query_as(&sql)
            .bind(key)
            .bind(&states)
            .bind(unique.for_secs.map(|s| s as i64))
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = row {
            found.insert(job.id.0, Job::try_from(row)?);
        }
    }
    Ok((found, behind))
}

/// Inserts jobs and their `enqueued` events in one statement, but not
/// those whose idempotency key exists already. Returns the inserted ones.
async fn insert_fresh(
    conn: &mut sqlx::PgConnection,
    jobs: &[&NewJob],
) -> Result<HashMap<Uuid, Job>, StoreError> {
    if jobs.is_empty() {
        return Ok(HashMap::new());
    }
    let n = jobs.len();
    let mut ids = Vec::with_capacity(n);
    let mut queues = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut bases = Vec::with_capacity(n);
    let mut caps = Vec::with_capacity(n);
    let mut timeouts = Vec::with_capacity(n);
    let mut run_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut keys: Vec<Option<String>> = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut yolos = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut callbacks: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut unique_keys: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut concurrency_keys: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut concurrency_limits: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut schedule_ids: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut ticks: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    for j in jobs {
        ids.push(j.id.0);
        queues.push(j.queue.as_str().to_owned());
        kinds.push(j.kind.as_str().to_owned());
        priorities.push(i16::from(j.priority.get()));
        payloads.push(j.payload.clone());
        max_attempts.push(j.retry.max_attempts as i32);
        bases.push(j.retry.backoff_base_ms as i64);
        caps.push(j.retry.backoff_cap_ms as i64);
        timeouts.push(j.timeout_secs as i32);
        run_ats.push(j.run_at);
        keys.push(j.idempotency_key.clone());
        actors.push(j.actor.clone());
        yolos.push(j.yolo);
        metadata.push(j.metadata.clone());
        callbacks.push(j.callback_url.as_deref());
        unique_keys.push(j.unique.as_ref().map(|u| u.key.as_str()));
        concurrency_keys.push(j.concurrency.as_ref().map(|(k, _)| k.as_str()));
        concurrency_limits.push(j.concurrency.as_ref().map(|(_, l)| *l as i32));
        schedule_ids.push(j.schedule.map(|(id, _)| id.0));
        ticks.push(j.schedule.map(|(_, tick)| tick));
    }
    let sql = format!(
            "WITH input AS (
                SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::smallint[], $5::jsonb[],
                    $6::int[], $7::bigint[], $8::bigint[], $9::int[], $10::timestamptz[], $11::text[],
                    $12::text[], $13::bool[], $14::jsonb[], $15::text[], $16::text[], $17::text[], $18::int[],
                    $19::uuid[], $20::timestamptz[])
                AS t(id, queue, kind, priority, payload, max_attempts, backoff_base_ms,
                     backoff_cap_ms, timeout_secs, run_at, idempotency_key, actor, yolo, metadata,
                     callback_url, unique_key, concurrency_key, concurrency_limit, schedule_id, scheduled_for)
            ),
            ins AS (
                INSERT INTO jobs (id, queue, kind, status, priority, payload, max_attempts,
                    backoff_base_ms, backoff_cap_ms, timeout_secs, run_at, idempotency_key, metadata,
                    callback_url, unique_key, concurrency_key, concurrency_limit, schedule_id, scheduled_for)
                SELECT id, queue, kind,
                    CASE WHEN run_at > now() THEN 'scheduled' ELSE 'queued' END,
                    priority, payload, max_attempts, backoff_base_ms, backoff_cap_ms,
                    timeout_secs, COALESCE(run_at, now()), idempotency_key, metadata, callback_url,
                    unique_key, concurrency_key, concurrency_limit, schedule_id, scheduled_for
                FROM input
                ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING {JOB_COLUMNS}
            ),
            ev AS (
                INSERT INTO job_events (job_id, type, actor, data)
                SELECT ins.id, 'enqueued', input.actor,
                    jsonb_build_object('status', ins.status, 'queue', ins.queue, 'kind', ins.kind,
                                       'priority', ins.priority)
                    -- YOLO (gates skipped, or required ones left out) is marked
                    -- in the trail from the start.
                    || CASE WHEN input.yolo
                            THEN jsonb_build_object('yolo', true) ELSE jsonb_build_object() END
                FROM ins JOIN input USING (id)
            )
            SELECT {JOB_COLUMNS} FROM ins"
        );
    let rows: Vec<JobRow> = sqlx::query_as(&sql)
        .bind(&ids)
        .bind(&queues)
        .bind(&kinds)
        .bind(&priorities)
        .bind(&payloads)
        .bind(&max_attempts)
        .bind(&bases)
        .bind(&caps)
        .bind(&timeouts)
        .bind(&run_ats)
        .bind(&keys)
        .bind(&actors)
        .bind(&yolos)
        .bind(&metadata)
        .bind(&callbacks)
        .bind(&unique_keys)
        .bind(&concurrency_keys)
        .bind(&concurrency_limits)
        .bind(&schedule_ids)
        .bind(&ticks)
        .fetch_all(&mut *conn)
        .await?;
    let mut inserted: HashMap<Uuid, Job> = HashMap::with_capacity(rows.len());
    for row in rows {
        let job = Job::try_from(row)?;
        inserted.insert(job.id.0, job);
    }
    Ok(inserted)
}

impl Store {
    pub async fn lease_holders(&self, ids: &[JobId]) -> Result<Vec<LeaseHolder>, StoreError> {
        let uuids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let rows: Vec<(Uuid, String, i32, Option<String>, bool)> = sqlx::query_as(
            "SELECT id, status, attempt, worker_id,
                    COALESCE(status = 'running' AND lease_expires_at > now(), false)
             FROM jobs WHERE id = ANY($1)",
        )
        .bind(&uuids)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, status, attempt, worker_id, lease_live)| {
                Ok(LeaseHolder {
                    id: JobId(id),
                    status: super::rows::parse_status(&status)?,
                    attempt: attempt.max(0) as u32,
                    worker_id,
                    lease_live,
                })
            })
            .collect()
    }

    /// Jobs holding any of the given idempotency keys.
    pub async fn jobs_by_idempotency_keys(&self, keys: &[String]) -> Result<Vec<Job>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = ANY($1)");
        let rows: Vec<JobRow> = sqlx::query_as(&sql)
            .bind(keys)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    /// Appends events to a running job's trail, only while `lease_id` is its
    /// current lease. Returns how many were written (0: the lease is gone).
    /// Records a running job's progress, optimistically: the write holds
    /// only if the row's `version` is still the one read, the job still
    /// runs under `lease_id`, and no newer progress is recorded. A write
    /// that lost a race re-reads and retries, a bounded number of times. A
    /// `progress` event is appended in the same transaction. Never moves a
    /// job out of a terminal state.
    pub async fn set_progress(
        &self,
        id: JobId,
        lease_id: i64,
        progress: &Progress,
        actor: &str,
    ) -> Result<ProgressWrite, StoreError> {
        let value = serde_json::to_value(progress)
            .map_err(|e| StoreError::Corrupt(format!("progress: {e}")))?;
        for _ in 0..PROGRESS_RETRIES {
            let row: Option<(i64, String, i64, Option<serde_json::Value>)> = sqlx::query_as(
                "SELECT version, status, lease_id, progress FROM jobs WHERE id = $1",
            )
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
            let (version, status, current_lease, recorded) = row.ok_or(StoreError::NotFound(id))?;
            if status != Status::Running.as_str() || current_lease != lease_id {
                return Ok(ProgressWrite::NotRunning);
            }
            let newer = recorded
                .and_then(|r| serde_json::from_value::<Progress>(r).ok())
                .is_some_and(|r| r.at > progress.at);
            if newer {
                return Ok(ProgressWrite::Older);
            }
            let written: Option<i64> = sqlx::query_scalar(
                "WITH updated AS (
                    UPDATE jobs SET progress = $3
                    WHERE id = $1 AND version = $2 AND status = 'running' AND lease_id = $5
                    RETURNING version
                 ), logged AS (
                    INSERT INTO job_events (job_id, type, actor, data)
                    SELECT $1, 'progress', $4, $3 FROM updated
                 )
                 SELECT version FROM updated",
            )
            .bind(id.0)
            .bind(version)
            .bind(&value)
            .bind(actor)
            .bind(lease_id)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(version) = written {
                return Ok(ProgressWrite::Written { version });
            }
            // Another write came first: read again.
        }
        Ok(ProgressWrite::Contended)
    }

    pub async fn append_events(
        &self,
        id: JobId,
        lease_id: i64,
        events: &[(&str, serde_json::Value)],
        actor: &str,
    ) -> Result<u64, StoreError> {
        let types: Vec<&str> = events.iter().map(|(t, _)| *t).collect();
        let data: Vec<&serde_json::Value> = events.iter().map(|(_, d)| d).collect();
        let done = sqlx::query(
            "INSERT INTO job_events (job_id, type, actor, data)
             SELECT $1, t.type, $4, t.data
             FROM UNNEST($2::text[], $3::jsonb[]) WITH ORDINALITY AS t(type, data, n)
             WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND status = 'running' AND lease_id = $5)
             ORDER BY t.n",
        )
        .bind(id.0)
        .bind(&types)
        .bind(&data)
        .bind(actor)
        .bind(lease_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Records the stage a running job is in, only under its current lease.
    pub async fn set_stage(
        &self,
        id: JobId,
        lease_id: i64,
        stage: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET stage = $3, updated_at = now() WHERE id = $1 AND status = 'running' AND lease_id = $2",
        )
        .bind(id.0)
        .bind(lease_id)
        .bind(stage)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records an event on a job whatever its state (maintenance: an orphan
    /// sandbox removed, say).
    pub async fn record_event(
        &self,
        id: JobId,
        kind: &str,
        actor: &str,
        data: serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO job_events (job_id, type, actor, data) VALUES ($1, $2, $3, $4)")
            .bind(id.0)
            .bind(kind)
            .bind(actor)
            .bind(data)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The jobs with these ids that exist, in no particular order.
    pub async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ANY($1)");
        let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let rows: Vec<JobRow> = sqlx::query_as(&sql)
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    pub async fn get_job(&self, id: JobId) -> Result<Job, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row: Option<JobRow> = sqlx::query_as(&sql)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        row.ok_or(StoreError::NotFound(id))?.try_into()
    }

    /// Jobs newest first. Ids are UUIDv7, so id order is creation order and
    /// the primary key serves as the pagination index.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::text IS NULL OR queue = $2)
               AND ($3::text IS NULL OR kind = $3)
               AND ($4::uuid IS NULL OR id < $4)
             ORDER BY id DESC
             LIMIT $5"
        );
        let rows: Vec<JobRow> = sqlx::query_as(&sql)
            .bind(filter.status.map(Status::as_str))
            .bind(filter.queue.as_deref())
            .bind(filter.kind.as_deref())
            .bind(filter.before.map(|id| id.0))
            .bind(i64::from(filter.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    /// A job's audit trail in order, optionally only events after `after_id`.
    /// How many events of type `kind` a job's trail holds.
    pub async fn event_count(&self, id: JobId, kind: &str) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM job_events WHERE job_id = $1 AND type = $2")
                .bind(id.0)
                .bind(kind)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn job_events(
        &self,
        id: JobId,
        after_id: Option<i64>,
    ) -> Result<Vec<JobEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT id, job_id, at, type, actor, data FROM job_events
             WHERE job_id = $1 AND id > $2 ORDER BY id",
        )
        .bind(id.0)
        .bind(after_id.unwrap_or(0))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(JobEvent::from).collect())
    }

    /// The index-relevant state of the given jobs; unknown ids are absent.
    pub async fn index_states(&self, ids: &[JobId]) -> Result<Vec<IndexState>, StoreError> {
        let uuids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let sql = format!("SELECT {INDEX_COLUMNS} FROM jobs WHERE id = ANY($1)");
        let rows: Vec<IndexRow> = sqlx::query_as(&sql)
            .bind(&uuids)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(IndexState::try_from).collect()
    }

    /// Running jobs with a concurrency key, for putting them back first
    /// after Valkey lost its data (those whose lease ran out get their key
    /// only, for the retry the reaper gives them).
    pub async fn running_keyed_jobs(&self) -> Result<Vec<IndexState>, StoreError> {
        let sql = format!(
            "SELECT {INDEX_COLUMNS} FROM jobs
             WHERE finished_at IS NULL AND status = 'running'
               AND concurrency_key IS NOT NULL"
        );
        let rows: Vec<IndexRow> = sqlx::query_as(&sql).fetch_all(&self.pool).await?;
        rows.into_iter().map(IndexState::try_from).collect()
    }

    /// One page of unfinished (queued, scheduled, running) jobs in id
    /// order, for rebuilding the index. Served by `jobs_unfinished_idx`.
    pub async fn unfinished_jobs_page(
        &self,
        after: Option<JobId>,
        limit: u32,
    ) -> Result<Vec<IndexState>, StoreError> {
        let sql = format!(
            "SELECT {INDEX_COLUMNS} FROM jobs
             WHERE finished_at IS NULL AND ($1::uuid IS NULL OR id > $1)
             ORDER BY id LIMIT $2"
        );
        let rows: Vec<IndexRow> = sqlx::query_as(&sql)
            .bind(after.map(|id| id.0))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(IndexState::try_from).collect()
    }

    /// Edits a job that has not started, if it is still at
    /// `expected_version`: one transaction holding the row lock, so a claim
    /// sees the job wholly before or wholly after the edit. A changed
    /// `run_at` makes it `scheduled` (future) or `queued` (due). The edit is
    /// recorded as an `edited` event with what changed, from and to.
    pub async fn edit_job(
        &self,
        id: JobId,
        expected_version: i64,
        edit: &JobEdit,
        actor: &str,
    ) -> Result<Job, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"
        ))
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
        let before = Job::try_from(row.ok_or(StoreError::NotFound(id))?)?;
        if !matches!(before.status, Status::Queued | Status::Scheduled) {
            return Err(StoreError::NotEditable {
                job: id,
                status: before.status,
            });
        }
        if before.version != expected_version {
            return Err(StoreError::VersionMismatch {
                job: id,
                expected: expected_version,
                current: before.version,
            });
        }
        let used = before.attempt;
        if let Some(asked) = edit.max_attempts {
            if asked <= used {
                return Err(StoreError::AttemptsUsed {
                    job: id,
                    used,
                    asked,
                });
            }
        }
        let mut changes = serde_json::Map::new();
        let mut change = |field: &str, from: serde_json::Value, to: serde_json::Value| {
            if from != to {
                changes.insert(
                    field.to_owned(),
                    serde_json::json!({ "from": from, "to": to }),
                );
            }
        };
        if let Some(p) = edit.priority {
            change("priority", before.priority.into(), p.get().into());
        }
        if let Some(t) = edit.run_at {
            change(
                "run_at",
                serde_json::json!(before.run_at),
                serde_json::json!(t),
            );
        }
        if let Some(n) = edit.max_attempts {
            change("max_attempts", before.max_attempts.into(), n.into());
        }
        if let Some(m) = &edit.metadata {
            change("metadata", before.metadata.clone(), m.clone());
        }
        let row: JobRow = sqlx::query_as(&format!(
            "UPDATE jobs SET
                 priority = COALESCE($2, priority),
                 run_at = COALESCE($3, run_at),
                 status = CASE WHEN $3::timestamptz IS NULL THEN status
                               WHEN $3 > now() THEN 'scheduled' ELSE 'queued' END,
                 max_attempts = COALESCE($4, max_attempts),
                 metadata = COALESCE($5, metadata),
                 updated_at = now()
             WHERE id = $1
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(id.0)
        .bind(edit.priority.map(|p| i16::from(p.get())))
        .bind(edit.run_at)
        .bind(edit.max_attempts.map(|n| n as i32))
        .bind(&edit.metadata)
        .fetch_one(&mut *tx)
        .await?;
        let job = Job::try_from(row)?;
        sqlx::query(
            "INSERT INTO job_events (job_id, type, actor, data)
             VALUES ($1, 'edited', $2, $3)",
        )
        .bind(id.0)
        .bind(actor)
        .bind(serde_json::json!({
            "changes": changes,
            "from_version": before.version,
            "version": job.version,
            "status": job.status,
        }))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Jobs finished since `since`, per queue and terminal status (the
    /// dashboard's throughput; `jobs_finished_at_idx` serves it).
    pub async fn finished_counts(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<QueueCounts>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT queue, status, count(*) FROM jobs
             WHERE finished_at IS NOT NULL AND finished_at >= $1
             GROUP BY queue, status ORDER BY queue, status",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        counts(rows)
    }

    /// The last `limit` failed attempts (retried or dead), newest first.
    pub async fn recent_failures(&self, limit: u32) -> Result<Vec<Failure>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            id: i64,
            job_id: Uuid,
            at: DateTime<Utc>,
            kind: String,
            queue: String,
            job_kind: String,
            attempt: Option<i32>,
            error: Option<String>,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT e.id, e.job_id, e.at, e.type AS kind, j.queue, j.kind AS job_kind,
                    (e.data->>'attempt')::int AS attempt, e.data->>'error' AS error
             FROM job_events e JOIN jobs j ON j.id = e.job_id
             WHERE e.type IN ('failed', 'dead')
             ORDER BY e.id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Failure {
                    event_id: r.id,
                    job_id: JobId(r.job_id),
                    at: r.at,
                    dead: r.kind == "dead",
                    queue: super::rows::queue_name(r.queue)?,
                    kind: super::rows::job_kind(r.job_kind)?,
                    attempt: r.attempt.and_then(|a| u32::try_from(a).ok()),
                    error: r.error.unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Live jobs per queue and status.
    pub async fn queue_counts(&self) -> Result<Vec<QueueCounts>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT queue, status, count(*) FROM jobs
             WHERE finished_at IS NULL
             GROUP BY queue, status ORDER BY queue, status",
        )
        .fetch_all(&self.pool)
        .await?;
        counts(rows)
    }
}

/// The advisory lock only the pruning replica holds (transaction-scoped).
const RETENTION_LOCK: i64 = 0x6f72_6368_7072_756e; // "orchprun"

impl Store {
    /// Deletes up to `batch` jobs of `status` that finished more than
    /// `keep` ago, with their events and webhook rows, through
    /// `prune_finished_jobs()` (the only DELETE the trail's trigger
    /// allows). Returns the jobs and events deleted, or `None` when another
    /// replica holds the retention lock.
    pub async fn prune_finished(
        &self,
        status: Status,
        keep: std::time::Duration,
        batch: u32,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(RETENTION_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(None);
        }
        let (jobs, events): (i64, i64) = sqlx::query_as(
            "SELECT pruned_jobs, pruned_events
             FROM prune_finished_jobs($1, now() - make_interval(secs => $2), $3)",
        )
        .bind(status.as_str())
        .bind(keep.as_secs_f64())
        .bind(batch as i32)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((jobs.max(0) as u64, events.max(0) as u64)))
    }
}
