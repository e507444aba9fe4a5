//! Webhook subscriptions and the delivery outbox. The outbox is written by
//! triggers in the transaction of each transition (see the `webhooks` and
//! `webhook_fanout` migrations): one fan-out row per statement, which the
//! deliverers fan out into a delivery row per event and URL; this module
//! fans out, claims, records and lists them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::job::{message_id, Delivery, DeliveryAttempt, JobId, NewWebhook, Webhook};

/// An outbox row claimed for sending.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: i64,
    /// The job it reports (the nil UUID for the kill switch's events).
    pub job_id: Uuid,
    pub message_id: String,
    pub url: String,
    pub event: String,
    /// The JSON body exactly as every attempt sends it.
    pub body: String,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
    pub created_at: DateTime<Utc>,
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct DeliveryOutcome {
    pub id: i64,
    /// The attempt number it was claimed with: a late outcome of an attempt
    /// whose claim ran out (and was claimed again) changes nothing.
    pub attempt: u32,
    pub status: Option<u16>,
    pub error: Option<String>,
    /// At most 1 KiB.
    pub response: Option<String>,
    pub duration_ms: u32,
    /// Delivered (a 2xx), or else when to try again; `None` with no
    /// success: dead.
    pub delivered: bool,
    pub retry_in: Option<Duration>,
}

#[derive(sqlx::FromRow)]
struct WebhookRow {
    id: Uuid,
    url: String,
    events: Vec<String>,
    queues: Option<Vec<String>>,
    kinds: Option<Vec<String>>,
    description: String,
    created_by: String,
    created_at: DateTime<Utc>,
}

impl From<WebhookRow> for Webhook {
    fn from(r: WebhookRow) -> Self {
        Webhook {
            id: r.id,
            url: r.url,
            events: r.events,
            queues: r.queues,
            kinds: r.kinds,
            description: r.description,
            created_by: r.created_by,
            created_at: r.created_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: i64,
    message_id: Uuid,
    webhook_id: Uuid,
    event: String,
    url: String,
    state: String,
    attempts: i32,
    next_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    last_status: Option<i32>,
    last_error: Option<String>,
    body: Option<sqlx::types::Json<serde_json::Value>>,
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    delivery_id: i64,
    attempt: i32,
    at: DateTime<Utc>,
    duration_ms: i32,
    status: Option<i32>,
    error: Option<String>,
    response: Option<String>,
}

const WEBHOOK_COLUMNS: &str = "id, url, events, queues, kinds, description, created_by, created_at";
const DELIVERY_COLUMNS: &str = "id, message_id, webhook_id, event, url, state, attempts, \
    next_at, created_at, finished_at, last_status, last_error, body";

/// What a fan-out pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanOutPass {
    /// Fan-out rows (transition statements) taken.
    pub taken: u64,
    /// Delivery rows made from them.
    pub made: u64,
}

fn status(code: Option<i32>) -> Option<u16> {
    code.and_then(|c| u16::try_from(c).ok())
}

impl Store {
    pub async fn create_webhook(&self, hook: &NewWebhook) -> Result<Webhook, StoreError> {
        let row: WebhookRow = sqlx::query_as(&format!(
            "INSERT INTO webhooks (id, url, events, queues, kinds, description, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {WEBHOOK_COLUMNS}"
        ))
        .bind(hook.id)
        .bind(hook.url.as_str())
        .bind(&hook.events)
        .bind(&hook.queues)
        .bind(&hook.kinds)
        .bind(&hook.description)
        .bind(&hook.created_by)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.into())
    }

    pub async fn webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        let rows: Vec<WebhookRow> = sqlx::query_as(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Webhook::from).collect())
    }

    /// Removes a subscription; what it still had to send is dropped (in the
    /// same transaction, so no row of it is sent afterwards). Returns how
    /// many were dropped, or `None` when there was no such subscription.
    pub async fn delete_webhook(&self, id: Uuid) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query("DELETE FROM webhooks WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() == 0 {
            return Ok(None);
        }
        let dropped = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'dropped', finished_at = now()
             WHERE state IN ('pending', 'sending') AND webhook_id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(dropped.rows_affected()))
    }

    /// One fan-out pass: turns, in order, the oldest fan-out rows (one per
    /// transition statement, written by the trigger) written at least
    /// `min_age` ago, at most `max_rows` of them, into delivery rows.
    /// `None` when another replica is fanning out right now (one at a time,
    /// so that streams stay in order) or a retention batch is running.
    pub async fn fan_out_deliveries(
        &self,
        min_age: Duration,
        max_rows: u32,
    ) -> Result<Option<FanOutPass>, StoreError> {
        let pass: Option<(i64, i64)> = sqlx::query_as(
            "SELECT taken, made FROM fan_out_webhooks($1 * interval '1 millisecond', $2)",
        )
        .bind(min_age.as_secs_f64() * 1000.0)
        .bind(i32::try_from(max_rows).unwrap_or(i32::MAX))
        .fetch_optional(&self.pool)
        .await?;
        Ok(pass.map(|(taken, made)| FanOutPass {
            taken: u64::try_from(taken).unwrap_or(0),
            made: u64::try_from(made).unwrap_or(0),
        }))
    }

    /// Webhooks not yet delivered: delivery rows pending or being sent,
    /// and events not yet fanned out (each counted once, whatever number
    /// of URLs it will go to).
    pub async fn undelivered_webhooks(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM webhook_deliveries WHERE state IN ('pending', 'sending'))
                  + (SELECT COALESCE(sum(cardinality(event_ids)), 0) FROM webhook_fanout)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Claims up to `limit` due deliveries for `lease` (after which they
    /// are claimable again: at-least-once). A row is due only when no
    /// earlier row of its stream (the job, and the subscription or the
    /// job's callback) is still undelivered, so a later event never
    /// overtakes an earlier one. A row another deliverer is claiming right
    /// now is skipped (`SKIP LOCKED`); the rows behind it in its stream
    /// wait, because it is still pending or sending. Rows due less than
    /// `younger_wait` ago wait too.
    pub async fn claim_deliveries(
        &self,
        limit: u32,
        lease: Duration,
        younger_wait: Duration,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        #[allow(clippy::type_complexity)]
        let rows: Vec<(i64, Uuid, Uuid, String, String, String, i32, DateTime<Utc>)> = sqlx::query_as(
            "WITH due AS (
                SELECT d.id FROM webhook_deliveries d
                WHERE d.state IN ('pending', 'sending')
                  AND d.next_at <= now() - $3 * interval '1 millisecond'
                  -- A subscription deleted while its row was being written.
                  AND (d.webhook_id = '00000000-0000-0000-0000-000000000000'
                       OR EXISTS (SELECT 1 FROM webhooks w WHERE w.id = d.webhook_id))
                  -- No earlier row of its stream undelivered. Written as
                  -- NOT IN the final states (the same rows, by the CHECK)
                  -- so that only the stream index can serve it: as IN
                  -- ('pending', 'sending') it matched the due index's
                  -- predicate, and with statistics taken while nothing was
                  -- undelivered the planner scanned that whole index for
                  -- every candidate (800 ms a claim at 40,000 waiting rows,
                  -- a drain of minutes; 0.6 ms this way, measured).
                  AND NOT EXISTS (
                      SELECT 1 FROM webhook_deliveries e
                      WHERE e.job_id = d.job_id AND e.webhook_id = d.webhook_id AND e.id < d.id
                        AND e.state NOT IN ('delivered', 'dead', 'dropped'))
                -- By next_at alone, the order of webhook_deliveries_next_idx:
                -- rows of one transition statement (one fan-out row) share a
                -- next_at, and their order among themselves does not matter
                -- (a stream's is kept by the check above).
                ORDER BY d.next_at
                LIMIT $1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE webhook_deliveries d SET state = 'sending', attempts = d.attempts + 1,
                next_at = now() + $2 * interval '1 millisecond',
                body = COALESCE(d.body, (
                    -- The Standard Webhooks envelope {type, timestamp, data},
                    -- from what cannot change: the event's row, the status
                    -- and version the transition left, and the job's fixed
                    -- parts (its result only once it is final).
                    SELECT json_build_object(
                        'type', 'job.' || d.event,
                        'timestamp', e.at,
                        'data', json_build_object(
                            'id', d.job_id, 'queue', j.queue, 'kind', j.kind,
                            'status', d.status, 'stage', e.data->>'stage',
                            'attempt', COALESCE((e.data->>'attempt')::int, j.attempt),
                            'max_attempts', j.max_attempts, 'version', d.version,
                            'metadata', j.metadata,
                            'progress', CASE WHEN d.event = 'progress' THEN e.data END,
                            'retry_at', e.data->'retry_at',
                            'error', CASE WHEN d.event = 'cancelled' THEN e.data->>'reason'
                                          ELSE left(e.data->>'error', 2000) END,
                            -- A result summary: the result while it is
                            -- small, else its outcome.
                            'result', CASE
                                WHEN j.result IS NULL OR d.event NOT IN ('succeeded', 'dead') THEN NULL
                                WHEN octet_length(j.result::text) <= 4096 THEN j.result
                                ELSE jsonb_build_object('outcome', j.result->'outcome', 'truncated', true)
                            END))
                    FROM job_events e LEFT JOIN jobs j ON j.id = e.job_id
                    WHERE e.job_id = d.job_id AND e.id = d.event_id
                ), json_build_object(
                    -- The event is gone (retention): what the row knows.
                    'type', 'job.' || d.event,
                    'data', json_build_object('id', d.job_id, 'status', d.status, 'version', d.version)))
            FROM due WHERE d.id = due.id
            RETURNING d.id, d.job_id, d.message_id, d.url, d.event, d.body::text, d.attempts, d.created_at",
        )
        .bind(i64::from(limit))
        .bind(lease.as_secs_f64() * 1000.0)
        .bind(younger_wait.as_secs_f64() * 1000.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, job_id, message, url, event, body, attempt, created_at)| ClaimedDelivery {
                    id,
                    job_id,
                    message_id: message_id(message),
                    url,
                    event,
                    body,
                    attempt: u32::try_from(attempt).unwrap_or(0),
                    created_at,
                },
            )
            .collect())
    }

    /// Records attempts in one transaction: an attempt row each, and the
    /// delivery delivered, due again, or dead. An outcome whose claim has
    /// been taken over (another attempt number) only leaves its attempt row.
    pub async fn record_deliveries(&self, outcomes: &[DeliveryOutcome]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = outcomes.iter().map(|o| o.id).collect();
        let attempts: Vec<i32> = outcomes.iter().map(|o| o.attempt as i32).collect();
        let statuses: Vec<Option<i32>> = outcomes.iter().map(|o| o.status.map(i32::from)).collect();
        let errors: Vec<Option<&str>> = outcomes.iter().map(|o| o.error.as_deref()).collect();
        let responses: Vec<Option<&str>> = outcomes.iter().map(|o| o.response.as_deref()).collect();
        let durations: Vec<i32> = outcomes
            .iter()
            .map(|o| i32::try_from(o.duration_ms).unwrap_or(i32::MAX))
            .collect();
        let states: Vec<&str> = outcomes
            .iter()
            .map(|o| match (o.delivered, o.retry_in) {
                (true, _) => "delivered",
                (false, Some(_)) => "pending",
                (false, None) => "dead",
            })
            .collect();
        let retry_ms: Vec<f64> = outcomes
            .iter()
            .map(|o| o.retry_in.map_or(0.0, |d| d.as_secs_f64() * 1000.0))
            .collect();
        sqlx::query(
            "WITH input AS (
                SELECT * FROM UNNEST($1::bigint[], $2::int[], $3::int[], $4::text[], $5::text[],
                                     $6::int[], $7::text[], $8::float8[])
                AS t(id, attempt, status, error, response, duration_ms, state, retry_ms)
            ),
            logged AS (
                INSERT INTO webhook_attempts (delivery_id, attempt, duration_ms, status, error, response)
                SELECT id, attempt, duration_ms, status, error, response FROM input
                ON CONFLICT DO NOTHING
            )
            UPDATE webhook_deliveries d SET state = i.state,
                next_at = CASE WHEN i.state = 'pending'
                               THEN now() + i.retry_ms * interval '1 millisecond' ELSE d.next_at END,
                finished_at = CASE WHEN i.state = 'pending' THEN NULL ELSE now() END,
                last_status = i.status, last_error = i.error
            FROM input i
            WHERE d.id = i.id AND d.attempts = i.attempt AND d.state = 'sending'",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(&statuses)
        .bind(&errors)
        .bind(&responses)
        .bind(&durations)
        .bind(&states)
        .bind(&retry_ms)
        .execute(&self.pool)
        .await?;
        // The rows behind a retried one wait at least as long: left due,
        // every claim would read them again and find them blocked.
        let retried: Vec<i64> = outcomes
            .iter()
            .filter(|o| !o.delivered && o.retry_in.is_some())
            .map(|o| o.id)
            .collect();
        if !retried.is_empty() {
            sqlx::query(
                "UPDATE webhook_deliveries later SET next_at = first.next_at
                 FROM webhook_deliveries first
                 WHERE first.id = ANY($1) AND first.state = 'pending'
                   AND later.job_id = first.job_id AND later.webhook_id = first.webhook_id
                   AND later.id > first.id AND later.state = 'pending'
                   AND later.next_at < first.next_at",
            )
            .bind(&retried)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Drops the undelivered rows of subscriptions deleted while the rows
    /// were being written; returns how many.
    pub async fn drop_orphan_deliveries(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries d SET state = 'dropped', finished_at = now()
             WHERE d.state IN ('pending', 'sending')
               AND d.webhook_id <> '00000000-0000-0000-0000-000000000000'
               AND NOT EXISTS (SELECT 1 FROM webhooks w WHERE w.id = d.webhook_id)",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// A job's deliveries in order, each with its attempts.
    pub async fn job_deliveries(&self, job: JobId) -> Result<Vec<Delivery>, StoreError> {
        let rows: Vec<DeliveryRow> = sqlx::query_as(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE job_id = $1 ORDER BY id"
        ))
        .bind(job.0)
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let attempts: Vec<AttemptRow> = sqlx::query_as(
            "SELECT delivery_id, attempt, at, duration_ms, status, error, response
             FROM webhook_attempts WHERE delivery_id = ANY($1) ORDER BY delivery_id, attempt",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut by_delivery: std::collections::HashMap<i64, Vec<DeliveryAttempt>> =
            std::collections::HashMap::new();
        for a in attempts {
            by_delivery
                .entry(a.delivery_id)
                .or_default()
                .push(DeliveryAttempt {
                    attempt: u32::try_from(a.attempt).unwrap_or(0),
                    at: a.at,
                    duration_ms: u32::try_from(a.duration_ms).unwrap_or(0),
                    status: status(a.status),
                    error: a.error,
                    response: a.response,
                });
        }
        Ok(rows
            .into_iter()
            .map(|r| Delivery {
                attempt_log: by_delivery.remove(&r.id).unwrap_or_default(),
                id: r.id,
                message_id: message_id(r.message_id),
                // The nil UUID marks the job's own callback_url.
                webhook_id: (!r.webhook_id.is_nil()).then_some(r.webhook_id),
                event: r.event,
                url: r.url,
                state: r.state,
                attempts: u32::try_from(r.attempts).unwrap_or(0),
                next_at: r.next_at,
                created_at: r.created_at,
                finished_at: r.finished_at,
                last_status: status(r.last_status),
                last_error: r.last_error,
                // Written at the first claim; null until then.
                body: r.body.map(|b| b.0).unwrap_or(serde_json::Value::Null),
            })
            .collect())
    }

    /// Makes a finished delivery of `job` due again now, with its message
    /// id. `Ok(None)`: no such delivery of that job; `Ok(Some(false))`: it
    /// is still pending or being sent, and is left alone.
    pub async fn redeliver(&self, job: JobId, delivery: i64) -> Result<Option<bool>, StoreError> {
        let state: Option<String> = sqlx::query_scalar(
            "WITH d AS (
                SELECT id, state FROM webhook_deliveries WHERE id = $1 AND job_id = $2 FOR UPDATE
            ), upd AS (
                UPDATE webhook_deliveries w SET state = 'pending', next_at = now(), finished_at = NULL
                FROM d WHERE w.id = d.id AND d.state IN ('delivered', 'dead')
                RETURNING w.id
            )
            SELECT d.state FROM d",
        )
        .bind(delivery)
        .bind(job.0)
        .fetch_optional(&self.pool)
        .await?;
        Ok(state.map(|s| s == "delivered" || s == "dead"))
    }

    /// How long the oldest undelivered webhook has waited, fanned out or
    /// not (zero when none).
    pub async fn oldest_undelivered(&self) -> Result<Duration, StoreError> {
        let secs: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM now() - LEAST(
                (SELECT min(created_at) FROM webhook_deliveries WHERE state IN ('pending', 'sending')),
                (SELECT min(created_at) FROM webhook_fanout)))::float8",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Duration::from_secs_f64(secs.unwrap_or(0.0).max(0.0)))
    }
}
