//! A job kind that runs in a sandbox, defined by its `worker.toml`. Output
//! streams into the job's events as it arrives (capped: past the budget only
//! the tail is kept, and how much was dropped is recorded); secrets named by
//! the kind come from the worker's environment at start only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OnceCell};

use super::gates::{GateDef, GateType};
use super::kinds::{KindDef, SCRIPT_PLACEHOLDER, TASK_PLACEHOLDER};
use super::lifecycle::NoChanges;
use super::{Handler, HandlerFuture, JobContext, JobError};
use crate::git::names::{BranchName, RepoPolicy};
use crate::git::repo::GitStage;
use crate::git::secrets::Scanner;
use crate::job::JobId;
use crate::sandbox::egress::{Allowlist, EgressGrant, EgressProxy};
use crate::sandbox::RuntimeChoice;
use crate::sandbox::{
    BindMount, DockerRuntime, Finished, LogCap, LogLine, Network, Outcome, Owner, RunOptions,
    Runtime, SandboxSpec,
};
use crate::secret::Secret;

/// Largest script a payload may carry.
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;
/// Log events are written in batches of this many lines, or sooner.
const LOG_BATCH: usize = 200;
const LOG_FLUSH: Duration = Duration::from_millis(250);

/// How a worker runs sandboxes (from `[sandbox]` in the settings).
#[derive(Debug, Clone, Copy)]
pub struct HostOptions {
    pub runtime: RuntimeChoice,
    /// Log bytes per job recorded as events; past it only the tail is kept.
    pub log_budget_bytes: u64,
    pub log_tail_bytes: usize,
    /// Egress sandboxes may reach allowed hosts on local addresses.
    pub egress_allow_local: bool,
}

/// The sandbox runtime, connected on first use, and log limits.
#[derive(Clone)]
pub struct SandboxHost {
    /// Only a working runtime is kept: a Docker daemon that did not answer
    /// is asked again by the next job.
    runtime: Arc<OnceCell<Runtime>>,
    choice: RuntimeChoice,
    /// The egress proxy, started by the first `network = "egress"` job
    /// (and, like the runtime, asked again after a failure).
    egress: Arc<OnceCell<EgressProxy>>,
    egress_allow_local: bool,
    /// The secret rules, applied to every line of output before it is
    /// stored or streamed.
    redactor: Option<Arc<Scanner>>,
    /// Labels this deployment's sandboxes (the Valkey key prefix).
    pub deployment: String,
    pub log_budget_bytes: u64,
    pub log_tail_bytes: usize,
}

impl SandboxHost {
    pub fn new(settings: &HostOptions, deployment: &str) -> Self {
        if settings.runtime == RuntimeChoice::Local {
            tracing::warn!(
                "sandbox.runtime = local: agents run as HOST PROCESSES (rlimits and a process \
                 group only; no filesystem, network or user isolation); every job result says so"
            );
        }
        SandboxHost {
            runtime: Arc::new(OnceCell::new()),
            choice: settings.runtime,
            egress: Arc::new(OnceCell::new()),
            egress_allow_local: settings.egress_allow_local,
            redactor: None,
            deployment: deployment.to_owned(),
            log_budget_bytes: settings.log_budget_bytes,
            log_tail_bytes: settings.log_tail_bytes,
        }
    }

    /// The runtime; `Err` says why none is available. Isolation fails
    /// closed: with `docker` (the default) an unreachable daemon is an
    /// error, never a fallback to host processes.
    pub async fn runtime(&self) -> Result<&Runtime, String> {
        let choice = self.choice;
        self.runtime
            .get_or_try_init(|| async move {
                match choice {
                    RuntimeChoice::Local => Ok(Runtime::local()),
                    RuntimeChoice::Docker | RuntimeChoice::Auto => DockerRuntime::connect()
                        .await
                        .map(Runtime::Docker)
                        .map_err(|e| {
                            format!("sandbox.runtime is docker, but no Docker daemon answers: {e}; agent jobs are refused until it does (sandbox.runtime = \"local\" runs them as host processes, without isolation)")
                        }),
                }
            })
            .await
    }

    /// A grant through this worker's egress proxy for one sandbox of `job`,
    /// the proxy started on first use; `None` under the local runtime,
    /// which has no network isolation to begin with. Fails closed: no
    /// proxy, no sandbox.
    async fn egress_grant(
        &self,
        job: JobId,
        allow: &Arc<Allowlist>,
    ) -> Result<Option<EgressGrant>, String> {
        let Runtime::Docker(docker) = self.runtime().await? else {
            return Ok(None);
        };
        let allow_local = self.egress_allow_local;
        let proxy = self
            .egress
            .get_or_try_init(|| async move {
                EgressProxy::start(docker.client(), allow_local)
                    .await
                    .map_err(|e| {
                        format!("network = \"egress\" cannot be set up on this worker: {e}; its jobs are refused until it can (the worker needs Docker and iptables, as root or with CAP_NET_ADMIN)")
                    })
            })
            .await?;
        Ok(Some(proxy.grant(job, allow.clone())))
    }

    /// Redacts output with the secret rules (the same as the diff's).
    pub fn with_redactor(mut self, scanner: Arc<Scanner>) -> Self {
        self.redactor = Some(scanner);
        self
    }

    /// `line` with what the secret rules find replaced by
    /// `[REDACTED:<rule id>]`, each counted.
    fn redact(&self, line: &mut LogLine) {
        let Some(scanner) = &self.redactor else {
            return;
        };
        let (text, rules) = scanner.redact(&line.text);
        if rules.is_empty() {
            return;
        }
        for rule in rules {
            metrics::counter!(crate::metrics::OUTPUT_REDACTIONS, "rule" => rule).increment(1);
        }
        line.text = text;
    }

    /// For `/readyz`: whether agent jobs can run here.
    pub async fn check(&self) -> Result<&'static str, String> {
        self.runtime().await.map(Runtime::name)
    }
}

pub struct SandboxKind {
    def: Arc<KindDef>,
    host: SandboxHost,
    git: Option<GitHost>,
    admission: Arc<AdmissionSettings>,
}

impl SandboxKind {
    pub fn new(
        def: KindDef,
        host: SandboxHost,
        git: Option<GitHost>,
        admission: Arc<AdmissionSettings>,
    ) -> Self {
        SandboxKind {
            def: Arc::new(def),
            host,
            git,
            admission,
        }
    }
}

/// The agent job payload (public contract): the text for the agent
/// (`script` for script-agent, `task` for LLM agents: either name), and, to
/// work on a repository, `repo`, `base`, `branch`, `push`, `message`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentPayload {
    pub script: Option<String>,
    pub task: Option<String>,
    pub repo: Option<String>,
    pub base: Option<String>,
    pub branch: Option<String>,
    #[serde(default)]
    pub push: bool,
    pub message: Option<String>,
    /// A gate profile (`strict`, `standard`, `minimal`) or a list of the
    /// kind's gate names; the kind's default profile when absent.
    pub gates: Option<Value>,
    /// YOLO mode: skip the quality gates (the API requires the admin
    /// scope; the job and its trail say so).
    pub yolo: Option<bool>,
    /// Push to a branch that already exists on the remote (the base
    /// branch included): the admin scope, unless the kind allows it.
    pub allow_existing_branch: Option<bool>,
    /// For the admission policy: the tokens the task is expected to need,
    /// and the model it is for.
    pub estimated_tokens: Option<u64>,
    pub model: Option<String>,
}

impl AgentPayload {
    pub fn text(&self) -> &str {
        self.script
            .as_deref()
            .or(self.task.as_deref())
            .unwrap_or_default()
    }
}

pub(super) fn parse_payload(
    payload: &Value,
    git: Option<&GitHost>,
    admission: &AdmissionSettings,
) -> Result<AgentPayload, String> {
    let p: AgentPayload = serde_json::from_value(payload.clone()).map_err(|e| {
        format!("payload must look like {{\"script\": \"echo hello\"}} (optionally with repo, base, branch, push, message): {e}")
    })?;
    let text = match (&p.script, &p.task) {
        (Some(_), Some(_)) => return Err("give payload.script or payload.task, not both".into()),
        (None, None) => return Err("payload.script (or payload.task) is required".into()),
        (Some(t), None) | (None, Some(t)) => t,
    };
    if text.trim().is_empty() {
        return Err("payload.script must not be empty".into());
    }
    if text.len() > MAX_SCRIPT_BYTES {
        return Err(format!(
            "payload.script is larger than {MAX_SCRIPT_BYTES} bytes"
        ));
    }
    if text.contains('\0') {
        return Err("payload.script must not contain NUL characters".into());
    }
    admit(&p, admission)?;
    if p.yolo == Some(true) && p.gates.is_some() {
        return Err("give payload.gates or payload.yolo, not both".into());
    }
    match (&p.repo, git) {
        (None, _) => {
            if p.base.is_some() || p.branch.is_some() || p.push || p.message.is_some() {
                return Err("payload.base, branch, push and message need payload.repo".into());
            }
        }
        (Some(_), None) => return Err("this deployment has no git stage configured".into()),
        (Some(repo), Some(git)) => {
            git.policy
                .check(repo)
                .map_err(|e| format!("payload.repo: {e}"))?;
            if let Some(b) = &p.base {
                BranchName::parse(b).map_err(|e| format!("payload.base: {e}"))?;
            }
            if let Some(b) = &p.branch {
                BranchName::parse(b).map_err(|e| format!("payload.branch: {e}"))?;
            }
            if p.message
                .as_ref()
                .is_some_and(|m| m.trim().is_empty() || m.len() > 10_000)
            {
                return Err("payload.message must be 1 to 10000 bytes".into());
            }
        }
    }
    Ok(p)
}

/// The admission policy for agent jobs (the "50% rule").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionSettings {
    /// A task may use at most this fraction of its model's context window.
    pub max_context_fraction: f64,
    /// Context window per model, in tokens.
    pub context_windows: std::collections::BTreeMap<String, u64>,
    /// Most jobs of a queue running at once, across every worker (e.g. to
    /// bound concurrent agents); queues not listed have no limit.
    #[serde(default)]
    pub queue_limits: std::collections::BTreeMap<String, u32>,
}

/// The admission policy (the "50% rule"): a task whose estimated tokens
/// exceed the configured fraction of its model's context window is refused.
fn admit(p: &AgentPayload, admission: &AdmissionSettings) -> Result<(), String> {
    let Some(tokens) = p.estimated_tokens else {
        return Ok(());
    };
    let model = p
        .model
        .as_deref()
        .ok_or("payload.model is required with payload.estimated_tokens")?;
    let Some(window) = admission.context_windows.get(model) else {
        let known: Vec<&str> = admission
            .context_windows
            .keys()
            .map(String::as_str)
            .collect();
        return Err(format!(
            "payload.model {model:?} is unknown; known models: {}",
            known.join(", ")
        ));
    };
    let limit = (*window as f64 * admission.max_context_fraction).floor() as u64;
    if tokens > limit {
        return Err(format!(
            "payload.estimated_tokens: {tokens} tokens exceed {}% of {model}'s {window}-token context window (at most {limit}); split the task",
            (admission.max_context_fraction * 100.0).round()
        ));
    }
    Ok(())
}

/// What the git stage needs: the stage itself and the repository policy.
#[derive(Clone)]
pub struct GitHost {
    pub stage: GitStage,
    pub policy: RepoPolicy,
    pub no_changes: NoChanges,
    /// Skip every job's quality gates (`git.yolo`): loudly, in each trail.
    pub yolo: bool,
}

impl Handler for SandboxKind {
    fn validate(&self, payload: &Value) -> Result<(), String> {
        let p = parse_payload(payload, self.git.as_ref(), &self.admission)?;
        // At enqueue the host is resolved too (and again before every
        // fetch and push, since DNS may change in between). getaddrinfo
        // blocks, but only for a name outside /etc/hosts and the cache.
        if let (Some(repo), Some(git)) = (&p.repo, &self.git) {
            git.policy
                .check_now(repo)
                .map_err(|e| format!("payload.repo: {e}"))?;
        }
        if p.gates.is_some() && p.repo.is_none() {
            return Err(
                "payload.gates needs payload.repo: gates check the committed change".into(),
            );
        }
        self.def.gates.select(p.gates.as_ref()).map(drop)
    }

    fn privileges(&self, payload: &Value) -> super::Privileges {
        let mut p = super::Privileges::default();
        if payload.get("yolo") == Some(&Value::Bool(true)) {
            p.yolo = true;
            p.needs_admin.push((
                "payload.yolo".into(),
                "payload.yolo skips the quality gates".into(),
            ));
        }
        if payload.get("allow_existing_branch") == Some(&Value::Bool(true))
            && !self.def.allow_existing_branch
        {
            p.needs_admin.push((
                "payload.allow_existing_branch".into(),
                "payload.allow_existing_branch pushes to a branch that exists on the remote".into(),
            ));
        }
        // Gates run only on a repository's change.
        if payload.get("repo").is_some() && !p.yolo {
            if let Ok(selected) = self.def.gates.select(payload.get("gates")) {
                let dropped = self.def.gates.dropped(&selected);
                if !dropped.is_empty() {
                    p.yolo = true;
                    p.needs_admin.push((
                        "payload.gates".into(),
                        format!(
                            "payload.gates leaves out the required gates {} (that is YOLO)",
                            dropped.join(", ")
                        ),
                    ));
                }
            }
        }
        p
    }

    fn run(&self, ctx: JobContext) -> HandlerFuture {
        let def = self.def.clone();
        let host = self.host.clone();
        let git = self.git.clone();
        let admission = self.admission.clone();
        Box::pin(async move {
            let payload = parse_payload(&ctx.job.payload, git.as_ref(), &admission)
                .map_err(JobError::Fatal)?;
            match (&payload.repo, &git) {
                (Some(_), Some(git)) => {
                    super::lifecycle::run(&def, &host, git, &payload, ctx).await
                }
                _ => {
                    // No repository: the agent's sandbox is the one stage.
                    if let Err(err) = ctx.set_stage("spawn").await {
                        tracing::warn!(job.id = %ctx.job.id, error = %err, "could not record the stage");
                    }
                    let (finished, log, runtime) =
                        run_sandbox(&def, &host, &ctx, payload.text(), None).await?;
                    outcome_result(&def, finished, log, runtime)
                }
            }
        })
    }
}

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
    let now = chrono::Utc::now();
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
        owner: Owner {
            deployment: host.deployment.clone(),
            job_id: job.id,
            attempt: job.attempt,
            worker_id: ctx.worker_id.to_string(),
            created_at: now,
            expires_at: now
                + chrono::Duration::from_std(timeout + grace * 2 + Duration::from_secs(60))
                    .unwrap_or(chrono::Duration::hours(24)),
        },
    };
    let runtime = host.runtime().await.map_err(JobError::Failed)?;
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
        .map_err(JobError::Failed)?;
    if let Some(grant) = &grant {
        for var in ["HTTPS_PROXY", "https_proxy"] {
            secrets.insert(var.to_owned(), Secret::new(grant.proxy_url()));
        }
    }
    Ok(grant)
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
    let now = chrono::Utc::now();
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
        owner: Owner {
            deployment: host.deployment.clone(),
            job_id: job.id,
            attempt: job.attempt,
            worker_id: ctx.worker_id.to_string(),
            created_at: now,
            expires_at: now
                + chrono::Duration::from_std(gate.timeout() + grace * 2 + Duration::from_secs(60))
                    .unwrap_or(chrono::Duration::hours(24)),
        },
    };
    let runtime = host.runtime().await.map_err(JobError::Failed)?;
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
    match finished.outcome {
        Outcome::Exited { code: 0 } => Ok(result),
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
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some(mut line) => {
                    host.redact(&mut line);
                    if let Some(line) = cap.accept(line) {
                        batch.push(("log", json!({ "stream": line.stream, "line": line.text })));
                    }
                    if batch.len() >= LOG_BATCH {
                        flush(&ctx, &mut batch).await;
                    }
                }
                None => break,
            },
            _ = ticker.tick() => flush(&ctx, &mut batch).await,
        }
    }
    flush(&ctx, &mut batch).await;
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
    json!({ "emitted_bytes": summary.emitted_bytes, "dropped_bytes": summary.dropped_bytes })
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
