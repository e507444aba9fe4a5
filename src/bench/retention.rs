//! `orchestrator bench retention`: what pruning costs the queue. A million
//! (`--jobs`) finished jobs, three events each, are written as if they had
//! finished two days ago; then rounds of `bench queue` (no-op jobs)
//! alternate without pruning and with the retention service pruning those
//! jobs beside them, in one sitting. The figure is the ratio of the median
//! throughputs (the goal: at least 0.9), with the rows pruned meanwhile.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{median, round, BenchError, BenchOptions};
use crate::app::App;
use crate::app::RetentionConfig;
use crate::config::Settings;

#[derive(Debug, Serialize)]
pub struct RetentionBench {
    pub rounds: usize,
    /// Finished jobs written to be pruned.
    pub seeded: u64,
    pub seed_s: f64,
    pub jobs: usize,
    pub without_per_s: Vec<f64>,
    pub with_per_s: Vec<f64>,
    pub without_median_per_s: f64,
    pub with_median_per_s: f64,
    /// with / without.
    pub ratio: f64,
    /// Jobs and events pruned during the rounds with pruning.
    pub pruned_jobs: u64,
    pub pruned_events: u64,
    /// Jobs pruned per second while a round ran.
    pub pruned_jobs_per_s: f64,
}

/// Writes `n` succeeded jobs of `queue` that finished two days ago, with
/// the three events a no-op job leaves, in chunks.
async fn seed(app: &App, queue: &str, n: u64) -> Result<(), BenchError> {
    const CHUNK: u64 = 50_000;
    let pool = app.store().pool();
    let mut done = 0;
    while done < n {
        let k = CHUNK.min(n - done) as i64;
        sqlx::query(
            "WITH j AS (
                INSERT INTO jobs (id, queue, kind, status, priority, max_attempts, backoff_base_ms,
                    backoff_cap_ms, timeout_secs, attempt, run_at, created_at, started_at,
                    finished_at, updated_at)
                SELECT gen_random_uuid(), $1, 'noop', 'succeeded', 5, 3, 1000, 60000, 60, 1,
                    t, t, t, t, t
                FROM generate_series(1, $2) AS g, LATERAL (SELECT now() - interval '2 days' AS t) AS c
                RETURNING id, finished_at
             )
             INSERT INTO job_events (job_id, at, type, actor, data)
             SELECT j.id, j.finished_at, e.type, 'bench', '{}'::jsonb
             FROM j, (VALUES ('enqueued'), ('started'), ('succeeded')) AS e(type)",
        )
        .bind(queue)
        .bind(k)
        .execute(pool)
        .await?;
        done += k as u64;
    }
    Ok(())
}

/// Runs `rounds` pairs over `seeded` jobs to prune; `settings` name the
/// services. The pools' own retention is off, so only the measured pruner
/// deletes.
pub async fn run(
    mut settings: Settings,
    opts: &BenchOptions,
    rounds: usize,
    seeded: u64,
) -> Result<RetentionBench, BenchError> {
    // The measured pruner paces itself as the service would.
    let batch_pause = Duration::from_millis(settings.retention.batch_pause_ms);
    let batch = settings.retention.batch.max(1);
    settings.retention.succeeded_secs = 0;
    settings.retention.cancelled_secs = 0;
    settings.retention.dead_secs = 0;
    let app = App::connect(settings).await?;
    app.ensure_migrated().await?;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let seed_queue = format!("bench-retention-{}", &suffix[..8]);
    let t = Instant::now();
    seed(&app, &seed_queue, seeded).await?;
    let seed_s = round(t.elapsed().as_secs_f64());
    tracing::info!(seeded, seed_s, "bench retention: seeded");
    let cfg = RetentionConfig {
        succeeded: Some(Duration::from_secs(86400)),
        cancelled: None,
        dead: None,
        batch,
        max_batches: 1,
        batch_pause,
        interval: Duration::from_millis(1),
    };
    let mut report = RetentionBench {
        rounds,
        seeded,
        seed_s,
        jobs: opts.jobs,
        without_per_s: Vec::new(),
        with_per_s: Vec::new(),
        without_median_per_s: 0.0,
        with_median_per_s: 0.0,
        ratio: 0.0,
        pruned_jobs: 0,
        pruned_events: 0,
        pruned_jobs_per_s: 0.0,
    };
    let mut pruning_secs = 0.0;
    for round_no in 0..rounds * 2 {
        let with = (round_no % 2 == 0) == (round_no / 2 % 2 == 0);
        let stop = CancellationToken::new();
        let pruner = with.then(|| {
            let app = app.clone();
            let cfg = cfg.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut jobs, mut events) = (0, 0);
                while !stop.is_cancelled() {
                    match app.prune_finished_jobs(&cfg).await {
                        Ok(c) if c.jobs == 0 => break,
                        Ok(c) => {
                            jobs += c.jobs;
                            events += c.events;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "bench retention: prune failed");
                            break;
                        }
                    }
                }
                (jobs, events)
            })
        });
        let t = Instant::now();
        let ran = super::run(&app, opts).await?;
        stop.cancel();
        if let Some(pruner) = pruner {
            let (jobs, events) = pruner
                .await
                .map_err(|e| BenchError::Setup(format!("the pruner: {e}")))?;
            pruning_secs += t.elapsed().as_secs_f64();
            report.pruned_jobs += jobs;
            report.pruned_events += events;
            report.with_per_s.push(ran.process_per_s);
            if jobs == 0 {
                return Err(BenchError::Setup(
                    "nothing was left to prune during a round; seed more jobs (--seed-jobs)".into(),
                ));
            }
        } else {
            report.without_per_s.push(ran.process_per_s);
        }
        tracing::info!(
            round = round_no,
            with,
            per_s = ran.process_per_s,
            "bench retention round"
        );
    }
    // What is left of the seeded jobs goes too.
    let all = RetentionConfig {
        max_batches: u32::MAX,
        batch: 5000,
        batch_pause: Duration::ZERO,
        ..cfg
    };
    app.prune_finished_jobs(&all).await?;
    report.without_median_per_s = median(&report.without_per_s);
    report.with_median_per_s = median(&report.with_per_s);
    report.ratio = super::ratio(report.with_median_per_s, report.without_median_per_s);
    report.pruned_jobs_per_s = round(report.pruned_jobs as f64 / pruning_secs.max(1e-9));
    Ok(report)
}
