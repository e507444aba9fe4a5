//! Running a kind's sandbox, and its gates', with output streaming into
//! the job's events (capped: past the budget only the tail is kept, and
//! how much was dropped is recorded); secrets named by the kind come from
//! the worker's environment at start only.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::host::{SandboxHost, Unavailable};
use crate::job::Progress;
use crate::pipeline::gates::{GateDef, GateType};
use crate::pipeline::kinds::{KindDef, SCRIPT_PLACEHOLDER, TASK_PLACEHOLDER};
use crate::pipeline::{JobContext, JobError};
use crate::sandbox::egress::EgressGrant;
use crate::sandbox::{
    BindMount, Finished, LogCap, LogLine, Network, Outcome, Owner, RunOptions, SandboxSpec,
};
use crate::secret::Secret;
use crate::store::ProgressWrite;

/// Log events are written in batches of this many lines, or sooner.
const LOG_BATCH: usize = 200;
const LOG_FLUSH: Duration = Duration::from_millis(250);

/// Runs the kind's sandbox with `text` as its script, `workspace` mounted at
/// /workspace; output streams into the job's events.
pub(super) async fn run_sandbox(
    def: &KindDef,
    host: &SandboxHost,
    ctx: &JobContext,
    text: &str,
    workspace: Option<BindMount>,
) -> Result<(Finished, Value, &'static str), JobError> {
    let job = &ctx.job;
    let mut secrets = BTreeMap::new();
    for name in &def.secrets {
        let value = std::env::var(name).map_err(|_| {
            JobError::Failed(format!(
                "this worker has no {name} in its environment; kind {} needs it",
                def.kind
            ))
        })?;
        secrets.insert(name.clone(), Secret::new(value));
    }
    let grant = with_egress(def, host, ctx, def.network, &mut secrets).await?;
    let mut env = def.env.clone();
    env.insert("ORCH_JOB_ID".into(), job.id.to_string());
    env.insert("ORCH_ATTEMPT".into(), job.attempt.to_string());
    let command = def
        .command
        .iter()
        .map(|arg| {
            if arg == SCRIPT_PLACEHOLDER || arg == TASK_PLACEHOLDER {
                text.to_owned()
            } else {
                arg.clone()
            }
        })
        .collect();
    let timeout = Duration::from_secs(def.timeout_secs.min(u64::from(job.timeout_secs)));
    let grace = Duration::from_secs(def.stop_grace_secs);
    let spec = SandboxSpec {
        name: format!("orch-{}-{}", job.id, job.attempt),
        image: def.image.clone(),
        command,
        env,
        secrets,
        workspace,
        mounts: Vec::new(),
        limits: def.limits,
        network: def.network,
        owner: owner(host, ctx, timeout + grace * 2),
    };
    let runtime = host
        .runtime()
        .await
        .map_err(|e| JobError::Failed(e.to_string()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_logs(
        ctx.clone(),
        host.clone(),
        rx,
        LogCap::new(host.log_budget_bytes, host.log_tail_bytes),
    ));
    let finished = runtime
        .run(
            &spec,
            RunOptions {
                timeout,
                stop_grace: grace,
            },
            tx,
            ctx.cancel.clone(),
        )
        .await;
    let log = writer.await.unwrap_or_default();
    report_egress(ctx, grant).await;
    let finished = finished.map_err(|e| JobError::Failed(format!("sandbox failed: {e}")))?;
    Ok((finished, log, runtime.name()))
}

/// Who a sandbox of this job belongs to; it counts as an orphan once
/// `runs_for` (its timeout and stop grace) and a minute more have passed.
fn owner(host: &SandboxHost, ctx: &JobContext, runs_for: Duration) -> Owner {
    let now = chrono::Utc::now();
    Owner {
        deployment: host.deployment.clone(),
        host: host.host_name.clone(),
        job_id: ctx.job.id,
        attempt: ctx.job.attempt,
        worker_id: ctx.worker_id.to_string(),
        created_at: now,
        expires_at: now
            + chrono::Duration::from_std(runs_for + Duration::from_secs(60))
                .unwrap_or(chrono::Duration::hours(24)),
    }
}

/// For a `network = "egress"` sandbox: a proxy grant, its URL passed in as
/// `HTTPS_PROXY` (with the secrets: it holds the grant's token).
async fn with_egress(
    def: &KindDef,
    host: &SandboxHost,
    ctx: &JobContext,
    network: Network,
    secrets: &mut BTreeMap<String, Secret>,
) -> Result<Option<EgressGrant>, JobError> {
    if network != Network::Egress {
        return Ok(None);
    }
    let grant = host
        .egress_grant(ctx.job.id, &def.egress)
        .await
        .map_err(|e| match e {
            // Configuration, not a passing fault: retrying cannot help.
            Unavailable::LocalEgress => JobError::Fatal(e.to_string()),
            e => JobError::Failed(e.to_string()),
        })?;
    for var in ["HTTPS_PROXY", "https_proxy"] {
        secrets.insert(var.to_owned(), Secret::new(grant.proxy_url()));
    }
    Ok(Some(grant))
}

/// Ends a sandbox's grant (cutting any tunnel left) and records what the
/// proxy refused it, if anything.
async fn report_egress(ctx: &JobContext, grant: Option<EgressGrant>) {
    let Some(grant) = grant else { return };
    let denied = grant.denied();
    drop(grant);
    if denied.is_empty() {
        return;
    }
    if let Err(err) = ctx
        .append_events(&[("egress_denied", json!({ "targets": denied }))])
        .await
    {
        tracing::warn!(job.id = %ctx.job.id, error = %err, "could not record refused egress");
    }
}

/// Most output lines kept from a gate for judging it.
const GATE_OUTPUT_LINES: usize = 5_000;

/// Runs a gate's command in a fresh sandbox with `mounts` (the committed
/// tree read-only at /workspace, and for a reviewer the diff); returns how
/// it ended and its output (the last [`GATE_OUTPUT_LINES`] lines).
pub(super) async fn run_gate(
    def: &KindDef,
    host: &SandboxHost,
    ctx: &JobContext,
    gate: &GateDef,
    index: usize,
    workspace: BindMount,
    mounts: Vec<BindMount>,
) -> Result<(Finished, Vec<String>), JobError> {
    let job = &ctx.job;
    // Only a reviewer may need the kind's secrets (an LLM API key).
    let mut secrets = BTreeMap::new();
    if gate.kind == GateType::AiReview {
        for name in &def.secrets {
            if let Ok(value) = std::env::var(name) {
                secrets.insert(name.clone(), Secret::new(value));
            }
        }
    }
    let network = if gate.kind == GateType::AiReview {
        def.network
    } else {
        Network::None
    };
    let grant = with_egress(def, host, ctx, network, &mut secrets).await?;
    let grace = Duration::from_secs(def.stop_grace_secs);
    let spec = SandboxSpec {
        name: format!("orch-{}-{}-gate{index}", job.id, job.attempt),
        image: gate.image.clone().unwrap_or_else(|| def.image.clone()),
        command: gate.command.clone(),
        env: BTreeMap::from([
            ("ORCH_JOB_ID".to_owned(), job.id.to_string()),
            ("ORCH_GATE".to_owned(), gate.name.clone()),
        ]),
        secrets,
        workspace: Some(workspace),
        mounts,
        limits: def.limits,
        network,
        owner: owner(host, ctx, gate.timeout() + grace * 2),
    };
    let runtime = host
        .runtime()
        .await
        .map_err(|e| JobError::Failed(e.to_string()))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<LogLine>();
    let redactor = host.clone();
    let collect = tokio::spawn(async move {
        let mut lines = std::collections::VecDeque::new();
        while let Some(mut line) = rx.recv().await {
            redactor.redact(&mut line);
            if lines.len() == GATE_OUTPUT_LINES {
                lines.pop_front();
            }
            lines.push_back(line.text);
        }
        lines.into_iter().collect::<Vec<_>>()
    });
    let finished = runtime
        .run(
            &spec,
            RunOptions {
                timeout: gate.timeout(),
                stop_grace: grace,
            },
            tx,
            ctx.cancel.clone(),
        )
        .await;
    report_egress(ctx, grant).await;
    let finished =
        finished.map_err(|e| JobError::Failed(format!("gate {} could not run: {e}", gate.name)))?;
    let output = collect.await.unwrap_or_default();
    Ok((finished, output))
}

/// The job's result for a sandbox run, or why the attempt failed.
pub(super) fn outcome_result(
    def: &KindDef,
    finished: Finished,
    log: Value,
    runtime: &str,
) -> Result<Value, JobError> {
    let result = json!({
        "runtime": runtime,
        "outcome": finished.outcome,
        "duration_ms": u64::try_from(finished.duration.as_millis()).unwrap_or(u64::MAX),
        "log": log,
    });
    let asked = result["log"]["retry_after_secs"].as_u64();
    let throttled = |code: i64| {
        def.throttle
            .filter(|t| asked.is_some() || t.exit_code == Some(code))
    };
    match finished.outcome {
        Outcome::Exited { code: 0 } => Ok(result),
        Outcome::Exited { code } if throttled(code).is_some() => {
            let t = throttled(code).unwrap_or_default();
            let delay = t.delay(asked);
            Err(JobError::Throttled {
                message: format!(
                    "the agent was throttled (exit code {code}); it runs again in {}s",
                    delay.as_secs()
                ),
                retry_after: delay,
                counts_attempt: t.counts_attempt,
            })
        }
        Outcome::Exited { code } => Err(JobError::Failed(format!(
            "the script exited with code {code}"
        ))),
        Outcome::OomKilled => Err(JobError::Failed(format!(
            "the sandbox ran out of memory ({} MiB)",
            def.limits.memory_bytes / 1024 / 1024
        ))),
        Outcome::TimedOut => Err(JobError::Failed(format!(
            "timed out after {}s",
            def.timeout_secs
        ))),
        Outcome::Stopped { .. } => Err(JobError::Interrupted),
    }
}

/// Writes output lines as `log` events in batches while the sandbox runs;
/// once the budget is spent, records a `log_truncated` event with the tail.
async fn write_logs(
    ctx: JobContext,
    host: SandboxHost,
    mut rx: mpsc::UnboundedReceiver<LogLine>,
    mut cap: LogCap,
) -> Value {
    let mut batch: Vec<(&'static str, Value)> = Vec::new();
    let mut ticker = tokio::time::interval(LOG_FLUSH);
    let mut progress = Coalesced::default();
    let mut retry_after = None;
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some(mut line) => {
                    host.redact(&mut line);
                    // `::retry-after::<seconds>`: the agent was throttled.
                    if let Some(secs) = crate::job::parse_retry_after(&line.text) {
                        retry_after = Some(secs);
                    }
                    // `::progress::<0-100> <message>` is progress, not a log line.
                    if let Some(p) = Progress::parse(&line.text, chrono::Utc::now()) {
                        progress.latest = Some(p);
                        progress.lines += 1;
                        progress.bytes += line.text.len() as u64;
                        continue;
                    }
                    if let Some(line) = cap.accept(line) {
                        batch.push(("log", json!({ "stream": line.stream, "line": line.text })));
                    }
                    if batch.len() >= LOG_BATCH {
                        flush(&ctx, &mut batch).await;
                    }
                }
                None => break,
            },
            _ = ticker.tick() => {
                flush(&ctx, &mut batch).await;
                progress.write_if_due(&ctx, false).await;
            }
        }
    }
    flush(&ctx, &mut batch).await;
    progress.write_if_due(&ctx, true).await;
    let summary = cap.finish();
    if summary.dropped_bytes > 0 || !summary.tail.is_empty() {
        let event = json!({
            "emitted_bytes": summary.emitted_bytes,
            "dropped_bytes": summary.dropped_bytes,
            "tail": summary.tail,
        });
        batch.push(("log_truncated", event));
        flush(&ctx, &mut batch).await;
    }
    json!({
        "emitted_bytes": summary.emitted_bytes,
        "dropped_bytes": summary.dropped_bytes,
        "retry_after_secs": retry_after,
        "progress_lines": progress.lines,
        "progress_bytes": progress.bytes,
    })
}

/// Progress writes, coalesced: at most one per [`PROGRESS_EVERY`], and the
/// last report always written.
#[derive(Default)]
struct Coalesced {
    latest: Option<Progress>,
    written_at: Option<tokio::time::Instant>,
    /// What was written last (a repeat is not written again).
    written: Option<(u8, String)>,
    writes: usize,
    /// Progress lines seen, and their bytes: they are not log lines, so the
    /// log summary says how much output went this way.
    lines: u64,
    bytes: u64,
}

/// Least time between two progress writes of one job.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Most progress writes (and `progress` events) per attempt before the
/// last one; an agent cannot grow the trail by reporting forever.
const MAX_PROGRESS_WRITES: usize = 1_000;

impl Coalesced {
    async fn write_if_due(&mut self, ctx: &JobContext, last: bool) {
        let due = self
            .written_at
            .is_none_or(|at| at.elapsed() >= PROGRESS_EVERY);
        // The last report is always written; the others when due and
        // under the cap.
        if !last && (!due || self.writes >= MAX_PROGRESS_WRITES) {
            return;
        }
        let Some(progress) = self.latest.take() else {
            return;
        };
        let key = (progress.percent, progress.message.clone());
        if self.written.as_ref() == Some(&key) {
            return;
        }
        self.written = Some(key);
        self.writes += 1;
        self.written_at = Some(tokio::time::Instant::now());
        match ctx.set_progress(&progress).await {
            Ok(
                ProgressWrite::Written { .. } | ProgressWrite::NotRunning | ProgressWrite::Older,
            ) => {}
            Ok(ProgressWrite::Contended) => {
                tracing::debug!(job.id = %ctx.job.id, "progress not recorded: the row kept changing");
            }
            Err(err) => {
                tracing::warn!(job.id = %ctx.job.id, error = %err, "could not record progress");
            }
        }
    }
}

async fn flush(ctx: &JobContext, batch: &mut Vec<(&'static str, Value)>) {
    if batch.is_empty() {
        return;
    }
    if let Err(err) = ctx.append_events(batch).await {
        tracing::warn!(job.id = %ctx.job.id, error = %err, lines = batch.len(), "could not record log lines");
    }
    batch.clear();
}
