//! Where agents run: the sandbox runtime (connected on first use; Docker
//! unless `local` is chosen), the egress proxy, and output redaction.

use std::sync::Arc;

use tokio::sync::OnceCell;

use crate::git::secrets::Scanner;
use crate::job::JobId;
use crate::sandbox::egress::{Allowlist, EgressGrant, EgressProxy};
use crate::sandbox::RuntimeChoice;
use crate::sandbox::{DockerRuntime, LogLine, Runtime, SandboxError};

/// Why agent jobs cannot run on this worker now (each retryable: the next
/// job asks again).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("sandbox.runtime is docker, but no Docker daemon answers: {0}; agent jobs are refused until it does (sandbox.runtime = \"local\" runs them as host processes, without isolation)")]
    NoDocker(#[source] SandboxError),
    #[error("network = \"egress\" cannot be set up on this worker: {0}; its jobs are refused until it can (the worker needs Docker and iptables, as root or with CAP_NET_ADMIN)")]
    NoEgress(#[source] SandboxError),
    #[error("network = \"egress\" needs the docker runtime: under sandbox.runtime = \"local\" the agent would have the host's whole network")]
    LocalEgress,
}

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
    /// The egress proxy, started by the first `network = "egress"` job;
    /// dropped and made again when its checks fail.
    egress: Arc<tokio::sync::Mutex<Option<Arc<EgressProxy>>>>,
    egress_allow_local: bool,
    /// The secret rules, applied to every line of output before it is
    /// stored or streamed.
    redactor: Option<Arc<Scanner>>,
    /// Labels this deployment's sandboxes (the Valkey key prefix).
    pub deployment: String,
    /// Labels the sandboxes started here (`worker.host`).
    pub host_name: String,
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
            egress: Arc::new(tokio::sync::Mutex::new(None)),
            egress_allow_local: settings.egress_allow_local,
            redactor: None,
            deployment: deployment.to_owned(),
            host_name: crate::sandbox::machine_host_name(),
            log_budget_bytes: settings.log_budget_bytes,
            log_tail_bytes: settings.log_tail_bytes,
        }
    }

    /// Labels its sandboxes with `name` as their host.
    pub fn with_host_name(mut self, name: String) -> Self {
        self.host_name = name;
        self
    }

    /// The runtime; `Err` says why none is available. Isolation fails
    /// closed: with `docker` (the default) an unreachable daemon is an
    /// error, never a fallback to host processes.
    pub async fn runtime(&self) -> Result<&Runtime, Unavailable> {
        let choice = self.choice;
        self.runtime
            .get_or_try_init(|| async move {
                match choice {
                    RuntimeChoice::Local => Ok(Runtime::local()),
                    RuntimeChoice::Docker | RuntimeChoice::Auto => DockerRuntime::connect()
                        .await
                        .map(Runtime::Docker)
                        .map_err(Unavailable::NoDocker),
                }
            })
            .await
    }

    /// A grant through this worker's egress proxy for one sandbox of `job`,
    /// the proxy started on first use. Fails closed: no proxy (or one whose
    /// network or firewall is no longer right), no sandbox; a proxy that
    /// fails its checks is dropped (its rule removed) and made again for
    /// the next job. The local runtime is refused: it has no network
    /// isolation, so an allowlist would mean nothing.
    pub(super) async fn egress_grant(
        &self,
        job: JobId,
        allow: &Arc<Allowlist>,
    ) -> Result<EgressGrant, Unavailable> {
        let Runtime::Docker(docker) = self.runtime().await? else {
            return Err(Unavailable::LocalEgress);
        };
        // The lock covers starting the proxy, not each grant's checks:
        // sandboxes start side by side.
        let proxy = {
            let mut cell = self.egress.lock().await;
            match cell.as_ref() {
                Some(proxy) => proxy.clone(),
                None => {
                    let proxy = EgressProxy::start(docker.client(), self.egress_allow_local)
                        .await
                        .map_err(Unavailable::NoEgress)?;
                    let proxy = Arc::new(proxy);
                    *cell = Some(proxy.clone());
                    proxy
                }
            }
        };
        match proxy.grant(job, allow.clone()).await {
            Ok(grant) => Ok(grant),
            Err(err) => {
                // A failed check (the network replaced, the firewall beyond
                // repair) retires the proxy; a Docker API hiccup does not,
                // or every running sandbox would lose its tunnels.
                if matches!(err, SandboxError::Spec(_)) {
                    let mut cell = self.egress.lock().await;
                    if cell.as_ref().is_some_and(|p| Arc::ptr_eq(p, &proxy)) {
                        *cell = None;
                    }
                }
                Err(Unavailable::NoEgress(err))
            }
        }
    }

    /// Redacts output with the secret rules (the same as the diff's).
    pub fn with_redactor(mut self, scanner: Arc<Scanner>) -> Self {
        self.redactor = Some(scanner);
        self
    }

    /// `line` with what the secret rules find replaced by
    /// `[REDACTED:<rule id>]`, each counted.
    pub(super) fn redact(&self, line: &mut LogLine) {
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
    pub async fn check(&self) -> Result<&'static str, Unavailable> {
        self.runtime().await.map(Runtime::name)
    }
}
