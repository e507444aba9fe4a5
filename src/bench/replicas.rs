//! `orchestrator bench replicas`: scale-out, measured. I/O-bound `sleep`
//! jobs through 1, 2, 4, 8… worker *processes* (this binary's `worker`
//! command), each round on a queue of its own sized to the same number of
//! waves per slot, so perfect scaling keeps the span constant. Efficiency is
//! the throughput at N replicas over N times the throughput at one. Then
//! no-op jobs at 1 and 2 replicas, where every replica shares one Postgres
//! and one Valkey and the limit is theirs.
//!
//! Throughput is read from the truth: jobs over the span from the first
//! `started_at` to the last `finished_at` in Postgres, so process start-up
//! is not counted.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{median, noop_jobs, remove_queue, round, BenchError};
use crate::app::{App, AppError};
use crate::job::{JobKind, QueueName, Status};

#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// Replica counts, in order; the first is the baseline (normally 1).
    pub replicas: Vec<usize>,
    /// Slots per replica.
    pub concurrency: usize,
    /// How long each I/O-bound job sleeps.
    pub sleep_ms: u64,
    /// Jobs per slot in each round.
    pub waves: usize,
    /// No-op jobs per no-op round (at 1 and 2 replicas).
    pub noop_jobs: usize,
    pub noop_prefetch: usize,
    /// Rounds per replica count; the median span counts (the machine is
    /// noisy, and one slow process start skews a single round).
    pub repeat: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaRound {
    pub kind: &'static str,
    pub replicas: usize,
    pub jobs: usize,
    pub span_s: f64,
    pub jobs_per_s: f64,
    /// Throughput over `replicas` times the first round's of its kind.
    pub efficiency: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaReport {
    pub concurrency: usize,
    pub sleep_ms: u64,
    pub rounds: Vec<ReplicaRound>,
}

/// Worker processes, killed if the bench stops early.
struct Replicas(Vec<Child>);

impl Drop for Replicas {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub async fn run(app: &App, opts: &ReplicaOptions) -> Result<ReplicaReport, BenchError> {
    let mut rounds = Vec::new();
    let mut base = None;
    let sleep = serde_json::json!({ "ms": opts.sleep_ms });
    for &n in &opts.replicas {
        let jobs = n * opts.concurrency * opts.waves;
        let mut spans = Vec::new();
        for _ in 0..opts.repeat.max(1) {
            spans.push(round_of(app, n, opts.concurrency, 0, jobs, "sleep", &sleep).await?);
        }
        rounds.push(finish_round("sleep", n, jobs, median(&spans), &mut base));
    }
    let mut base = None;
    for n in [1, 2] {
        let mut spans = Vec::new();
        for _ in 0..opts.repeat.max(1) {
            let noop = serde_json::json!({});
            let p = opts.noop_prefetch;
            spans.push(round_of(app, n, opts.concurrency, p, opts.noop_jobs, "noop", &noop).await?);
        }
        rounds.push(finish_round(
            "noop",
            n,
            opts.noop_jobs,
            median(&spans),
            &mut base,
        ));
    }
    Ok(ReplicaReport {
        concurrency: opts.concurrency,
        sleep_ms: opts.sleep_ms,
        rounds,
    })
}

fn finish_round(
    kind: &'static str,
    replicas: usize,
    jobs: usize,
    span: f64,
    base: &mut Option<f64>,
) -> ReplicaRound {
    let per_s = jobs as f64 / span.max(f64::EPSILON);
    let one = *base.get_or_insert(per_s / replicas as f64);
    let round_ = ReplicaRound {
        kind,
        replicas,
        jobs,
        span_s: round(span),
        jobs_per_s: round(per_s),
        efficiency: round(per_s / (one * replicas as f64)),
    };
    tracing::info!(?round_, "replica round done");
    round_
}

/// One round: `jobs` jobs of `kind` into a paused queue of its own, `n`
/// worker processes on it, the queue opened, every job awaited in Postgres.
/// Returns their span in seconds.
async fn round_of(
    app: &App,
    n: usize,
    concurrency: usize,
    prefetch: usize,
    jobs: usize,
    kind: &str,
    payload: &serde_json::Value,
) -> Result<f64, BenchError> {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let queue = QueueName::parse(format!("bench-replicas-{}", &suffix[..8]))
        .unwrap_or_else(|_| unreachable!("bench queue names are valid"));
    app.queue()
        .set_paused(&queue, true)
        .await
        .map_err(AppError::from)?;
    let kind = JobKind::parse(kind).map_err(|e| BenchError::Setup(e.to_string()))?;
    let mut batch = noop_jobs(&queue, jobs);
    for job in &mut batch {
        job.kind = kind.clone();
        job.payload = payload.clone();
    }
    for chunk in batch.chunks(1000) {
        app.enqueue(chunk).await?;
    }

    let exe = std::env::current_exe().map_err(|e| BenchError::Setup(e.to_string()))?;
    let settings = app.settings();
    let mut replicas = Replicas(Vec::new());
    for _ in 0..n {
        let child = Command::new(&exe)
            .args(["worker", "--queues", queue.as_str()])
            .args(["--concurrency", &concurrency.to_string()])
            .env("ORCH_KEY_PREFIX", &settings.key_prefix)
            .env("ORCH_WORKER__PREFETCH", prefetch.to_string())
            .env(
                "ORCH_WORKER__CLAIM_BATCH",
                (concurrency + prefetch).min(1000).to_string(),
            )
            .env("ORCH_METRICS_ADDR", "off")
            .env("ORCH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Setup(format!("cannot start a worker: {e}")))?;
        replicas.0.push(child);
    }
    // Every replica registered before the queue opens: a round measures
    // N replicas, not the first one up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = app
            .queue()
            .workers()
            .await
            .map_err(AppError::from)?
            .iter()
            .filter(|w| {
                w.info
                    .get("queues")
                    .is_some_and(|q| q.split(',').any(|q| q == queue.as_str()))
            })
            .count();
        if up >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "{up} of {n} workers registered in 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.queue()
        .set_paused(&queue, false)
        .await
        .map_err(AppError::from)?;

    let pool = app.store().pool();
    let mut last_progress = (Instant::now(), i64::MAX);
    loop {
        let (left,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM jobs WHERE queue = $1 AND finished_at IS NULL")
                .bind(queue.as_str())
                .fetch_one(pool)
                .await?;
        if left == 0 {
            break;
        }
        if left < last_progress.1 {
            last_progress = (Instant::now(), left);
        } else if last_progress.0.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Stalled {
                done: jobs - left as usize,
                expected: jobs,
                waited: last_progress.0.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(replicas);
    let (succeeded, span): (i64, f64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = $2),
                COALESCE(EXTRACT(EPOCH FROM max(finished_at) - min(started_at))::float8, 0)
         FROM jobs WHERE queue = $1",
    )
    .bind(queue.as_str())
    .bind(Status::Succeeded.as_str())
    .fetch_one(pool)
    .await?;
    remove_queue(app, &queue).await?;
    if succeeded != jobs as i64 {
        return Err(BenchError::Setup(format!(
            "verification failed: {succeeded} of {jobs} jobs succeeded"
        )));
    }
    Ok(span)
}
