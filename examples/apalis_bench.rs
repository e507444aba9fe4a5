//! The apalis-redis peer's benchmark (`../shared/peers/rust/apalis-redis-bench`)
//! on orchestrator: the same apalis 1.0 worker and no-op handler, N tasks
//! pushed with `push_bulk`, one worker of concurrency CONC. Every task here
//! is a Postgres row with fenced transitions and audit events.
//!
//! Env: N (20000), CONC (50), PREFETCH (500), and the `ORCH_*` settings.
//! Prints one JSON line; `scripts/bench-apalis.sh` runs it beside the peer.
//!
//! The system allocator, as the peer's: the allocator is the application's
//! choice, not the backend's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use apalis::prelude::*;
use orchestrator::apalis::{Config, OrchestratorStorage};
use orchestrator::app::App;
use orchestrator::config::Settings;

static DONE: AtomicUsize = AtomicUsize::new(0);
static TARGET: AtomicUsize = AtomicUsize::new(0);
static LAST_HANDLER: OnceLock<Instant> = OnceLock::new();

const KIND: &str = "apalis-bench";

fn env_usize(key: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{key}={v}: not a number")),
        Err(_) => Ok(default),
    }
}

/// The peer's handler: counts, and stops the worker at the last task.
async fn noop(_task: u32, worker: WorkerContext) -> Result<(), BoxDynError> {
    let n = DONE.fetch_add(1, Ordering::Relaxed) + 1;
    if n == TARGET.load(Ordering::Relaxed) {
        let _ = LAST_HANDLER.set(Instant::now());
        worker.stop()?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    orchestrator::telemetry::init();
    let n = env_usize("N", 20_000)?;
    let conc = env_usize("CONC", 50)?;
    let prefetch = env_usize("PREFETCH", 500)?;
    TARGET.store(n, Ordering::Relaxed);

    let app = App::connect(Settings::load(None)?).await?;
    app.migrate().await?;
    let queue = format!("apalis-bench-{}", std::process::id());
    let config = Config::new(KIND)?
        .queue(&queue)?
        .concurrency(conc)?
        .prefetch(prefetch)
        .claim_batch((conc + prefetch).min(1000))?;
    let mut storage = OrchestratorStorage::<u32>::new(app.clone(), config);

    let t0 = Instant::now();
    let tasks: Vec<u32> = (0..n as u32).collect();
    storage.push_bulk(tasks).await?;
    let enqueue = t0.elapsed();

    let worker = WorkerBuilder::new(format!("bench-worker-{}", std::process::id()))
        .backend(storage)
        .concurrency(conc)
        .build(noop);
    let t1 = Instant::now();
    tokio::time::timeout(Duration::from_secs(600), worker.run())
        .await
        .context("the worker did not finish within 600 s")??;
    let exit = t1.elapsed();
    let handlers = LAST_HANDLER
        .get()
        .map(|t| t.duration_since(t1))
        .unwrap_or(exit);

    // Verified against Postgres: every task succeeded, with its events.
    let (succeeded, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE queue = $1 AND status = 'succeeded'),
                (SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE j.queue = $1)",
    )
    .bind(&queue)
    .fetch_one(app.store().pool())
    .await?;
    anyhow::ensure!(
        succeeded == n as i64,
        "{succeeded} of {n} tasks succeeded in Postgres"
    );
    orchestrator::bench::remove_queue(&app, &queue.parse()?).await?;
    let rate = |d: Duration| (n as f64 / d.as_secs_f64()).round();
    println!(
        "{}",
        serde_json::json!({
            "system": "orchestrator (apalis backend)",
            "jobs": n,
            "concurrency": conc,
            "prefetch": prefetch,
            "enqueue_per_s": rate(enqueue),
            "handlers_per_s": rate(handlers),
            "process_per_s": rate(exit),
            "verified_succeeded": succeeded,
            "verified_events": events,
        })
    );
    Ok(())
}
