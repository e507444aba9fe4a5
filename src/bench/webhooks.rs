//! `orchestrator bench webhooks`: what webhooks cost the queue. Rounds of
//! `bench queue` (no-op jobs) alternate without a subscription and with one
//! for every job event (two deliveries per job: `started` and
//! `succeeded`), in one sitting, against one receiver on 127.0.0.1 that
//! answers 204. The figure is the ratio of the median throughputs; beside
//! it, how many webhooks were still in the outbox when the jobs were done,
//! and how long the outbox then took to empty.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{median, round, BenchError, BenchOptions};
use crate::app::App;
use crate::config::Settings;
use crate::job::{WebhookRequest, JOB_WEBHOOK_EVENTS};
use crate::secret::Secret;

#[derive(Debug, Serialize)]
pub struct WebhookBench {
    pub rounds: usize,
    pub jobs: usize,
    /// Processed per second, each round, in the order they ran.
    pub without_per_s: Vec<f64>,
    pub with_per_s: Vec<f64>,
    pub without_median_per_s: f64,
    pub with_median_per_s: f64,
    /// with / without (the goal: at least 0.85).
    pub ratio: f64,
    /// with / without for each pair of rounds run one after the other, and
    /// their median: steadier than the ratio of medians when this machine
    /// slows down or speeds up for several rounds at a time.
    pub pair_ratios: Vec<f64>,
    pub pair_ratio_median: f64,
    /// Webhooks sent in all the rounds with a subscription.
    pub delivered: i64,
    /// Delivered while each round's burst ran (by the time its last no-op
    /// job had finished).
    pub delivered_during_burst: Vec<i64>,
    /// Still undelivered when each round's last job had finished.
    pub backlog_at_drain: Vec<i64>,
    /// From then until the outbox was empty, seconds.
    pub outbox_empty_after_s: Vec<f64>,
}

async fn undelivered(app: &App) -> Result<i64, BenchError> {
    Ok(app
        .store()
        .undelivered_webhooks()
        .await
        .map_err(crate::app::AppError::from)?)
}

/// Webhooks of `queue` delivered by the time its `jobs`th job finished
/// (the burst's last; the latency jobs come after it).
async fn delivered_during_burst(app: &App, queue: &str, jobs: usize) -> Result<i64, BenchError> {
    Ok(sqlx::query_scalar(
        "WITH last AS (
            SELECT finished_at FROM jobs WHERE queue = $1 AND finished_at IS NOT NULL
            ORDER BY finished_at LIMIT 1 OFFSET $2
        )
        SELECT count(*) FROM webhook_deliveries d JOIN jobs j ON j.id = d.job_id, last
        WHERE j.queue = $1 AND d.state = 'delivered' AND d.finished_at <= last.finished_at",
    )
    .bind(queue)
    .bind(i64::try_from(jobs.saturating_sub(1)).unwrap_or(i64::MAX))
    .fetch_one(app.store().pool())
    .await?)
}

/// A receiver that answers 204 to every POST, counting them.
async fn receiver(
    stop: CancellationToken,
) -> std::io::Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let count = std::sync::Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    let app = axum::Router::new().fallback(move || {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::Relaxed);
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok((url, count))
}

/// Runs `rounds` pairs; `settings` name the services. A secret is made for
/// the run when none is configured, and local receivers are allowed (the
/// receiver is on this host).
pub async fn run(
    mut settings: Settings,
    opts: &BenchOptions,
    rounds: usize,
) -> Result<WebhookBench, BenchError> {
    if settings.webhooks.secrets.is_empty() {
        let secret = crate::app::new_webhook_secret()
            .map_err(|e| BenchError::Setup(format!("no randomness for a webhook secret: {e}")))?;
        settings.webhooks.secrets = vec![Secret::new(secret)];
    }
    settings.webhooks.allow_local = true;
    let app = App::connect(settings).await?;
    app.ensure_migrated().await?;
    let stop = CancellationToken::new();
    let (url, received) = receiver(stop.clone())
        .await
        .map_err(|e| BenchError::Setup(format!("the receiver: {e}")))?;
    // A second deliverer, as an API replica would run, which also empties
    // the outbox after each round's pool has stopped.
    let deliverer = {
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move { app.deliver_webhooks(stop).await })
    };
    let mut report = WebhookBench {
        rounds,
        jobs: opts.jobs,
        without_per_s: Vec::new(),
        with_per_s: Vec::new(),
        without_median_per_s: 0.0,
        with_median_per_s: 0.0,
        ratio: 0.0,
        pair_ratios: Vec::new(),
        pair_ratio_median: 0.0,
        delivered: 0,
        delivered_during_burst: Vec::new(),
        backlog_at_drain: Vec::new(),
        outbox_empty_after_s: Vec::new(),
    };
    for round_no in 0..rounds * 2 {
        // Alternate which goes first, so neither always runs on a warmer
        // (or more fragmented) database.
        let with = (round_no % 2 == 0) == (round_no / 2 % 2 == 0);
        let hook = if with {
            let request = WebhookRequest {
                url: url.clone(),
                events: JOB_WEBHOOK_EVENTS.iter().map(|e| (*e).to_owned()).collect(),
                queues: None,
                kinds: None,
                description: Some("bench webhooks".into()),
            };
            Some(app.create_webhook(request, "bench").await?)
        } else {
            None
        };
        // The jobs stay until their webhooks are out: a message is written
        // from its job and event at its first claim.
        let keep = BenchOptions {
            keep: true,
            ..opts.clone()
        };
        let ran = super::run(&app, &keep).await?;
        match hook {
            Some(hook) => {
                report.with_per_s.push(ran.process_per_s);
                report.backlog_at_drain.push(undelivered(&app).await?);
                report
                    .delivered_during_burst
                    .push(delivered_during_burst(&app, &ran.queue, opts.jobs).await?);
                let t = Instant::now();
                let deadline = t + Duration::from_secs(600);
                while undelivered(&app).await? > 0 {
                    if Instant::now() > deadline {
                        return Err(BenchError::Setup(
                            "the outbox did not empty within 10 minutes".into(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                report
                    .outbox_empty_after_s
                    .push(round(t.elapsed().as_secs_f64()));
                app.delete_webhook(hook.id, "bench").await?;
            }
            None => report.without_per_s.push(ran.process_per_s),
        }
        if !opts.keep {
            let queue = crate::job::QueueName::parse(ran.queue.as_str())
                .map_err(|e| BenchError::Setup(e.to_string()))?;
            super::remove_queue(&app, &queue).await?;
        }
        tracing::info!(
            round = round_no,
            with,
            per_s = ran.process_per_s,
            "bench webhooks round"
        );
    }
    report.delivered =
        i64::try_from(received.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(i64::MAX);
    stop.cancel();
    let _ = deliverer.await;
    report.without_median_per_s = median(&report.without_per_s);
    report.with_median_per_s = median(&report.with_per_s);
    report.ratio = super::ratio(report.with_median_per_s, report.without_median_per_s);
    report.pair_ratios = report
        .with_per_s
        .iter()
        .zip(&report.without_per_s)
        .map(|(with, without)| super::ratio(*with, *without))
        .collect();
    report.pair_ratio_median = median(&report.pair_ratios);
    Ok(report)
}
