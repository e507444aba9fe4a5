//! The webhook deliverer: fans the transitions' outbox rows out into one
//! delivery row per event and URL (one replica at a time, in order), claims
//! due delivery rows (`FOR UPDATE SKIP LOCKED`, so every replica runs one
//! and none sends a row another holds), POSTs each with its Standard
//! Webhooks signature, at most `concurrency` at once, and records every
//! attempt. A failed attempt is retried with the jobs' backoff
//! (exponential, jittered by the `backoff` crate) until `max_attempts`,
//! then the row is dead. While a worker pool says it is saturated with
//! short jobs, rows younger than `defer_while_saturated` wait (neither
//! fanned out nor sent), so that delivering does not take from the jobs
//! (Postgres and the cores are what both need). Outcomes are written in
//! batches; should a deliverer die first, its rows are claimable again once
//! their claim runs out, and the receiver sees the same `webhook-id` again.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{error_backoff, Maintenance, MaintenanceError};
use crate::job::{RetryDecision, RetryPolicy};
use crate::metrics as m;
use crate::store::{ClaimedDelivery, DeliveryOutcome};
use crate::webhook::{Client, SendError, Signer};

/// The most of an answer that is kept.
pub const RESPONSE_LIMIT: usize = 1024;

/// How a replica delivers webhooks.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub client: Client,
    pub signer: Signer,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Attempts, and the delays between them.
    pub retry: RetryPolicy,
    /// Each request's timeout (the client's); a claim lasts a little longer.
    pub timeout: Duration,
    /// How often the outbox is looked at while it is empty.
    pub poll_interval: Duration,
    /// While a worker pool says it is saturated with short jobs, rows
    /// younger than this wait (zero: never).
    pub defer_while_saturated: Duration,
}

impl DeliveryConfig {
    fn lease(&self) -> Duration {
        self.timeout + Duration::from_secs(5)
    }
}

impl Maintenance {
    /// Delivers until `stop` fires, then waits for the requests in flight
    /// (bounded by their timeout) and records them.
    pub(super) async fn deliver(&self, cfg: DeliveryConfig, stop: CancellationToken) {
        let mut inflight: JoinSet<DeliveryOutcome> = JoinSet::new();
        let mut done = Vec::new();
        let mut failures = 0u32;
        let mut fan_out_failures = 0u32;
        let mut stopping = false;
        // Whether the last wait ended on the poll tick rather than on a
        // finished request.
        let mut ticked = true;
        let mut saturation = SaturationCheck::default();
        loop {
            let free = cfg.concurrency.saturating_sub(inflight.len());
            let mut claimed = 0;
            // After a finished request, claim only once half the slots are
            // free (under load, a claim per finished request cost more than
            // the requests); on the poll tick, whatever is free, so that
            // slow receivers holding most slots do not hold up the rest.
            let worth_claiming =
                free > 0 && (ticked || inflight.is_empty() || free * 2 >= cfg.concurrency);
            // Fanning out does not wait for free slots: on every poll tick
            // too, so that rows reach the delivery table (and every
            // replica's deliverers) while this one's slots are busy.
            let defer = if (worth_claiming || ticked) && !stopping {
                let defer = if saturation.saturated(&self.valkey, &cfg).await {
                    cfg.defer_while_saturated
                } else {
                    Duration::ZERO
                };
                fan_out_failures = if self.fan_out(defer).await {
                    0
                } else {
                    fan_out_failures + 1
                };
                defer
            } else {
                Duration::ZERO
            };
            if worth_claiming && !stopping {
                match self
                    .store
                    .claim_deliveries(u32::try_from(free).unwrap_or(u32::MAX), cfg.lease(), defer)
                    .await
                {
                    Ok(batch) => {
                        failures = 0;
                        claimed = batch.len();
                        for delivery in batch {
                            inflight.spawn(send(cfg.clone(), delivery));
                        }
                    }
                    Err(err) => {
                        failures += 1;
                        metrics::counter!(m::LOOP_ERRORS, "task" => "webhooks").increment(1);
                        tracing::warn!(error = %err, "cannot claim webhook deliveries");
                    }
                }
            }
            if stopping && inflight.is_empty() {
                break;
            }
            // Wait for a request to end, or for the next look at the
            // outbox (new rows while slow receivers hold some slots).
            let pause = if failures.max(fan_out_failures) > 0 {
                error_backoff(failures.max(fan_out_failures))
            } else if claimed == free && free > 0 {
                Duration::ZERO
            } else {
                cfg.poll_interval
            };
            ticked = false;
            tokio::select! {
                () = stop.cancelled(), if !stopping => stopping = true,
                Some(joined) = inflight.join_next(), if !inflight.is_empty() => {
                    done.extend(joined.ok());
                }
                () = tokio::time::sleep(pause) => ticked = true,
            }
            while let Some(joined) = inflight.try_join_next() {
                done.extend(joined.ok());
            }
            if !done.is_empty() {
                match self.store.record_deliveries(&done).await {
                    Ok(()) => count(&done),
                    // Their rows stay claimed until the claim runs out, then
                    // are sent again with the same webhook-id.
                    Err(err) => {
                        metrics::counter!(m::LOOP_ERRORS, "task" => "webhooks").increment(1);
                        tracing::warn!(error = %err, deliveries = done.len(), "webhook outcomes not recorded; they will be sent again");
                    }
                }
                done.clear();
            }
        }
    }

    /// Fans out what the transitions wrote at least `min_age` ago: passes
    /// of `FAN_OUT_ROWS` rows while they come back full, at most
    /// `FAN_OUT_PASSES` of them. Returns false if a pass failed (the rows
    /// stay, and go on a later pass).
    async fn fan_out(&self, min_age: Duration) -> bool {
        for _ in 0..FAN_OUT_PASSES {
            match self.store.fan_out_deliveries(min_age, FAN_OUT_ROWS).await {
                Ok(Some(pass)) => {
                    metrics::counter!(m::WEBHOOK_FANNED_OUT).increment(pass.made);
                    if pass.taken < u64::from(FAN_OUT_ROWS) {
                        break;
                    }
                }
                // Another replica is at it, or a retention batch.
                Ok(None) => break,
                Err(err) => {
                    metrics::counter!(m::LOOP_ERRORS, "task" => "webhooks").increment(1);
                    tracing::warn!(error = %err, "cannot fan out webhook deliveries");
                    return false;
                }
            }
        }
        true
    }

    /// Samples the age of the oldest undelivered webhook, and drops the rows of
    /// subscriptions deleted while those rows were being written.
    pub async fn sample_webhooks_once(&self) -> Result<(), MaintenanceError> {
        let dropped = self.store.drop_orphan_deliveries().await?;
        if dropped > 0 {
            tracing::info!(dropped, "webhook rows of deleted subscriptions dropped");
        }
        let age = self.store.oldest_undelivered().await?;
        metrics::gauge!(m::WEBHOOK_OLDEST_UNDELIVERED).set(age.as_secs_f64());
        Ok(())
    }
}

/// The most fan-out rows one pass takes. A row is a transition statement,
/// so up to a claim or finish batch of events (hundreds), each times its
/// URLs: 20 keep a pass's transaction, and the lock every replica's
/// fan-out and retention wait for, to a few thousand rows.
const FAN_OUT_ROWS: u32 = 20;

/// The most passes in a row, so that a backlog (deliverers were off) is
/// fanned out at a pace but the loop still gets to claiming.
const FAN_OUT_PASSES: u32 = 10;

/// How often a deliverer asks Valkey whether a pool is saturated.
const SATURATION_CHECK_EVERY: Duration = Duration::from_millis(100);

/// The last answer to whether a worker pool is saturated, and when it came.
#[derive(Default)]
struct SaturationCheck {
    at: Option<Instant>,
    saturated: bool,
}

impl SaturationCheck {
    /// Whether fresh deliveries should wait now. Valkey's answer is kept for
    /// [`SATURATION_CHECK_EVERY`]; without one (Valkey down) they do not
    /// wait: deferring is an optimisation, delivering is the job.
    async fn saturated(
        &mut self,
        valkey: &crate::queue::ValkeyQueue,
        cfg: &DeliveryConfig,
    ) -> bool {
        if cfg.defer_while_saturated.is_zero() {
            return false;
        }
        if self
            .at
            .is_some_and(|at| at.elapsed() < SATURATION_CHECK_EVERY)
        {
            return self.saturated;
        }
        let was = self.saturated;
        self.saturated = match valkey.saturated().await {
            Ok(saturated) => saturated,
            Err(err) => {
                tracing::debug!(error = %err, "cannot tell whether a pool is saturated");
                false
            }
        };
        self.at = Some(Instant::now());
        if self.saturated != was {
            tracing::debug!(
                saturated = self.saturated,
                "fresh webhook deliveries wait (true) or go (false): a pool's saturation changed"
            );
            metrics::gauge!(m::WEBHOOK_DEFERRING).set(if self.saturated { 1.0 } else { 0.0 });
        }
        self.saturated
    }
}

fn count(done: &[DeliveryOutcome]) {
    for o in done {
        let outcome = match (o.delivered, o.retry_in) {
            (true, _) => "delivered",
            (false, Some(_)) => "retried",
            (false, None) => "dead",
        };
        metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => outcome).increment(1);
    }
}

/// One attempt of one row.
async fn send(cfg: DeliveryConfig, d: ClaimedDelivery) -> DeliveryOutcome {
    let started = Instant::now();
    let sent = cfg
        .client
        .post(&d.url, &cfg.signer, &d.message_id, d.body.into_bytes())
        .await;
    let duration_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
    let (status, error, response) = match sent {
        Ok(answer) => {
            let text = String::from_utf8_lossy(&answer.body);
            // A cut at the byte limit can split a character; the lossy
            // decoding's replacement must not push it past the limit.
            let mut kept: String = text.chars().filter(|c| *c != '\0').collect();
            while kept.len() > RESPONSE_LIMIT {
                kept.pop();
            }
            let error =
                (!(200..300).contains(&answer.status)).then(|| format!("HTTP {}", answer.status));
            (Some(answer.status), error, Some(kept))
        }
        Err(err) => {
            let error = match &err {
                SendError::Refused(_) => format!("{err}"),
                _ => format!("no answer: {err}"),
            };
            // Postgres takes no NUL in text; one would fail the whole batch.
            (None, Some(error.replace('\0', "")), None)
        }
    };
    let delivered = status.is_some_and(|s| (200..300).contains(&s));
    let retry_in = if delivered {
        None
    } else {
        match cfg.retry.after_failure(d.attempt) {
            RetryDecision::RetryAfter(delay) => Some(delay),
            RetryDecision::Dead => None,
        }
    };
    if delivered {
        let waited = (chrono::Utc::now() - d.created_at)
            .to_std()
            .unwrap_or_default();
        metrics::histogram!(m::WEBHOOK_DELIVERY_SECONDS).record(waited.as_secs_f64());
    } else {
        tracing::info!(
            job.id = %d.job_id,
            delivery = d.id,
            event = d.event,
            attempt = d.attempt,
            error = error.as_deref().unwrap_or_default(),
            dead = retry_in.is_none(),
            "webhook delivery failed"
        );
    }
    DeliveryOutcome {
        id: d.id,
        attempt: d.attempt,
        status,
        error,
        response,
        duration_ms,
        delivered,
        retry_in,
    }
}
