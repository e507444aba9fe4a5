//! The seam between the worker pool and what a job does.
//!
//! The pool claims a job, then hands it to the [`Handler`] registered for its
//! kind. The agent lifecycle (spawn → git → gates → complete) is one such
//! handler; the built-in kinds `noop`, `sleep` and `flaky` serve tests and
//! benchmarks.

mod agent;
mod builtin;
pub mod gates;
pub mod kinds;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::job::PayloadError;
use crate::store::{ClaimedJob, Store};

pub use agent::{
    AdmissionSettings, GitHost, HostOptions, NoChanges, RateSetting, SandboxHost, SandboxKind,
};
pub use builtin::{Flaky, Noop, Sleep};

/// What a handler gets: the job it runs and a token that fires when the job
/// must stop (shutdown past its grace period, lost lease, cancellation).
#[derive(Clone)]
pub struct JobContext {
    pub job: Arc<ClaimedJob>,
    pub cancel: CancellationToken,
    /// For events the handler records (fenced by the job's lease).
    pub store: Store,
    /// The worker running the job: the actor of those events.
    pub worker_id: Arc<str>,
    /// The stage the job is in, as the handler last set it.
    pub stage: StageCell,
}

/// Why a handler's record (an event, its stage) was not written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("Postgres did not answer while the job was stopping")]
    StoppingTimeout,
}

/// How long a job told to stop gives Postgres for each of its records: a
/// stop must not wait on a hung Postgres (the outcome is retried anyway).
const STOPPING_WRITE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

impl JobContext {
    /// Appends events to the job's trail, fenced by its lease.
    pub async fn append_events(
        &self,
        events: &[(&str, serde_json::Value)],
    ) -> Result<(), RecordError> {
        let write =
            self.store
                .append_events(self.job.id, self.job.lease_id, events, &self.worker_id);
        self.bounded(write).await.map(drop)
    }

    /// Records the job's progress (optimistic, fenced by its lease).
    pub async fn set_progress(
        &self,
        progress: &crate::job::Progress,
    ) -> Result<crate::store::ProgressWrite, RecordError> {
        let write =
            self.store
                .set_progress(self.job.id, self.job.lease_id, progress, &self.worker_id);
        self.bounded(write).await
    }

    /// Records the stage the job is in (in memory, then in Postgres).
    pub async fn set_stage(&self, stage: &'static str) -> Result<(), RecordError> {
        self.stage.set(stage);
        let write = self.store.set_stage(self.job.id, self.job.lease_id, stage);
        self.bounded(write).await.map(drop)
    }

    async fn bounded<T>(
        &self,
        write: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
    ) -> Result<T, RecordError> {
        // A write under way when the stop comes gets the same limit.
        tokio::pin!(write);
        tokio::select! {
            biased;
            r = &mut write => return Ok(r?),
            () = self.cancel.cancelled() => {}
        }
        match tokio::time::timeout(STOPPING_WRITE_LIMIT, write).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RecordError::StoppingTimeout),
        }
    }
}

/// Where a running job is, kept in memory: it must be known when the job is
/// cancelled even if Postgres cannot be asked.
#[derive(Debug, Clone)]
pub struct StageCell(Arc<std::sync::Mutex<&'static str>>);

impl Default for StageCell {
    fn default() -> Self {
        StageCell(Arc::new(std::sync::Mutex::new("running")))
    }
}

impl StageCell {
    pub fn set(&self, stage: &'static str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = stage;
    }

    pub fn get(&self) -> &'static str {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The attempt failed; the retry policy decides what follows.
    #[error("{0}")]
    Failed(String),
    /// Retrying cannot help: the job goes straight to the dead-letter state.
    #[error("{0}")]
    Fatal(String),
    /// Like `Failed`, with a result worth keeping on the job (the gate
    /// results); the retry policy decides what follows.
    #[error("{message}")]
    FailedWith {
        message: String,
        result: serde_json::Value,
    },
    /// Like `Fatal`, with a result worth keeping on the job (the secret
    /// findings, the conflicted paths, the stages run so far).
    #[error("{message}")]
    Rejected {
        message: String,
        result: serde_json::Value,
    },
    /// The agent's provider throttled it (`::retry-after::<seconds>`, or
    /// the kind's throttle exit code): run again after `retry_after`,
    /// using up the attempt only if the kind says so.
    #[error("{message}")]
    Throttled {
        message: String,
        retry_after: std::time::Duration,
        counts_attempt: bool,
    },
    /// The handler stopped because its cancellation token fired.
    #[error("interrupted")]
    Interrupted,
}

/// What a payload asks for that only the admin scope may ask: each a field
/// and why. The API refuses such a job from any other token (403).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Privileges {
    pub needs_admin: Vec<(String, String)>,
    /// The job's quality gates are skipped, or required ones left out:
    /// YOLO, marked in its `enqueued` event.
    pub yolo: bool,
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<serde_json::Value, JobError>> + Send>>;

pub trait Handler: Send + Sync + 'static {
    /// Checks a payload at enqueue time, so bad input is refused before it is
    /// stored. The message says which field is wrong and what is allowed.
    fn validate(&self, payload: &serde_json::Value) -> Result<(), PayloadError>;

    /// What of a valid payload needs the admin scope (nothing, by default).
    fn privileges(&self, _payload: &serde_json::Value) -> Privileges {
        Privileges::default()
    }

    /// The concurrency key a job of a valid payload has when it names none,
    /// and the kind's `max_per_key` (none of either, by default).
    fn concurrency(&self, _payload: &serde_json::Value) -> KindConcurrency {
        KindConcurrency::default()
    }

    fn run(&self, ctx: JobContext) -> HandlerFuture;
}

/// What a kind says about concurrency keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindConcurrency {
    pub default_key: Option<String>,
    pub max_per_key: Option<u32>,
}

/// Handlers by job kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

impl Registry {
    /// The kinds every deployment has: `noop`, `sleep`, `flaky`.
    pub fn builtin() -> Self {
        let mut r = Registry::default();
        r.register("noop", Noop);
        r.register("sleep", Sleep);
        r.register("flaky", Flaky);
        r
    }

    /// The built-in kinds plus every kind defined under `workers_dir`.
    pub fn with_kinds(
        defs: Vec<kinds::KindDef>,
        host: &SandboxHost,
        git: Option<&GitHost>,
        admission: &AdmissionSettings,
    ) -> Self {
        let mut r = Registry::builtin();
        let admission = Arc::new(admission.clone());
        for def in defs {
            let kind = def.kind.to_string();
            r.register(
                &kind,
                SandboxKind::new(def, host.clone(), git.cloned(), admission.clone()),
            );
        }
        r
    }

    pub fn register(&mut self, kind: &str, handler: impl Handler) {
        self.handlers.insert(kind.to_owned(), Arc::new(handler));
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    /// What of `payload` needs the admin scope; nothing for unknown kinds
    /// (they are refused by [`Registry::validate`]).
    pub fn privileges(&self, kind: &str, payload: &serde_json::Value) -> Privileges {
        self.handlers
            .get(kind)
            .map(|h| h.privileges(payload))
            .unwrap_or_default()
    }

    /// See [`Handler::concurrency`]; nothing for unknown kinds.
    pub fn concurrency(&self, kind: &str, payload: &serde_json::Value) -> KindConcurrency {
        self.handlers
            .get(kind)
            .map(|h| h.concurrency(payload))
            .unwrap_or_default()
    }

    /// Checks that `kind` exists and accepts `payload`.
    pub fn validate(&self, kind: &str, payload: &serde_json::Value) -> Result<(), PayloadError> {
        match self.handlers.get(kind) {
            Some(h) => h.validate(payload),
            None => Err(PayloadError::UnknownKind {
                kind: kind.to_owned(),
                known: self.kinds().map(str::to_owned).collect(),
            }),
        }
    }
}
