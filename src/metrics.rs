//! Every metric name, in one place, following Prometheus conventions
//! (`orchestrator_` prefix, base units, `_total` on counters).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter {queue, kind}: jobs written to Postgres and indexed.
pub const JOBS_ENQUEUED: &str = "orchestrator_jobs_enqueued_total";
/// Secrets redacted from agent and gate output, by rule.
pub const OUTPUT_REDACTIONS: &str = "orchestrator_output_redactions_total";
/// Counter {outcome}: CONNECT requests through the egress proxy (allowed,
/// denied, unauthenticated, bad_request, upstream_error).
pub const EGRESS_REQUESTS: &str = "orchestrator_egress_requests_total";
/// Counter {direction}: bytes carried through egress tunnels (sent, received).
pub const EGRESS_BYTES: &str = "orchestrator_egress_bytes_total";
/// Counter {queue, kind, outcome}: attempts that ended
/// (outcome: succeeded, retried, dead, released, cancelled).
pub const JOBS_FINISHED: &str = "orchestrator_jobs_finished_total";
/// Counter {queue}: failed attempts scheduled for a retry.
pub const JOB_RETRIES: &str = "orchestrator_job_retries_total";
/// Counter {queue}: jobs moved to the dead-letter state.
pub const JOBS_DEAD: &str = "orchestrator_jobs_dead_total";
/// Histogram {queue}: from due (enqueue or run_at) to start, seconds.
pub const JOB_WAIT_SECONDS: &str = "orchestrator_job_wait_seconds";
/// Histogram {queue, kind}: run time of an attempt, seconds.
pub const JOB_RUN_SECONDS: &str = "orchestrator_job_run_seconds";
/// Histogram {queue, kind, stage, outcome}: how long an agent job's
/// lifecycle stage took (spawn, git, gates, complete), seconds.
pub const STAGE_SECONDS: &str = "orchestrator_stage_duration_seconds";
/// Counter {queue}: leases that expired and were reaped.
pub const LEASE_EXPIRATIONS: &str = "orchestrator_lease_expirations_total";
/// Counter {queue}: completions refused because the lease was no longer current.
pub const STALE_COMPLETIONS: &str = "orchestrator_stale_completions_total";
/// Gauge: worker slots running a job.
pub const WORKER_SLOTS_BUSY: &str = "orchestrator_worker_slots_busy";
/// Gauge: worker slots in all (busy or not).
pub const WORKER_SLOTS: &str = "orchestrator_worker_slots";
/// Gauge {queue, state}: queue depth (pending, delayed, active), sampled.
pub const QUEUE_DEPTH: &str = "orchestrator_queue_depth";
/// Counter: ids re-indexed in Valkey by the reconciler.
pub const RECONCILER_REINDEXED: &str = "orchestrator_reconciler_reindexed_total";
/// Counter {method, route, status}: HTTP requests (route as matched).
pub const HTTP_REQUESTS: &str = "orchestrator_http_requests_total";
/// Histogram {method, route}: HTTP request duration, seconds.
pub const HTTP_REQUEST_SECONDS: &str = "orchestrator_http_request_duration_seconds";
/// Counter {task}: maintenance or worker loop errors (a service unreachable).
pub const LOOP_ERRORS: &str = "orchestrator_loop_errors_total";

/// Histogram {queue}: from a running job's cancel request to its sandbox
/// and worktree being gone.
pub const CANCEL_SECONDS: &str = "orchestrator_cancel_duration_seconds";
/// Counter {queue, stage}: jobs cancelled, by where they were (queued,
/// scheduled, claimed, spawn, git, gates, complete).
pub const CANCELLATIONS: &str = "orchestrator_cancellations_total";
/// Gauge: 1 while the kill switch is engaged (as this process last saw it).
pub const KILL_SWITCH_ENGAGED: &str = "orchestrator_kill_switch_engaged";
/// Counter {outcome}: webhook attempts, by what came of them (delivered,
/// retried, dead).
pub const WEBHOOK_DELIVERIES: &str = "orchestrator_webhook_deliveries_total";
/// Histogram: from a webhook's transition to its delivery, seconds.
pub const WEBHOOK_DELIVERY_SECONDS: &str = "orchestrator_webhook_delivery_latency_seconds";
/// Counter: delivery rows made from the transitions' fan-out rows.
pub const WEBHOOK_FANNED_OUT: &str = "orchestrator_webhook_fanned_out_total";
/// Counter {queue}: claims that found jobs waiting and no start left in
/// the queue's rate limit (jobs held by it wait in pending).
pub const RATE_LIMITED_CLAIMS: &str = "orchestrator_rate_limited_claims_total";
/// Counter {outcome}: schedule ticks, by what came of them (enqueued,
/// skipped_overlap, invalid).
pub const SCHEDULE_TICKS: &str = "orchestrator_schedule_ticks_total";
/// Counter {table, status}: rows retention deleted (jobs, job_events), by
/// the status of their job.
pub const RETENTION_PRUNED: &str = "orchestrator_retention_pruned_rows_total";
/// Gauge: how long the oldest undelivered webhook has waited, seconds.
pub const WEBHOOK_OLDEST_UNDELIVERED: &str = "orchestrator_webhook_oldest_undelivered_age_seconds";
/// Gauge: 1 while this process's deliverer defers fresh webhooks because a
/// worker pool is saturated with short jobs.
pub const WEBHOOK_DEFERRING: &str = "orchestrator_webhook_deferring";

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
];

/// Installs the global recorder once per process and describes every
/// metric; later calls return the same handle.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_ok() {
        describe();
        let _ = HANDLE.set(handle.clone());
        // Histogram samples are folded only by upkeep (or a scrape): a
        // process nobody scrapes must not buffer them without bound. A
        // thread, so it runs whatever runtime (if any) the caller has.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            })
            .map_err(|e| {
                metrics_exporter_prometheus::BuildError::FailedToCreateHTTPListener(e.to_string())
            })?;
        Ok(handle)
    } else {
        // Lost a race with another caller: use theirs.
        Ok(HANDLE.get().cloned().unwrap_or(handle))
    }
}

fn describe() {
    describe_counter!(JOBS_ENQUEUED, "Jobs enqueued.");
    describe_counter!(
        EGRESS_REQUESTS,
        "CONNECT requests through the sandbox egress proxy, by outcome."
    );
    describe_counter!(
        EGRESS_BYTES,
        Unit::Bytes,
        "Bytes carried through sandbox egress tunnels, by direction."
    );
    describe_counter!(
        OUTPUT_REDACTIONS,
        "Secrets redacted from agent and gate output before it was stored, by rule."
    );
    describe_counter!(JOBS_FINISHED, "Job attempts that ended, by outcome.");
    describe_histogram!(
        CANCEL_SECONDS,
        Unit::Seconds,
        "From a running job's cancel request to its sandbox being gone."
    );
    describe_counter!(CANCELLATIONS, "Jobs cancelled, by stage.");
    describe_gauge!(KILL_SWITCH_ENGAGED, "1 while the kill switch is engaged.");
    describe_counter!(
        RATE_LIMITED_CLAIMS,
        "Claims that found jobs waiting and the queue's rate limit spent."
    );
    describe_counter!(
        RETENTION_PRUNED,
        "Rows retention deleted, by table (jobs, job_events) and job status."
    );
    describe_counter!(
        SCHEDULE_TICKS,
        "Schedule ticks, by outcome (enqueued, skipped_overlap, invalid)."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Webhook attempts, by outcome (delivered, retried, dead)."
    );
    describe_counter!(
        WEBHOOK_FANNED_OUT,
        "Delivery rows made from the transitions' outbox (one per event and URL)."
    );
    describe_histogram!(
        WEBHOOK_DELIVERY_SECONDS,
        Unit::Seconds,
        "From a webhook's transition to its delivery."
    );
    describe_gauge!(
        WEBHOOK_OLDEST_UNDELIVERED,
        Unit::Seconds,
        "How long the oldest undelivered webhook has waited."
    );
    describe_gauge!(
        WEBHOOK_DEFERRING,
        "1 while fresh webhooks wait because a worker pool is saturated with short jobs."
    );
    describe_counter!(JOB_RETRIES, "Failed attempts scheduled for a retry.");
    describe_counter!(JOBS_DEAD, "Jobs dead-lettered after their last attempt.");
    describe_histogram!(JOB_WAIT_SECONDS, Unit::Seconds, "Time from due to start.");
    describe_histogram!(JOB_RUN_SECONDS, Unit::Seconds, "Run time of an attempt.");
    describe_counter!(LEASE_EXPIRATIONS, "Leases that expired and were reaped.");
    describe_counter!(STALE_COMPLETIONS, "Completions refused for a stale lease.");
    describe_gauge!(WORKER_SLOTS_BUSY, "Worker slots running a job.");
    describe_histogram!(
        STAGE_SECONDS,
        Unit::Seconds,
        "How long an agent job's lifecycle stage took."
    );
    describe_gauge!(WORKER_SLOTS, "Worker slots in all.");
    describe_gauge!(
        QUEUE_DEPTH,
        "Jobs in a queue by state, sampled: pending (due, not held back by a limit), delayed, active, held (by a concurrency key or its rate limit), rate_limited (by the queue's rate limit)."
    );
    describe_counter!(
        RECONCILER_REINDEXED,
        "Ids re-indexed in Valkey from Postgres."
    );
    describe_counter!(LOOP_ERRORS, "Errors in worker and maintenance loops.");
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route and status.");
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "HTTP request duration."
    );
}

/// Records whether the kill switch is engaged.
pub fn set_kill_switch(engaged: bool) {
    metrics::gauge!(KILL_SWITCH_ENGAGED).set(if engaged { 1.0 } else { 0.0 });
}

/// Records how long a cancel took, from its request (Unix ms) to now.
pub fn record_cancel_duration(queue: &str, requested_ms: i64) {
    let waited = (chrono::Utc::now().timestamp_millis() - requested_ms).max(0) as f64 / 1000.0;
    metrics::histogram!(CANCEL_SECONDS, "queue" => queue.to_owned()).record(waited);
}

/// Counts a cancelled job by the stage it was in.
pub fn count_cancel(queue: &str, stage: &str) {
    metrics::counter!(CANCELLATIONS, "queue" => queue.to_owned(), "stage" => stage.to_owned())
        .increment(1);
}

/// A queue's jobs by the state `orchestrator_queue_depth` names.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueDepth {
    /// Due and not held back by a limit.
    pub pending: u64,
    pub delayed: u64,
    pub active: u64,
    /// Waiting because their concurrency key is at its limit (or out of
    /// starts under its key's rate limit).
    pub held: u64,
    /// Due, but waiting for the queue's rate limit to allow a start.
    pub rate_limited: u64,
}

/// Records a queue's depth (the same value from every process that reads
/// it: aggregate with `max by (queue, state)`, never `sum`). `held` and
/// `rate_limited` are the jobs held back by a limit.
pub fn set_queue_depth(queue: &str, depth: QueueDepth) {
    for (state, value) in [
        ("pending", depth.pending),
        ("delayed", depth.delayed),
        ("active", depth.active),
        ("held", depth.held),
        ("rate_limited", depth.rate_limited),
    ] {
        metrics::gauge!(QUEUE_DEPTH, "queue" => queue.to_owned(), "state" => state)
            .set(value as f64);
    }
}

/// Records how many worker slots are busy.
pub fn set_busy(busy: usize) {
    metrics::gauge!(WORKER_SLOTS_BUSY).set(busy as f64);
}
