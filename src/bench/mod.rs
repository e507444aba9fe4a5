//! Benchmarks, one `orchestrator bench <what>` each: `queue` (here),
//! `lifecycle`, `git`, `sandbox`, `cancel`, `webhooks`, `retention` and `replicas` (the submodules). They are a
//! front end: they drive the app, and the adapters they measure.
//!
//! `orchestrator bench queue`: throughput and latency through the real path
//! (Postgres transitions and events, Valkey claims and acks), on a queue of
//! its own, verified against Postgres at the end.

pub mod cancel;
pub mod git;
pub mod lifecycle;
pub mod replicas;
pub mod retention;
pub mod sandbox;
pub mod webhooks;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::{App, AppError};
use crate::job::{JobId, JobKind, NewJob, Priority, QueueName, Status};
use crate::worker::PoolEvent;

/// The identity and default branch the benchmarks' own git runs use.
const GIT_IDENTITY: [&str; 6] = [
    "-c",
    "user.name=bench",
    "-c",
    "user.email=bench@localhost",
    "-c",
    "init.defaultBranch=main",
];

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// No-op jobs enqueued in bulk, then drained.
    pub jobs: usize,
    /// Worker slots.
    pub concurrency: usize,
    /// Jobs claimed ahead of free slots.
    pub prefetch: usize,
    /// Jobs per enqueue call.
    pub enqueue_batch: usize,
    /// Jobs enqueued one at a time into an idle pool to measure latency.
    pub latency_jobs: usize,
    /// Rate of those single enqueues, per second.
    pub latency_rate: u32,
    /// Keep the bench jobs in the database afterwards.
    pub keep: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The queue it ran on (its own, made for the run).
    pub queue: String,
    pub jobs: usize,
    pub concurrency: usize,
    pub prefetch: usize,
    pub enqueue_per_s: f64,
    pub process_per_s: f64,
    /// Enqueue call to handler start, single jobs into an idle pool.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Jobs found `succeeded` in Postgres afterwards.
    pub verified_succeeded: i64,
    /// Events recorded for them (enqueued, started, succeeded: 3 per job).
    pub verified_events: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("bench setup: {0}")]
    Setup(String),
    #[error("bench stalled: {done} of {expected} jobs finished after {waited:?}")]
    Stalled {
        done: usize,
        expected: usize,
        waited: Duration,
    },
}

fn noop_jobs(queue: &QueueName, n: usize) -> Vec<NewJob> {
    let kind = JobKind::parse("noop").unwrap_or_else(|_| unreachable!("noop is a valid kind"));
    (0..n)
        .map(|_| NewJob {
            id: JobId::new(),
            queue: queue.clone(),
            kind: kind.clone(),
            priority: Priority::DEFAULT,
            payload: serde_json::json!({}),
            retry: crate::job::RetryPolicy {
                max_attempts: 3,
                backoff_base_ms: 1000,
                backoff_cap_ms: 60_000,
            },
            timeout_secs: 60,
            run_at: None,
            idempotency_key: None,
            actor: "bench".to_owned(),
            yolo: false,
            metadata: serde_json::json!({}),
            callback_url: None,
            unique: None,
            concurrency: None,
            schedule: None,
        })
        .collect()
}

/// The `p`th percentile (nearest rank) of sorted samples, 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Waits until `expected` jobs reached a terminal status, as reported by the pool.
async fn drain(
    events: &mut mpsc::UnboundedReceiver<PoolEvent>,
    expected: usize,
    mut on_start: impl FnMut(&[JobId]),
) -> Result<(), BenchError> {
    let mut done = 0;
    let started = Instant::now();
    let idle_limit = Duration::from_secs(60);
    while done < expected {
        match tokio::time::timeout(idle_limit, events.recv()).await {
            Ok(Some(PoolEvent::Finished(ids))) => {
                done += ids.iter().filter(|(_, s)| s.is_terminal()).count();
            }
            Ok(Some(PoolEvent::Started(ids))) => on_start(&ids),
            Ok(Some(PoolEvent::Stale(_) | PoolEvent::Reconciled(_) | PoolEvent::CancelSeen(_))) => {
            }
            Ok(None) | Err(_) => {
                return Err(BenchError::Stalled {
                    done,
                    expected,
                    waited: started.elapsed(),
                })
            }
        }
    }
    Ok(())
}

pub async fn run(app: &App, opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let queue = QueueName::parse(format!("bench-{}", &suffix[..8]))
        .unwrap_or_else(|_| unreachable!("bench queue names are valid"));

    // Phase 1: bulk enqueue, into a paused queue.
    app.queue()
        .set_paused(&queue, true)
        .await
        .map_err(AppError::from)?;
    let jobs = noop_jobs(&queue, opts.jobs);
    let t0 = Instant::now();
    for chunk in jobs.chunks(opts.enqueue_batch.max(1)) {
        app.enqueue(chunk).await?;
    }
    let enqueue_secs = t0.elapsed().as_secs_f64();

    // Phase 2: drain through a pool, timed from the moment the queue opens.
    // The pool starts first and finishes its start-up reconcile pass (which
    // reads every unfinished job once), so the figure is the steady state.
    let mut cfg = app.settings().pool_config();
    cfg.queues = vec![queue.clone()];
    cfg.concurrency = opts.concurrency;
    cfg.prefetch = opts.prefetch;
    cfg.claim_batch = (opts.concurrency + opts.prefetch).min(1000);
    let (tx, mut events) = mpsc::unbounded_channel();
    let pool = app.pool(cfg).with_observer(tx);
    let stop = CancellationToken::new();
    let handle = tokio::spawn(pool.run(stop.clone()));
    loop {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
            Ok(Some(PoolEvent::Reconciled(_))) => break,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                return Err(BenchError::Stalled {
                    done: 0,
                    expected: opts.jobs,
                    waited: Duration::from_secs(60),
                })
            }
        }
    }
    let t1 = Instant::now();
    app.queue()
        .set_paused(&queue, false)
        .await
        .map_err(AppError::from)?;
    drain(&mut events, opts.jobs, |_| {}).await?;
    let process_secs = t1.elapsed().as_secs_f64();

    // Phase 3: latency of single jobs into the idle pool. A collector task
    // timestamps starts as they happen while this task enqueues.
    let expected = opts.latency_jobs;
    let collector = tokio::spawn(async move {
        let mut starts: HashMap<JobId, Instant> = HashMap::new();
        let result = drain(&mut events, expected, |ids| {
            let now = Instant::now();
            for id in ids {
                starts.insert(*id, now);
            }
        })
        .await;
        result.map(|()| starts)
    });
    let gap = Duration::from_secs_f64(1.0 / f64::from(opts.latency_rate.max(1)));
    let mut ticker = tokio::time::interval(gap);
    let mut sent: HashMap<JobId, Instant> = HashMap::new();
    for job in noop_jobs(&queue, opts.latency_jobs) {
        ticker.tick().await;
        sent.insert(job.id, Instant::now());
        app.enqueue(std::slice::from_ref(&job)).await?;
    }
    let starts = collector.await.map_err(|_| BenchError::Stalled {
        done: 0,
        expected,
        waited: Duration::ZERO,
    })??;
    let mut latencies: Vec<f64> = sent
        .iter()
        .filter_map(|(id, t)| {
            starts
                .get(id)
                .map(|s| s.duration_since(*t).as_secs_f64() * 1000.0)
        })
        .collect();
    stop.cancel();
    let _ = handle.await;
    latencies.sort_by(f64::total_cmp);

    // Verify against the truth.
    let total = opts.jobs + opts.latency_jobs;
    let (succeeded, events_count): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE queue = $1 AND status = $2),
                (SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE j.queue = $1)",
    )
    .bind(queue.as_str())
    .bind(Status::Succeeded.as_str())
    .fetch_one(app.store().pool())
    .await?;
    if !opts.keep {
        remove_queue(app, &queue).await?;
    }
    tracing::info!(
        total,
        succeeded,
        events = events_count,
        "bench verified against Postgres"
    );
    Ok(BenchReport {
        queue: queue.as_str().to_owned(),
        jobs: opts.jobs,
        concurrency: opts.concurrency,
        prefetch: opts.prefetch,
        enqueue_per_s: round(opts.jobs as f64 / enqueue_secs),
        process_per_s: round(opts.jobs as f64 / process_secs),
        latency_p50_ms: round(percentile(&latencies, 50.0)),
        latency_p99_ms: round(percentile(&latencies, 99.0)),
        verified_succeeded: succeeded,
        verified_events: events_count,
    })
}

/// Removes a bench queue's finished jobs, their events and webhook rows
/// (through `prune_finished_jobs()`, the only way the trail's guard lets
/// events be deleted), and its Valkey keys.
pub async fn remove_queue(app: &App, queue: &QueueName) -> Result<(), BenchError> {
    let pool = app.store().pool();
    for status in [Status::Succeeded, Status::Dead, Status::Cancelled] {
        loop {
            let jobs: i64 = sqlx::query_scalar(
                "SELECT pruned_jobs FROM prune_finished_jobs($1, 'infinity', 50000, $2)",
            )
            .bind(status.as_str())
            .bind(queue.as_str())
            .fetch_one(pool)
            .await?;
            if jobs == 0 {
                break;
            }
        }
    }
    // What did not finish (a round that stalled) is left in Postgres and
    // said so; the trail keeps it, as it keeps every unfinished job.
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1 AND finished_at IS NULL")
            .bind(queue.as_str())
            .fetch_one(pool)
            .await?;
    if left > 0 {
        tracing::warn!(queue = %queue, unfinished = left, "bench queue removed with unfinished jobs left in Postgres");
    }
    app.queue()
        .drop_queue(queue)
        .await
        .map_err(AppError::from)?;
    Ok(())
}

/// The middle of the samples (the upper one of an even count); 0 for none.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// Rounded to two decimals, for reports.
pub fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The `p`th percentile of sorted samples, rounded for reports.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    round(percentile(sorted, p))
}

/// `a / b` rounded for reports; 0 when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        round(a / b)
    } else {
        0.0
    }
}
