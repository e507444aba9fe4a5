//! Settings: built-in defaults (`config/default.toml`, compiled in), then an
//! optional config file, then `ORCH_*` environment variables
//! (`ORCH_DATABASE_URL`, `ORCH_WORKER__CONCURRENCY`, …: `__` separates
//! sections).

use crate::maintenance::{DeliveryConfig, MaintenanceConfig, RESPONSE_LIMIT};
use crate::pipeline::{AdmissionSettings, NoChanges};
use crate::sandbox::RuntimeChoice;
use crate::secret::Secret;
use crate::webhook::{Client, Signer};
use crate::worker::PoolConfig;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::job::{QueueName, RetryPolicy, RetryPolicyError};

const DEFAULTS: &str = include_str!("../config/default.toml");

/// Top-level settings that `ORCH_<KEY>` (and `ORCH_<KEY>__<FIELD>`) may set.
const SETTINGS_KEYS: [&str; 20] = [
    "admin_token",
    "api",
    "database_url",
    "valkey_url",
    "valkey",
    "http_addr",
    "metrics_addr",
    "key_prefix",
    "database",
    "worker",
    "retry",
    "jobs",
    "maintenance",
    "sandbox",
    "git",
    "admission",
    "webhooks",
    "gates",
    "kill_switch",
    "retention",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("config file {0} does not exist")]
    Missing(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// PostgreSQL URL (`ORCH_DATABASE_URL`).
    pub database_url: Secret,
    /// Valkey URL (`ORCH_VALKEY_URL`); several, comma-separated, are the
    /// seed nodes of a Valkey Cluster.
    pub valkey_url: Secret,
    #[serde(default)]
    pub valkey: ValkeySettings,
    /// HTTP listen address (`ORCH_HTTP_ADDR`).
    pub http_addr: String,
    /// Where `orchestrator worker` serves `/metrics`, `/healthz` and
    /// `/readyz` (`ORCH_METRICS_ADDR`); `serve` and `run` serve them on
    /// the API's address.
    pub metrics_addr: String,
    /// Prefix of every Valkey key; lets several deployments share a server.
    pub key_prefix: String,
    /// A token with every scope, named `admin` (`ORCH_ADMIN_TOKEN`).
    #[serde(default)]
    pub admin_token: Option<Secret>,
    pub api: ApiSettings,
    pub database: DatabaseSettings,
    pub worker: WorkerSettings,
    pub retry: RetryPolicy,
    pub jobs: JobDefaults,
    pub maintenance: MaintenanceSettings,
    pub sandbox: SandboxSettings,
    /// The git stage: which repositories jobs may name
    /// (`ORCH_GIT_ALLOW_LOCAL=true` allows local ones), where mirrors and
    /// worktrees live, the commit author.
    pub git: GitSettings,
    pub admission: AdmissionSettings,
    pub kill_switch: KillSwitchSettings,
    pub webhooks: WebhookSettings,
    #[serde(default)]
    pub gates: GateSettings,
    pub retention: RetentionSettings,
}

/// `[valkey]`: how to talk to it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValkeySettings {
    /// `valkey_url` names a node of a Valkey Cluster (`ORCH_VALKEY__CLUSTER`;
    /// a list of several URLs means a cluster either way).
    #[serde(default)]
    pub cluster: bool,
}

/// How long finished jobs (and their events, webhook rows and keys) are
/// kept; 0 keeps them for ever.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    pub succeeded_secs: u64,
    pub cancelled_secs: u64,
    pub dead_secs: u64,
    /// Jobs deleted per transaction.
    pub batch: u32,
    /// How often a replica looks for jobs to prune.
    pub interval_ms: u64,
    /// The pause between full batches while a backlog is pruned.
    pub batch_pause_ms: u64,
}

impl RetentionSettings {
    /// `None` when every status is kept for ever.
    pub fn config(&self) -> Option<crate::maintenance::RetentionConfig> {
        let keep = |secs: u64| (secs > 0).then(|| Duration::from_secs(secs));
        if self.succeeded_secs == 0 && self.cancelled_secs == 0 && self.dead_secs == 0 {
            return None;
        }
        Some(crate::maintenance::RetentionConfig {
            succeeded: keep(self.succeeded_secs),
            cancelled: keep(self.cancelled_secs),
            dead: keep(self.dead_secs),
            batch: self.batch.max(1),
            max_batches: 100,
            batch_pause: Duration::from_millis(self.batch_pause_ms),
            interval: Duration::from_millis(self.interval_ms.max(1)),
        })
    }
}

/// The quality gates' deployment-wide settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateSettings {
    /// Where `http` gates that name no `url` send the change
    /// (`ORCH_GATES__COORDINATOR_URL`).
    pub coordinator_url: Option<String>,
    /// The secrets (`whsec_…`) the change is signed with and the answer
    /// must be signed with (`ORCH_COORDINATOR_SECRET`). Not the webhook
    /// secrets: every webhook receiver knows those, and could forge a
    /// coordinator's answer.
    #[serde(default)]
    pub coordinator_secrets: Vec<Secret>,
}

/// The most of a coordinator's answer that is read (a larger one fails
/// the gate).
const GATE_ANSWER_LIMIT: usize = 64 * 1024;

/// Webhooks and the `http` gate's signature.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Standard Webhooks secrets (`whsec_<base64>`), the newest first.
    /// Every one signs every message, so a rotation lists two for a while.
    /// `ORCH_WEBHOOK_SECRET` (one, or two separated by a space) replaces them.
    pub secrets: Vec<Secret>,
    /// Attempts per delivery before it is dead.
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// Each request's timeout.
    pub timeout_ms: u64,
    /// Requests in flight at once, per replica.
    pub concurrency: usize,
    /// How often an idle deliverer looks at the outbox.
    pub poll_interval_ms: u64,
    /// While a worker pool is saturated with short jobs, deliveries younger
    /// than this wait, so that they do not take from the jobs (0: never).
    pub defer_while_saturated_ms: u64,
    /// Let callback and subscription URLs (and coordinators) be on this
    /// machine or a private network: for tests and local use.
    pub allow_local: bool,
}

impl WebhookSettings {
    pub fn signer(&self) -> Result<Signer, ConfigError> {
        Signer::new(&self.secrets).map_err(|e| ConfigError::Invalid {
            field: "webhooks.secrets",
            message: e.to_string(),
        })
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// What `http` gates call, as `gates` says (the default URL, the
    /// coordinator's own secrets), under this section's address policy.
    pub fn coordinator(
        &self,
        gates: &GateSettings,
    ) -> Result<crate::pipeline::gates::Coordinator, ConfigError> {
        // Each gate bounds its own call (its timeout_secs); the client's
        // bound is the longest a gate may have.
        let client = Client::new(
            Duration::from_secs(86_400),
            self.allow_local,
            GATE_ANSWER_LIMIT,
        )
        .map_err(|e| ConfigError::Invalid {
            field: "webhooks",
            message: e.to_string(),
        })?;
        let signer = Signer::new(&gates.coordinator_secrets).map_err(|e| ConfigError::Invalid {
            field: "gates.coordinator_secrets",
            message: e.to_string(),
        })?;
        Ok(crate::pipeline::gates::Coordinator {
            client,
            signer,
            default_url: gates.coordinator_url.clone(),
        })
    }

    /// How this replica delivers, or `None` when no secret is configured
    /// (nothing is sent unsigned; the outbox waits).
    pub fn delivery(&self) -> Result<Option<DeliveryConfig>, ConfigError> {
        let signer = self.signer()?;
        if signer.is_empty() {
            return Ok(None);
        }
        let client =
            Client::new(self.timeout(), self.allow_local, RESPONSE_LIMIT).map_err(|e| {
                ConfigError::Invalid {
                    field: "webhooks",
                    message: e.to_string(),
                }
            })?;
        Ok(Some(DeliveryConfig {
            client,
            signer,
            concurrency: self.concurrency,
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                backoff_base_ms: self.backoff_base_ms,
                backoff_cap_ms: self.backoff_cap_ms,
            },
            timeout: self.timeout(),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            defer_while_saturated: Duration::from_millis(self.defer_while_saturated_ms),
        }))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillSwitchSettings {
    /// How long kill-all waits for every running job to be confirmed stopped.
    pub confirm_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitSettings {
    pub allowed_schemes: Vec<String>,
    /// Host names, or "*" for any.
    pub allowed_hosts: Vec<String>,
    pub allow_local: bool,
    /// Mirrors and worktrees: `<data_dir>/mirrors`, `<data_dir>/worktrees`.
    pub data_dir: std::path::PathBuf,
    pub author_name: String,
    pub author_email: String,
    /// What a job whose agent changed nothing ends as: `fail` or `succeed`.
    pub no_changes: NoChanges,
    /// A gitleaks-format rules file replacing the built-in secret rules.
    #[serde(default)]
    pub secret_rules: Option<std::path::PathBuf>,
    /// YOLO mode for every job: quality gates skipped (loudly).
    #[serde(default)]
    pub yolo: bool,
    /// The largest file the host reads from a workspace (10 MiB).
    pub max_file_bytes: u64,
    /// All the files of a workspace the host reads, together (1 GiB).
    pub max_worktree_bytes: u64,
    /// Entries of a workspace the host walks (100,000).
    pub max_worktree_files: u64,
    /// Per host, the worker's environment variable holding its HTTPS token;
    /// `ORCH_GIT_HTTPS_TOKEN` serves the hosts `allowed_hosts` names.
    #[serde(default)]
    pub host_tokens: std::collections::BTreeMap<String, String>,
}

impl GitSettings {
    pub fn policy(&self) -> crate::git::names::RepoPolicy {
        crate::git::names::RepoPolicy {
            allowed_schemes: self.allowed_schemes.clone(),
            allowed_hosts: self.allowed_hosts.clone(),
            allow_local: self.allow_local,
        }
    }

    /// Bounds on what the host reads from a workspace.
    pub fn limits(&self) -> crate::git::workspace::Limits {
        crate::git::workspace::Limits {
            max_file_bytes: self.max_file_bytes,
            max_total_bytes: self.max_worktree_bytes,
            max_files: self.max_worktree_files,
        }
    }

    /// Address and credential policy for fetch and push.
    pub fn network(&self) -> crate::git::repo::Network {
        crate::git::repo::Network {
            allow_local: self.allow_local,
            host_tokens: self.host_tokens.clone(),
            token_hosts: self
                .allowed_hosts
                .iter()
                .filter(|h| h.as_str() != "*")
                .cloned()
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    pub runtime: RuntimeChoice,
    /// Where job kinds are defined: `<dir>/<kind>/worker.toml`.
    pub workers_dir: std::path::PathBuf,
    /// Log bytes per job recorded as events; past it only the tail is kept.
    pub log_budget_bytes: u64,
    pub log_tail_bytes: usize,
    /// How often containers of finished or abandoned jobs are removed.
    pub orphan_reap_interval_secs: u64,
    /// Lets `network = "egress"` sandboxes reach allowed hosts that resolve
    /// to a private address (an LLM endpoint on the LAN; tests). Never this
    /// host, link-local or the metadata service, whatever this says.
    pub egress_allow_local: bool,
}

/// Settings mapped to each layer's own configuration: the layers below
/// never read `Settings` themselves.
impl Settings {
    /// `worker.host`, or the machine's host name.
    pub fn host_name(&self) -> String {
        if self.worker.host.is_empty() {
            crate::sandbox::machine_host_name()
        } else {
            self.worker.host.clone()
        }
    }

    /// The worker pool's configuration (`[worker]`, `[maintenance]`, queue limits).
    pub fn pool_config(&self) -> PoolConfig {
        let settings = self;
        let w = &settings.worker;
        PoolConfig {
            worker_id: crate::worker::new_worker_id(),
            host: settings.host_name(),
            queues: w.queues.clone(),
            concurrency: w.concurrency,
            lease: w.lease(),
            claim_batch: w.claim_batch,
            prefetch: w.prefetch,
            poll_interval: Duration::from_millis(w.poll_interval_ms),
            shutdown_grace: Duration::from_secs(w.shutdown_grace_secs),
            complete_batch: w.complete_batch,
            maintenance: settings.maintenance_config(),
            queue_limits: settings.admission.queue_limits.clone(),
            rates: settings.rates(),
            max_jobs: None,
            idle_exit: None,
            claim: true,
        }
    }

    /// `admission.rate_limits` and `admission.key_rate_limits`, by queue.
    pub fn rates(&self) -> std::collections::BTreeMap<String, crate::queue::Rates> {
        let limit = |r: &crate::pipeline::RateSetting| crate::queue::RateLimit {
            starts: r.starts,
            per: Duration::from_secs(r.per_secs),
        };
        let a = &self.admission;
        let mut rates: std::collections::BTreeMap<String, crate::queue::Rates> =
            std::collections::BTreeMap::new();
        for (queue, r) in &a.rate_limits {
            rates.entry(queue.clone()).or_default().queue = Some(limit(r));
        }
        for (queue, r) in &a.key_rate_limits {
            rates.entry(queue.clone()).or_default().per_key = Some(limit(r));
        }
        rates
    }

    /// The maintenance services' intervals (`[maintenance]`, the orphan reaper's).
    pub fn maintenance_config(&self) -> MaintenanceConfig {
        let settings = self;
        let m = &settings.maintenance;
        MaintenanceConfig {
            promote_interval: Duration::from_millis(m.promote_interval_ms),
            reap_interval: Duration::from_millis(m.reap_interval_ms),
            lease_scan_interval: Duration::from_secs(m.lease_scan_interval_secs),
            reap_hold: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(m.reconcile_interval_secs),
            flush_check_interval: Duration::from_millis(m.flush_check_interval_ms),
            sample_interval: Duration::from_secs(5),
            orphan_interval: Duration::from_secs(settings.sandbox.orphan_reap_interval_secs),
        }
    }
}

impl SandboxSettings {
    pub fn host_options(&self) -> crate::pipeline::HostOptions {
        crate::pipeline::HostOptions {
            runtime: self.runtime,
            log_budget_bytes: self.log_budget_bytes,
            log_tail_bytes: self.log_tail_bytes,
            egress_allow_local: self.egress_allow_local,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Largest request body accepted; larger ones get 413.
    pub body_limit_bytes: usize,
    /// Whether `GET /metrics` is served without a token.
    pub metrics_public: bool,
    /// Bearer tokens: name (the actor in the audit trail), token, scopes.
    #[serde(default)]
    pub tokens: Vec<TokenSettings>,
    /// Most distinct queues a deployment accepts: a producer cannot grow
    /// memory, metric labels or kill-all's work by inventing names.
    pub max_queues: u64,
    /// How long a dashboard login lasts.
    pub ui_session_secs: u64,
    /// Mark the dashboard's session cookie `Secure` (behind TLS).
    pub ui_secure_cookie: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    pub name: String,
    pub token: Secret,
    pub scopes: Vec<crate::auth::Scope>,
}

/// Tokens shorter than this are refused as guessable.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Jobs run at once by one worker process.
    pub concurrency: usize,
    /// Queues this worker claims from.
    pub queues: Vec<QueueName>,
    /// Lease length; heartbeats renew it every third of it.
    pub lease_ms: u64,
    /// Most ids claimed in one round trip.
    pub claim_batch: usize,
    /// Jobs claimed ahead of free slots (see `PoolConfig::prefetch`).
    pub prefetch: usize,
    /// How long to wait for work when no wake-up arrives.
    pub poll_interval_ms: u64,
    /// How long in-flight jobs may finish after SIGTERM before release.
    pub shutdown_grace_secs: u64,
    /// Most completions written in one transaction.
    pub complete_batch: usize,
    /// The host this worker runs on, for the worker registry and the
    /// sandboxes' host label (a host's orphan reaper removes only its own).
    /// Empty: the machine's host name. In Kubernetes, the node's name, since
    /// sandboxes run on the node's Docker daemon.
    #[serde(default)]
    pub host: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDefaults {
    /// Run-time limit of a job that names none.
    pub timeout_secs: u32,
    pub max_timeout_secs: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceSettings {
    pub promote_interval_ms: u64,
    pub reap_interval_ms: u64,
    /// Scan of Postgres for expired leases the index lost.
    pub lease_scan_interval_secs: u64,
    /// Full index rebuild period (a lost index is detected sooner).
    pub reconcile_interval_secs: u64,
    pub flush_check_interval_ms: u64,
    /// How often every replica looks for due schedules.
    pub schedule_interval_ms: u64,
    /// A tick older than this when a scheduler sees it was missed: the
    /// schedule's `catch_up` decides whether it still runs.
    pub schedule_grace_secs: u64,
}

impl Settings {
    /// Defaults, then `file` (if given, it must exist), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Missing(path.display().to_string()));
            }
            figment = figment.merge(Toml::file(path));
        }
        let settings: Settings = figment
            .merge(
                Env::prefixed("ORCH_")
                    // Other ORCH_* variables (ORCH_LOG, ORCH_CONFIG, …) are
                    // read elsewhere; only settings are taken from here.
                    .filter(|key| {
                        let top = key.as_str().split("__").next().unwrap_or_default();
                        SETTINGS_KEYS.iter().any(|k| top.eq_ignore_ascii_case(k))
                    })
                    .split("__"),
            )
            .extract()
            .map_err(Box::new)?;
        let mut settings = settings;
        // The variable the docs name, beside ORCH_GIT__ALLOW_LOCAL.
        if std::env::var("ORCH_GIT_ALLOW_LOCAL").is_ok_and(|v| v == "true" || v == "1") {
            settings.git.allow_local = true;
        }
        // The variable the issue names: one secret, or two during a rotation.
        if let Ok(secrets) = std::env::var("ORCH_WEBHOOK_SECRET") {
            settings.webhooks.secrets = secrets.split_whitespace().map(Secret::new).collect();
        }
        if let Ok(secrets) = std::env::var("ORCH_COORDINATOR_SECRET") {
            settings.gates.coordinator_secrets =
                secrets.split_whitespace().map(Secret::new).collect();
        }
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| ConfigError::Invalid {
            field,
            message: message.to_owned(),
        };
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "key_prefix",
                "must be non-empty, without braces or spaces",
            ));
        }
        if !(self.admission.max_context_fraction > 0.0
            && self.admission.max_context_fraction <= 1.0)
        {
            return Err(invalid(
                "admission.max_context_fraction",
                "must be above 0 and at most 1",
            ));
        }
        let api = &self.api;
        if api.body_limit_bytes < 1024 || api.body_limit_bytes > 64 * 1024 * 1024 {
            return Err(invalid(
                "api.body_limit_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        if api.ui_session_secs < 60 || api.ui_session_secs > 30 * 86_400 {
            return Err(invalid(
                "api.ui_session_secs",
                "must be between 60 and 2592000 (30 days)",
            ));
        }
        let weak = |t: &Secret| {
            t.expose().len() < MIN_TOKEN_LEN
                || t.expose()
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
        };
        if self.admin_token.as_ref().is_some_and(weak) {
            return Err(invalid(
                "admin_token",
                "ORCH_ADMIN_TOKEN must be at least 16 characters, without spaces",
            ));
        }
        for t in &api.tokens {
            if t.name.is_empty() || t.name.len() > 64 || weak(&t.token) || t.scopes.is_empty() {
                return Err(ConfigError::Invalid {
                    field: "api.tokens",
                    message: format!(
                        "token {:?}: needs a name (1-64 characters), a token of at least {MIN_TOKEN_LEN} characters without spaces, and at least one scope",
                        t.name
                    ),
                });
            }
        }
        let w = &self.worker;
        if w.concurrency == 0 || w.concurrency > 10_000 {
            return Err(invalid("worker.concurrency", "must be between 1 and 10000"));
        }
        if w.queues.is_empty() {
            return Err(invalid("worker.queues", "name at least one queue"));
        }
        if w.lease_ms < 1_000 {
            return Err(invalid("worker.lease_ms", "must be at least 1000"));
        }
        if w.claim_batch == 0 || w.claim_batch > 1_000 {
            return Err(invalid("worker.claim_batch", "must be between 1 and 1000"));
        }
        if w.prefetch > 10_000 {
            return Err(invalid("worker.prefetch", "must be at most 10000"));
        }
        if w.host.len() > 253 || w.host.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid(
                "worker.host",
                "must be at most 253 characters, without spaces or control characters",
            ));
        }
        if w.complete_batch == 0 || w.complete_batch > 5_000 {
            return Err(invalid(
                "worker.complete_batch",
                "must be between 1 and 5000",
            ));
        }
        if w.poll_interval_ms == 0 {
            return Err(invalid("worker.poll_interval_ms", "must be positive"));
        }
        self.retry
            .validate()
            .map_err(|e: RetryPolicyError| ConfigError::Invalid {
                field: "retry",
                message: e.to_string(),
            })?;
        if self.jobs.timeout_secs == 0 || self.jobs.timeout_secs > self.jobs.max_timeout_secs {
            return Err(invalid(
                "jobs.timeout_secs",
                "must be between 1 and jobs.max_timeout_secs",
            ));
        }
        let m = &self.maintenance;
        if m.promote_interval_ms == 0
            || m.reap_interval_ms == 0
            || m.lease_scan_interval_secs == 0
            || m.reconcile_interval_secs == 0
            || m.flush_check_interval_ms == 0
            || m.schedule_interval_ms == 0
            || m.schedule_grace_secs == 0
        {
            return Err(invalid("maintenance", "every interval must be positive"));
        }
        let h = &self.webhooks;
        if h.secrets.len() > 2 {
            return Err(invalid(
                "webhooks.secrets",
                "at most two: the new one and, during a rotation, the old one",
            ));
        }
        h.signer()?;
        if self.gates.coordinator_secrets.len() > 2 {
            return Err(invalid(
                "gates.coordinator_secrets",
                "at most two: the new one and, during a rotation, the old one",
            ));
        }
        Signer::new(&self.gates.coordinator_secrets).map_err(|e| ConfigError::Invalid {
            field: "gates.coordinator_secrets",
            message: e.to_string(),
        })?;
        if let Some(url) = &self.gates.coordinator_url {
            crate::net::HttpUrl::parse(url, h.allow_local).map_err(|e| ConfigError::Invalid {
                field: "gates.coordinator_url",
                message: e,
            })?;
        }
        RetryPolicy {
            max_attempts: h.max_attempts,
            backoff_base_ms: h.backoff_base_ms,
            backoff_cap_ms: h.backoff_cap_ms,
        }
        .validate()
        .map_err(|e| ConfigError::Invalid {
            field: "webhooks",
            message: e.to_string(),
        })?;
        if !(100..=300_000).contains(&h.timeout_ms) {
            return Err(invalid(
                "webhooks.timeout_ms",
                "must be between 100 and 300000",
            ));
        }
        if h.concurrency == 0 || h.concurrency > 1_000 {
            return Err(invalid(
                "webhooks.concurrency",
                "must be between 1 and 1000",
            ));
        }
        if h.poll_interval_ms == 0 {
            return Err(invalid("webhooks.poll_interval_ms", "must be positive"));
        }
        if h.defer_while_saturated_ms > 600_000 {
            return Err(invalid(
                "webhooks.defer_while_saturated_ms",
                "must be at most 600000",
            ));
        }
        Ok(())
    }
}

impl WorkerSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

#[cfg(test)]
// figment's Jail returns its own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn built_in_defaults_are_valid() {
        figment::Jail::expect_with(|_jail| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.http_addr, "127.0.0.1:8080");
            assert_eq!(s.worker.queues, vec![QueueName::default_queue()]);
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ORCH_DATABASE_URL", "postgres://u:p@db/x");
            jail.set_env("ORCH_HTTP_ADDR", "0.0.0.0:9000");
            jail.set_env("ORCH_WORKER__CONCURRENCY", "7");
            jail.set_env("ORCH_ADMIN_TOKEN", "a-long-admin-token-123");
            jail.set_env("ORCH_DOCKER_AVAILABLE", "1");
            jail.set_env("ORCH_LOG", "debug");
            jail.set_env("ORCH_GIT_ALLOW_LOCAL", "true");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.database_url.expose(), "postgres://u:p@db/x");
            assert_eq!(s.http_addr, "0.0.0.0:9000");
            assert_eq!(s.worker.concurrency, 7);
            assert!(s.git.allow_local, "ORCH_GIT_ALLOW_LOCAL=true");
            assert!(!format!("{s:?}").contains("u:p@"), "secret printed");
            assert!(!format!("{s:?}").contains("a-long-admin"), "secret printed");
            assert_eq!(
                s.admin_token.as_ref().map(Secret::expose),
                Some("a-long-admin-token-123")
            );
            Ok(())
        });
    }

    #[test]
    fn invalid_values_name_the_field() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ORCH_WORKER__CONCURRENCY", "0");
            let err = Settings::load(None).expect_err("must fail").to_string();
            assert!(err.contains("worker.concurrency"), "{err}");
            jail.set_env("ORCH_WORKER__CONCURRENCY", "4");
            jail.set_env("ORCH_WORKER__QUEUES", "[\"bad queue\"]");
            let err = Settings::load(None).expect_err("must fail").to_string();
            assert!(err.contains("queue name"), "{err}");
            jail.set_env("ORCH_WORKER__QUEUES", "[\"default\"]");
            jail.set_env("ORCH_ADMIN_TOKEN", "short");
            let err = Settings::load(None).expect_err("must fail").to_string();
            assert!(err.contains("admin_token"), "{err}");
            Ok(())
        });
    }
}
