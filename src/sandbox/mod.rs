//! Sandboxes: where agents and quality gates run. Every agent is untrusted
//! code. The Docker runtime (bollard) is hardened by default; the
//! local-process runtime exists for machines without Docker and is weaker
//! isolation, which it says loudly.

mod docker;
pub mod egress;
mod local;
mod logs;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::job::JobId;
use crate::secret::Secret;

pub use docker::DockerRuntime;
pub use local::LocalRuntime;
pub use logs::{LogCap, LogLine, LogStream, LogSummary};

/// Labels every container of ours carries; the orphan reaper only ever
/// touches containers that have [`LABEL_JOB`].
pub const LABEL_JOB: &str = "dev.orchestrator.job-id";
/// The deployment (the Valkey key prefix): replicas of one deployment reap
/// only their own sandboxes, even on a shared Docker daemon.
pub const LABEL_DEPLOYMENT: &str = "dev.orchestrator.deployment";
pub const LABEL_ATTEMPT: &str = "dev.orchestrator.attempt";
pub const LABEL_WORKER: &str = "dev.orchestrator.worker-id";
pub const LABEL_CREATED: &str = "dev.orchestrator.created-at";
pub const LABEL_EXPIRES: &str = "dev.orchestrator.expires-at";
/// The host whose worker started the sandbox: each host's reaper removes
/// only its own, since a worktree a sandbox mounts is on that host's disk.
pub const LABEL_HOST: &str = "dev.orchestrator.host";

/// This machine's host name (empty if it has none that is UTF-8).
pub fn machine_host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Secret values shorter than this are not masked in output (masking "a"
/// would garble every line, and such a value is no secret).
const MIN_MASKED_LEN: usize = 4;

/// The uid:gid sandboxes run as.
pub const SANDBOX_USER: &str = "1000:1000";
/// Where the job's worktree is mounted.
pub const WORKSPACE: &str = "/workspace";

/// Which sandbox runtime to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    /// The same as `docker` (kept for old configurations): isolation fails
    /// closed, so there is no fallback to host processes.
    Auto,
    /// Docker (the default). A worker whose daemon does not answer refuses
    /// agent jobs with a retryable error and says so in `/readyz`.
    Docker,
    /// Local processes: weaker isolation, for development; chosen only
    /// explicitly, logged at start-up and named in every job result.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Loopback only: the default.
    #[default]
    None,
    /// Docker's default bridge: unfiltered outbound access, the host's
    /// addresses included. Prefer `egress`.
    Bridge,
    /// An internal network whose one way out is this worker's allowlisting
    /// CONNECT proxy, for the hosts the kind names (see [`egress`]).
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory, and memory + swap (no swap).
    pub memory_bytes: i64,
    /// CPUs, in billionths (1.5 CPUs = 1_500_000_000).
    pub nano_cpus: i64,
    /// Processes and threads.
    pub pids: i64,
    /// Size of the writable /tmp.
    pub tmp_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 * 1024 * 1024,
            nano_cpus: 1_000_000_000,
            pids: 256,
            tmp_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub host: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Who a sandbox belongs to, written into its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The deployment this sandbox belongs to (see [`LABEL_DEPLOYMENT`]).
    pub deployment: String,
    /// The host the worker runs on (see [`LABEL_HOST`]).
    pub host: String,
    pub job_id: JobId,
    pub attempt: u32,
    pub worker_id: String,
    pub created_at: DateTime<Utc>,
    /// After this the sandbox is an orphan even if its job still runs.
    pub expires_at: DateTime<Utc>,
}

/// Everything needed to start a sandbox. The command is an argv array,
/// never a shell string built from input.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Injected as environment variables at start only; never logged,
    /// never stored.
    pub secrets: BTreeMap<String, Secret>,
    /// The job's worktree, mounted at [`WORKSPACE`] (the working directory).
    pub workspace: Option<BindMount>,
    pub mounts: Vec<BindMount>,
    pub limits: Limits,
    pub network: Network,
    pub owner: Owner,
}

/// How a sandbox ended: each a distinct, named outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// The command exited by itself with this code.
    Exited { code: i64 },
    /// Killed for exceeding its memory limit.
    OomKilled,
    /// Ran past its timeout and was stopped.
    TimedOut,
    /// Stopped on request (cancellation, shutdown); `code` as it exited.
    Stopped { code: i64 },
}

impl Outcome {
    pub fn succeeded(self) -> bool {
        matches!(self, Outcome::Exited { code: 0 })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub outcome: Outcome,
    pub duration: Duration,
}

/// How long to run and how to stop.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("Docker: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("cannot start {command:?}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid sandbox spec: {0}")]
    Spec(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A container left behind, found by [`Runtime::list_ours`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labelled {
    pub id: String,
    pub name: String,
    pub job_id: Option<JobId>,
    pub attempt: Option<u32>,
    pub worker_id: Option<String>,
    /// Absent on a container made before hosts were labelled.
    pub host: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// The runtime in use.
#[derive(Clone)]
pub enum Runtime {
    Docker(DockerRuntime),
    Local(LocalRuntime),
}

/// A secret and the forms an agent could print it in to slip past a plain
/// match: base64 (at each of the three alignments it can have inside a
/// longer encoding, so `KEY=<secret>` encoded is caught too), hex in both
/// cases, and URL-encoded. Longest first, so a form is masked whole.
fn encoded_forms(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use base64::Engine as _;
    let mut forms = vec![secret.to_owned()];
    for shift in 0..3usize {
        let mut bytes = vec![0u8; shift];
        bytes.extend_from_slice(secret.as_bytes());
        let encoded = STANDARD_NO_PAD.encode(&bytes);
        // Characters that mix in the prefix, or whatever follows, vary.
        let skip = (shift * 8).div_ceil(6);
        let keep = (shift + secret.len()) * 8 / 6;
        if keep > skip + MIN_MASKED_LEN {
            forms.push(encoded[skip..keep].to_owned());
        }
    }
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    forms.push(hex.to_uppercase());
    forms.push(hex);
    forms.push(url::form_urlencoded::byte_serialize(secret.as_bytes()).collect());
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms.dedup();
    forms
}

impl Runtime {
    /// Docker when a daemon answers (`DOCKER_HOST` or the local socket),
    /// else the local-process runtime, with a loud warning.
    /// The local-process runtime: weaker isolation, only ever chosen
    /// explicitly (`sandbox.runtime = "local"`).
    pub fn local() -> Runtime {
        Runtime::Local(LocalRuntime)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Runtime::Docker(_) => "docker",
            Runtime::Local(_) => "local",
        }
    }

    /// Runs a sandbox to its end: start, stream logs to `logs`, wait within
    /// the timeout (or until `cancel` fires), stop with SIGTERM, the grace
    /// period, then SIGKILL; always removed afterwards.
    pub async fn run(
        &self,
        spec: &SandboxSpec,
        opts: RunOptions,
        logs: mpsc::UnboundedSender<LogLine>,
        cancel: CancellationToken,
    ) -> Result<Finished, SandboxError> {
        validate(spec)?;
        // Output passes through a mask of the secrets' values: an agent
        // that prints its API key does not put it into the job's events.
        let mut masks: Vec<String> = spec
            .secrets
            .values()
            .filter(|s| s.expose().len() >= MIN_MASKED_LEN)
            .flat_map(|s| encoded_forms(s.expose()))
            .collect();
        // Longest first across every secret: one that contains another is
        // masked whole.
        masks.sort_by_key(|m| std::cmp::Reverse(m.len()));
        let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<LogLine>();
        let forward = tokio::spawn(async move {
            while let Some(mut line) = raw_rx.recv().await {
                for secret in &masks {
                    if line.text.contains(secret.as_str()) {
                        line.text = line.text.replace(secret.as_str(), "***");
                    }
                }
                if logs.send(line).is_err() {
                    break;
                }
            }
        });
        let result = match self {
            Runtime::Docker(d) => d.run(spec, opts, raw_tx, cancel).await,
            Runtime::Local(l) => l.run(spec, opts, raw_tx, cancel).await,
        };
        let _ = forward.await;
        result
    }

    /// Sandboxes of this deployment that still exist (Docker only).
    pub async fn list_ours(&self, deployment: &str) -> Result<Vec<Labelled>, SandboxError> {
        match self {
            Runtime::Docker(d) => d.list_ours(deployment).await,
            Runtime::Local(_) => Ok(Vec::new()),
        }
    }

    /// Stops (SIGTERM, grace, SIGKILL) and removes one of ours.
    pub async fn remove(&self, id: &str, grace: Duration) -> Result<(), SandboxError> {
        match self {
            Runtime::Docker(d) => d.remove(id, grace).await,
            Runtime::Local(_) => Ok(()),
        }
    }
}

fn validate(spec: &SandboxSpec) -> Result<(), SandboxError> {
    if spec.command.is_empty() {
        return Err(SandboxError::Spec("the command is empty".into()));
    }
    let name_ok = !spec.name.is_empty()
        && spec.name.len() <= 128
        && spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(SandboxError::Spec(format!(
            "invalid sandbox name {:?}",
            spec.name
        )));
    }
    for key in spec.env.keys().chain(spec.secrets.keys()) {
        let ok = !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !key.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return Err(SandboxError::Spec(format!(
                "invalid environment variable name {key:?}"
            )));
        }
    }
    for m in spec.workspace.iter().chain(spec.mounts.iter()) {
        let host = m.host.to_string_lossy();
        if !m.host.is_absolute() || host.contains("..") {
            return Err(SandboxError::Spec(format!(
                "mount source {host:?} must be an absolute path without '..'"
            )));
        }
        // Never the Docker socket (or any other daemon's).
        if host.ends_with(".sock")
            || host == "/"
            || host.starts_with("/var/run")
            || host.starts_with("/run")
        {
            return Err(SandboxError::Spec(format!(
                "mount source {host:?} is not allowed in a sandbox"
            )));
        }
    }
    if spec.limits.memory_bytes < 4 * 1024 * 1024
        || spec.limits.pids < 1
        || spec.limits.nano_cpus < 1
    {
        return Err(SandboxError::Spec(
            "limits must allow at least 4 MiB, 1 process and some CPU".into(),
        ));
    }
    Ok(())
}
