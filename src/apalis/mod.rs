//! orchestrator as an apalis 1.0 backend (feature `apalis`): Rust services
//! that already use apalis keep their jobs, and get this queue's
//! durability, priorities and audit trail.
//!
//! [`OrchestratorStorage`] is both ends, like apalis's own storages:
//!
//! - **Producing.** It is a [`TaskSink`]: `push`, `push_bulk`,
//!   `push_task`… turn each task into a job of the storage's kind and
//!   queue, through the same [`App::validate`] and [`App::enqueue`] as
//!   `POST /v1/jobs` (Postgres first, then Valkey). The task's priority
//!   (1 lowest to 10 highest), `run_at` (a delay), `max_attempts` and
//!   idempotency key carry over; its arguments are stored as JSON under the
//!   payload's `args`.
//! - **Consuming.** It is a [`Backend`] for an apalis `Worker`. Its first
//!   poll starts one of our worker pools ([`App::external_pool`]) on the
//!   storage's queue. The pool does what it does for every job: batched
//!   claims with prefetch, lease renewal by heartbeat, timeouts, cancels and
//!   the kill switch, fenced batched transitions with their `job_events`.
//!   The stream hands each claimed job to the worker as a `Task`, and the
//!   backend's middleware ([`OrchestratorLayer`], outermost, so it sees
//!   what the user's middleware returns) reports how the task ended:
//!   - `Ok` succeeds the job (the response, serialized, is its result);
//!   - `Err` is a failed attempt, retried with the job's backoff;
//!     [`AbortError`] makes it dead at once, and [`RetryAfterError`]
//!     retries after its delay;
//!   - a panic, or a timeout (ours, the job's `timeout_secs`, or the user's
//!     tower timeout), is a failed attempt too.
//!
//!   A cancel (`orchestrator cancel`, `POST /v1/jobs/{id}/cancel`, the kill
//!   switch) fires the task's [`Cancellation`], which handlers can take as
//!   an argument. A handler that does not stop within
//!   [`EXTERNAL_STOP_WAIT`] is dropped. Closing the worker gives back the
//!   jobs it claimed but never started, without using their attempts.
//!
//! So our guarantees hold through apalis. A stale worker cannot complete a
//! task, since outcomes are fenced by the lease the pool holds. Flushing
//! Valkey loses nothing, since the reconciler re-indexes from Postgres.
//! Every transition is a `job_events` row.
//!
//! Which of apalis-core's traits, and why:
//! - [`Backend`], [`BackendConfig`] and [`TaskSink`] are implemented.
//! - [`FetchById`] is implemented: a job by its id, decoded as a `Task`.
//! - `Update`, `Reschedule`, `Vacuum` and `ResumeById` are not. Edits go
//!   through `PATCH /v1/jobs/{id}` (versioned and audited), retries through
//!   the dead-letter endpoints, and pruning through retention. A second,
//!   unfenced path around those would weaken them.
//! - [`WaitForCompletion`] is implemented: results as the jobs finish, read
//!   from Postgres (the truth) at the worker's poll interval.
//! - `ListTasks` is not: it lists tasks in apalis's wire format (a
//!   `WireFormatBackend` codec), which this storage does not have, since
//!   arguments are JSON in the job's payload. Jobs are listed by
//!   `GET /v1/jobs?queue=…&kind=…`, and a job's events by
//!   `GET /v1/jobs/{id}/events`, or SSE.
//! - `apalis_core::backend::persistence` is not used. It keeps claimed tasks
//!   and their acks in the worker's memory, which is what the pool already
//!   does durably.
//!
//! The backend's kind marker is [`Orchestrated`], not apalis's `Durable`.
//! The storage decodes the arguments itself, so a payload that does not
//! decode makes its job dead with a clear error, instead of ending the
//! worker's stream.

use std::any::type_name;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use apalis_core::backend::finalize::FinalizeBackend;
use apalis_core::backend::{
    Backend, BackendConfig, FetchById, TaskResult, TaskSink, TaskSinkError, WaitForCompletion,
};
use apalis_core::error::{AbortError, BoxDynError, RetryAfterError};
use apalis_core::layers::{Layer, Service};
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::data::MissingDataError;
use apalis_core::task::from_request::FromRequest;
use apalis_core::task::task_id::TaskId;
use apalis_core::task::Task;
use apalis_core::worker::context::WorkerContext;
use chrono::DateTime;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, Sink, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::{
    App, AppError, ErrorClass, ExternalOutcome, ExternalTask, PoolConfig, EXTERNAL_ARGS_FIELD,
    EXTERNAL_STOP_WAIT,
};
use crate::job::{Job, JobId, JobKind, JobRequest, NameError, QueueName, Status};

/// The actor producers' jobs are recorded under.
pub const ACTOR: &str = "apalis";

/// Tasks per enqueue: the HTTP API's largest batch too.
const ENQUEUE_CHUNK: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    App(#[from] AppError),
    #[error("{what}: {source}")]
    Name {
        what: &'static str,
        #[source]
        source: NameError,
    },
    #[error("{0}")]
    Config(String),
    #[error("cannot encode the task's arguments as JSON: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("job {id}: its arguments do not decode as {ty}: {source}")]
    Decode {
        id: JobId,
        ty: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("job {0} is not of this storage's kind and queue")]
    Foreign(JobId),
    #[error("no job {0}")]
    NotFound(JobId),
    #[error("task id {0} is not a job id (a UUID)")]
    NotAJob(String),
    #[error("the worker pool ended abnormally: {0}")]
    Pool(#[source] tokio::task::JoinError),
}

/// What an [`OrchestratorStorage`] produces to and consumes from.
#[derive(Debug, Clone)]
pub struct Config {
    kind: JobKind,
    queue: QueueName,
    concurrency: Option<usize>,
    prefetch: Option<usize>,
    claim_batch: Option<usize>,
    timeout_secs: Option<i64>,
}

impl Config {
    /// Jobs of `kind` in the queue `default`. Give apalis kinds a queue of
    /// their own ([`Config::queue`]) that no plain `orchestrator worker`
    /// serves: one has no handler for the kind, and fails such a job.
    pub fn new(kind: &str) -> Result<Self, Error> {
        Ok(Config {
            kind: JobKind::parse(kind).map_err(name_error("kind"))?,
            queue: QueueName::parse("default").map_err(name_error("queue"))?,
            concurrency: None,
            prefetch: None,
            claim_batch: None,
            timeout_secs: None,
        })
    }

    pub fn queue(mut self, queue: &str) -> Result<Self, Error> {
        self.queue = QueueName::parse(queue).map_err(name_error("queue"))?;
        Ok(self)
    }

    /// Jobs the pool runs at once (`worker.concurrency` by default). Give
    /// the apalis worker at least as much concurrency, or claimed jobs wait
    /// for it (their leases renewed).
    pub fn concurrency(mut self, slots: usize) -> Result<Self, Error> {
        if slots == 0 || slots > 10_000 {
            return Err(Error::Config(format!(
                "concurrency must be between 1 and 10000, got {slots}"
            )));
        }
        self.concurrency = Some(slots);
        Ok(self)
    }

    /// Jobs claimed ahead of free slots (`worker.prefetch` by default).
    pub fn prefetch(mut self, jobs: usize) -> Self {
        self.prefetch = Some(jobs);
        self
    }

    /// Jobs per claim (`worker.claim_batch` by default).
    pub fn claim_batch(mut self, jobs: usize) -> Result<Self, Error> {
        if jobs == 0 {
            return Err(Error::Config("claim_batch must be at least 1".into()));
        }
        self.claim_batch = Some(jobs);
        Ok(self)
    }

    /// How long each pushed task may run (the kind's default, from
    /// settings, otherwise). At the end its `Cancellation` fires and the
    /// attempt fails.
    pub fn timeout(mut self, limit: std::time::Duration) -> Result<Self, Error> {
        let secs = i64::try_from(limit.as_secs())
            .ok()
            .filter(|secs| *secs > 0)
            .ok_or_else(|| {
                Error::Config(format!("timeout {limit:?}: give whole seconds, at least 1"))
            })?;
        self.timeout_secs = Some(secs);
        Ok(self)
    }

    pub fn kind(&self) -> &JobKind {
        &self.kind
    }

    pub fn queue_name(&self) -> &QueueName {
        &self.queue
    }
}

fn name_error(what: &'static str) -> impl FnOnce(NameError) -> Error {
    move |source| Error::Name { what, source }
}

/// The kind marker of [`OrchestratorStorage`]: it yields decoded tasks, so
/// the worker takes it as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Orchestrated;

impl<B, Args> FinalizeBackend<B, Args> for Orchestrated {
    type Backend = B;

    fn finalize(current: B) -> B {
        current
    }
}

/// An apalis backend and task sink on an orchestrator queue.
pub struct OrchestratorStorage<Args> {
    app: App,
    config: Config,
    /// Tasks given to `start_send`, enqueued on the next flush.
    buffer: Vec<Task<Args>>,
    pushing: Option<BoxFuture<'static, Result<(), Error>>>,
    consumer: Consumer,
    _args: PhantomData<fn() -> Args>,
}

enum Consumer {
    Idle,
    Running {
        tasks: mpsc::Receiver<ExternalTask>,
        stop: CancellationToken,
        pool: JoinHandle<()>,
    },
    Closing(JoinHandle<()>),
    Closed,
}

impl<Args> fmt::Debug for OrchestratorStorage<Args> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let consumer = match self.consumer {
            Consumer::Idle => "idle",
            Consumer::Running { .. } => "running",
            Consumer::Closing(_) => "closing",
            Consumer::Closed => "closed",
        };
        f.debug_struct("OrchestratorStorage")
            .field("config", &self.config)
            .field("buffered", &self.buffer.len())
            .field("consumer", &consumer)
            .finish_non_exhaustive()
    }
}

// Nothing in it is pinned structurally: the sink and backend only ever
// reach it through `get_mut`.
impl<Args> Unpin for OrchestratorStorage<Args> {}

/// A clone shares the connections, not the buffer or the consumer.
impl<Args> Clone for OrchestratorStorage<Args> {
    fn clone(&self) -> Self {
        OrchestratorStorage {
            app: self.app.clone(),
            config: self.config.clone(),
            buffer: Vec::new(),
            pushing: None,
            consumer: Consumer::Idle,
            _args: PhantomData,
        }
    }
}

impl<Args> OrchestratorStorage<Args> {
    /// A storage over `app`'s connections; the kind becomes one that `app`
    /// accepts at enqueue.
    pub fn new(mut app: App, config: Config) -> Self {
        app.accept_external_kind(config.kind.as_str());
        OrchestratorStorage {
            app,
            config,
            buffer: Vec::new(),
            pushing: None,
            consumer: Consumer::Idle,
            _args: PhantomData,
        }
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    fn pool_config(&self) -> PoolConfig {
        let mut cfg = self.app.settings().pool_config();
        cfg.queues = vec![self.config.queue.clone()];
        if let Some(slots) = self.config.concurrency {
            cfg.concurrency = slots;
        }
        if let Some(jobs) = self.config.prefetch {
            cfg.prefetch = jobs;
        }
        if let Some(jobs) = self.config.claim_batch {
            cfg.claim_batch = jobs;
        }
        // The worker closes the backend only once every task it started has
        // ended; what is left never started, and goes back at once.
        cfg.shutdown_grace = std::time::Duration::ZERO;
        cfg
    }

    fn start(&mut self, worker: &WorkerContext) {
        let cfg = self.pool_config();
        tracing::info!(
            apalis_worker = worker.name(),
            worker_id = %cfg.worker_id,
            kind = %self.config.kind,
            queue = %self.config.queue,
            "apalis worker on orchestrator starting"
        );
        let (pool, tasks) = self.app.external_pool(cfg, self.config.kind.as_str());
        let stop = CancellationToken::new();
        let pool = tokio::spawn(pool.run(stop.clone()));
        self.consumer = Consumer::Running { tasks, stop, pool };
    }
}

impl<Args: Serialize> OrchestratorStorage<Args> {
    /// Enqueues tasks, all or nothing per batch of 1000, and returns their
    /// jobs' ids (an idempotent replay returns the existing job's).
    pub fn enqueue_tasks(
        &self,
        tasks: Vec<Task<Args>>,
    ) -> impl Future<Output = Result<Vec<JobId>, Error>> + Send + 'static {
        let requests = tasks
            .into_iter()
            .map(|task| self.request(task))
            .collect::<Result<Vec<_>, _>>();
        let app = self.app.clone();
        async move { enqueue(&app, requests?).await }
    }

    fn request(&self, task: Task<Args>) -> Result<JobRequest, Error> {
        let (args, ctx) = task.take();
        let args = serde_json::to_value(&args).map_err(Error::Encode)?;
        // Out of range values are refused by validation, not clamped here.
        let wide = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let run_at = match ctx.run_at() {
            Some(secs) => Some(
                i64::try_from(secs)
                    .ok()
                    .and_then(|secs| DateTime::from_timestamp(secs, 0))
                    .ok_or_else(|| Error::Config(format!("run_at {secs}: not a valid time")))?,
            ),
            None => None,
        };
        Ok(JobRequest {
            kind: self.config.kind.to_string(),
            queue: Some(self.config.queue.to_string()),
            priority: ctx.priority().map(wide),
            payload: Some(serde_json::json!({ EXTERNAL_ARGS_FIELD: args })),
            max_attempts: ctx.max_attempts().map(wide),
            run_at,
            idempotency_key: ctx.idempotency_key().map(str::to_owned),
            timeout_secs: self.config.timeout_secs,
            ..JobRequest::default()
        })
    }
}

impl<Args> OrchestratorStorage<Args> {
    /// Drives the flush under way, if any, to its end.
    fn poll_pushing(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let Some(pushing) = self.pushing.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let done = ready!(pushing.poll_unpin(cx));
        self.pushing = None;
        Poll::Ready(done)
    }
}

async fn enqueue(app: &App, requests: Vec<JobRequest>) -> Result<Vec<JobId>, Error> {
    let mut ids = Vec::with_capacity(requests.len());
    let mut requests = requests.into_iter().peekable();
    while requests.peek().is_some() {
        let chunk: Vec<_> = requests.by_ref().take(ENQUEUE_CHUNK).collect();
        let jobs = app.validate(chunk, ACTOR)?;
        ids.extend(app.enqueue(&jobs).await?.into_iter().map(|(job, _)| job.id));
    }
    Ok(ids)
}

/// A job's JSON (its arguments, or its result) as `T`.
fn decode<T: DeserializeOwned>(id: JobId, value: &serde_json::Value) -> Result<T, Error> {
    T::deserialize(value).map_err(|source| Error::Decode {
        id,
        ty: type_name::<T>(),
        source,
    })
}

/// A task for the job `id`, with its attempt count and limits.
fn task_of<Args>(
    args: Args,
    id: JobId,
    attempt: u32,
    max_attempts: u32,
    priority: u8,
) -> TaskBuilder<Args> {
    TaskBuilder::new(args)
        .task_id(TaskId::from_uuid(id.0))
        .attempt(attempt as usize)
        .max_attempts(max_attempts as usize)
        .priority(usize::from(priority))
}

/// A claimed job as the worker's task, or `None` when its arguments do not
/// decode (then the job is dead, saying why).
fn into_task<Args: DeserializeOwned>(external: ExternalTask) -> Option<Task<Args>> {
    let args = match decode(external.id, &external.args) {
        Ok(args) => args,
        Err(error) => {
            tracing::warn!(job.id = %external.id, %error, "task dropped");
            external.finish(ExternalOutcome::Fatal(error.to_string()));
            return None;
        }
    };
    // The worker counts the run it starts.
    let builder = task_of(
        args,
        external.id,
        external.attempt.saturating_sub(1),
        external.max_attempts,
        external.priority,
    )
    .data(Cancellation(external.cancel.clone()));
    let settle = Settle {
        cancel: external.cancel.clone(),
        task: Arc::new(Mutex::new(Some(external))),
    };
    Some(builder.data(settle).build())
}

impl<Args> Backend for OrchestratorStorage<Args>
where
    Args: DeserializeOwned + Send + 'static,
{
    type Task = Task<Args>;
    type Error = Error;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        if let Consumer::Idle = self.consumer {
            self.start(worker);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Option<Result<Task<Args>, Error>>> {
        let Consumer::Running { tasks, .. } = &mut self.consumer else {
            return Poll::Ready(None);
        };
        loop {
            match ready!(tasks.poll_recv(cx)) {
                Some(external) => {
                    if let Some(task) = into_task(external) {
                        return Poll::Ready(Some(Ok(task)));
                    }
                }
                // The pool ended (it is only stopped by `poll_close`).
                None => return Poll::Ready(None),
            }
        }
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        loop {
            match std::mem::replace(&mut self.consumer, Consumer::Closed) {
                Consumer::Idle | Consumer::Closed => return Poll::Ready(Ok(())),
                Consumer::Running {
                    mut tasks,
                    stop,
                    pool,
                } => {
                    // Handed over but never started: back to the queue.
                    tasks.close();
                    while let Ok(task) = tasks.try_recv() {
                        task.finish(ExternalOutcome::NotRun);
                    }
                    stop.cancel();
                    self.consumer = Consumer::Closing(pool);
                }
                Consumer::Closing(mut pool) => match Pin::new(&mut pool).poll(cx) {
                    Poll::Pending => {
                        self.consumer = Consumer::Closing(pool);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Pool(e))),
                },
            }
        }
    }
}

impl<Args> BackendConfig for OrchestratorStorage<Args> {
    type Args = Args;
    type Id = uuid::Uuid;
    type Kind = Orchestrated;
    type Config = Config;
    type Layer = OrchestratorLayer;

    fn config(&self) -> &Config {
        &self.config
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> OrchestratorLayer {
        OrchestratorLayer
    }
}

impl<Args> FetchById for OrchestratorStorage<Args>
where
    Args: DeserializeOwned + Send + 'static,
{
    /// The job with this id, if it is of this storage's kind and queue (its
    /// status is the job's: `GET /v1/jobs/{id}`).
    fn fetch_by_id(
        &mut self,
        task_id: &TaskId,
    ) -> impl Future<Output = Result<Option<Task<Args>>, Error>> + Send {
        let app = self.app.clone();
        let config = self.config.clone();
        let id = job_id(task_id).ok();
        async move {
            let Some(id) = id else { return Ok(None) };
            let job = match app.job(id).await {
                Ok(job) => job,
                Err(e) if matches!(e.class(), ErrorClass::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if job.kind != config.kind || job.queue != config.queue {
                return Err(Error::Foreign(id));
            }
            let args = job
                .payload
                .get(EXTERNAL_ARGS_FIELD)
                .cloned()
                .unwrap_or_default();
            let args = decode(id, &args)?;
            Ok(Some(
                task_of(args, id, job.attempt, job.max_attempts, job.priority).build(),
            ))
        }
    }
}

/// The job a task id names: ours are the job's UUID.
fn job_id(task_id: &TaskId) -> Result<JobId, Error> {
    match task_id {
        TaskId::Uuid(id) => Ok(JobId(*id)),
        TaskId::String(s) => s
            .parse::<uuid::Uuid>()
            .map(JobId)
            .map_err(|_| Error::NotAJob(s.clone())),
        other => Err(Error::NotAJob(other.to_string())),
    }
}

/// A job as apalis sees a task's result: the response for a job that
/// succeeded, the last error (or the status) otherwise.
fn task_result<Output: DeserializeOwned>(job: &Job) -> Result<TaskResult<Output>, Error> {
    use apalis_core::task::status::Status as Apalis;
    let status = match job.status {
        Status::Scheduled => Apalis::Pending,
        Status::Queued => Apalis::Queued,
        Status::Running => Apalis::Running,
        Status::Succeeded => Apalis::Done,
        Status::Dead => Apalis::Failed,
        Status::Cancelled => Apalis::Killed,
    };
    let result = match job.status {
        Status::Succeeded => Ok(decode(
            job.id,
            job.result.as_ref().unwrap_or(&serde_json::Value::Null),
        )?),
        other => Err(job
            .last_error
            .clone()
            .unwrap_or_else(|| format!("the job is {other}"))),
    };
    Ok(TaskResult {
        task_id: TaskId::from_uuid(job.id.0),
        attempt: job.attempt as usize,
        status,
        result,
    })
}

impl<Args, Output> WaitForCompletion<Output> for OrchestratorStorage<Args>
where
    Args: DeserializeOwned + Send + 'static,
    Output: DeserializeOwned + Send + 'static,
{
    type ResultStream = BoxStream<'static, Result<TaskResult<Output>, Error>>;

    /// Each task's result as its job finishes (succeeded, dead or
    /// cancelled), read from Postgres every `worker.poll_interval_ms`; an id
    /// that names no job yields an error. The stream ends when every task
    /// has yielded.
    fn wait_for(&mut self, task_ids: impl IntoIterator<Item = TaskId>) -> Self::ResultStream {
        let app = self.app.clone();
        let every = std::time::Duration::from_millis(app.settings().worker.poll_interval_ms);
        let mut ready: VecDeque<Result<TaskResult<Output>, Error>> = VecDeque::new();
        let mut waiting = Vec::new();
        for task_id in task_ids {
            match job_id(&task_id) {
                Ok(id) => waiting.push(id),
                Err(e) => ready.push_back(Err(e)),
            }
        }
        futures_util::stream::unfold(
            (app, waiting, ready, true),
            move |(app, mut waiting, mut ready, mut first)| async move {
                loop {
                    if let Some(item) = ready.pop_front() {
                        return Some((item, (app, waiting, ready, first)));
                    }
                    if waiting.is_empty() {
                        return None;
                    }
                    if !first {
                        tokio::time::sleep(every).await;
                    }
                    first = false;
                    let jobs = match app.jobs_by_ids(&waiting).await {
                        Ok(jobs) => jobs,
                        // The stream goes on after an outage; the caller
                        // sees it.
                        Err(e) => {
                            ready.push_back(Err(e.into()));
                            continue;
                        }
                    };
                    let jobs: HashMap<JobId, Job> = jobs.into_iter().map(|j| (j.id, j)).collect();
                    waiting.retain(|id| match jobs.get(id) {
                        None => {
                            ready.push_back(Err(Error::NotFound(*id)));
                            false
                        }
                        Some(job) if job.status.is_terminal() => {
                            ready.push_back(task_result(job));
                            false
                        }
                        Some(_) => true,
                    });
                }
            },
        )
        .boxed()
    }

    /// Each task's status now; a task that has not succeeded has its last
    /// error, or its status, as its `Err`.
    fn check_status(
        &mut self,
        task_ids: impl IntoIterator<Item = TaskId> + Send,
    ) -> impl Future<Output = Result<Vec<TaskResult<Output>>, Error>> + Send {
        let app = self.app.clone();
        let ids: Result<Vec<JobId>, Error> = task_ids.into_iter().map(|t| job_id(&t)).collect();
        async move {
            let ids = ids?;
            let jobs: HashMap<JobId, Job> = app
                .jobs_by_ids(&ids)
                .await?
                .into_iter()
                .map(|j| (j.id, j))
                .collect();
            ids.iter()
                .map(|id| {
                    jobs.get(id)
                        .ok_or(Error::NotFound(*id))
                        .and_then(task_result)
                })
                .collect()
        }
    }
}

impl<Args> Sink<Task<Args>> for OrchestratorStorage<Args>
where
    Args: Serialize + Send + 'static,
{
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // One flush at a time: a new task waits for the one under way.
        self.get_mut().poll_pushing(cx)
    }

    fn start_send(self: Pin<&mut Self>, task: Task<Args>) -> Result<(), Error> {
        self.get_mut().buffer.push(task);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.pushing.is_none() {
            if this.buffer.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let requests = std::mem::take(&mut this.buffer)
                .into_iter()
                .map(|task| this.request(task))
                .collect::<Result<Vec<_>, _>>()?;
            let app = this.app.clone();
            this.pushing = Some(async move { enqueue(&app, requests).await.map(drop) }.boxed());
        }
        this.poll_pushing(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_flush(cx)
    }
}

impl<Args> TaskSink<Args, Orchestrated> for OrchestratorStorage<Args>
where
    Args: Serialize + DeserializeOwned + Send + 'static,
{
    fn start_send(self: Pin<&mut Self>, item: Task<Args>) -> Result<(), TaskSinkError<Error>> {
        Sink::start_send(self, item).map_err(TaskSinkError::PushError)
    }

    fn poll_ready(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TaskSinkError<Error>>> {
        Sink::poll_ready(self, cx).map_err(TaskSinkError::PushError)
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TaskSinkError<Error>>> {
        Sink::poll_flush(self, cx).map_err(TaskSinkError::PushError)
    }

    fn poll_close(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TaskSinkError<Error>>> {
        Sink::poll_close(self, cx).map_err(TaskSinkError::PushError)
    }

    async fn push(&mut self, task: Args) -> Result<(), TaskSinkError<Error>> {
        self.push_task(TaskBuilder::new(task).build()).await
    }

    async fn push_bulk(&mut self, tasks: Vec<Args>) -> Result<(), TaskSinkError<Error>> {
        let tasks = tasks
            .into_iter()
            .map(|args| TaskBuilder::new(args).build())
            .collect();
        self.enqueue_tasks(tasks)
            .await
            .map(drop)
            .map_err(TaskSinkError::PushError)
    }

    async fn push_stream(
        &mut self,
        tasks: impl Stream<Item = Args> + Unpin + Send,
    ) -> Result<(), TaskSinkError<Error>> {
        self.push_all(tasks.map(|args| TaskBuilder::new(args).build()))
            .await
    }

    async fn push_task(&mut self, task: Task<Args>) -> Result<(), TaskSinkError<Error>> {
        self.enqueue_tasks(vec![task])
            .await
            .map(drop)
            .map_err(TaskSinkError::PushError)
    }

    async fn push_all(
        &mut self,
        tasks: impl Stream<Item = Task<Args>> + Unpin + Send,
    ) -> Result<(), TaskSinkError<Error>> {
        let mut chunks = tasks.chunks(ENQUEUE_CHUNK);
        while let Some(chunk) = chunks.next().await {
            self.enqueue_tasks(chunk)
                .await
                .map_err(TaskSinkError::PushError)?;
        }
        Ok(())
    }
}

/// Fires when the task must stop: its job was cancelled (alone, or by the
/// kill switch), timed out, lost its lease, or its worker is stopping. A
/// handler takes it as an argument:
/// `async fn handle(args: MyArgs, cancel: Cancellation)`.
#[derive(Debug, Clone)]
pub struct Cancellation(CancellationToken);

impl Cancellation {
    pub async fn cancelled(&self) {
        self.0.cancelled().await;
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

impl<Args: Sync> FromRequest<Task<Args>> for Cancellation {
    type Error = MissingDataError;

    async fn from_request(task: &Task<Args>) -> Result<Self, MissingDataError> {
        task.ctx().data().get_checked::<Cancellation>().cloned()
    }
}

/// Where a task's outcome goes: its job's handler in the pool, once.
#[derive(Clone)]
struct Settle {
    cancel: CancellationToken,
    task: Arc<Mutex<Option<ExternalTask>>>,
}

impl Settle {
    fn finish(&self, outcome: ExternalOutcome) {
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.finish(outcome);
        }
    }

    /// Runs the task's future to its end (or its stop) and reports how it
    /// ended.
    async fn run<F, T, E>(self, run: F) -> Result<T, BoxDynError>
    where
        F: Future<Output = Result<T, E>>,
        E: Into<BoxDynError>,
        T: Serialize,
    {
        let mut run = std::pin::pin!(AssertUnwindSafe(run).catch_unwind());
        let ended = tokio::select! {
            biased;
            ended = &mut run => ended,
            () = self.cancel.cancelled() => {
                match tokio::time::timeout(EXTERNAL_STOP_WAIT, &mut run).await {
                    Ok(ended) => ended,
                    Err(_) => {
                        self.finish(ExternalOutcome::Failed(Stopped.to_string()));
                        return Err(Stopped.into());
                    }
                }
            }
        };
        match ended {
            Ok(Ok(response)) => {
                let result = serde_json::to_value(&response).unwrap_or_else(|error| {
                    tracing::warn!(%error, "the task's response does not serialize; no result kept");
                    serde_json::Value::Null
                });
                self.finish(ExternalOutcome::Succeeded(result));
                Ok(response)
            }
            Ok(Err(error)) => {
                let error = error.into();
                self.finish(outcome_of(&*error));
                Err(error)
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                let error = Panicked(message);
                self.finish(ExternalOutcome::Failed(error.to_string()));
                Err(error.into())
            }
        }
    }
}

fn outcome_of(error: &(dyn std::error::Error + Send + Sync + 'static)) -> ExternalOutcome {
    if error.downcast_ref::<AbortError>().is_some() {
        ExternalOutcome::Fatal(error.to_string())
    } else if let Some(retry) = error.downcast_ref::<RetryAfterError>() {
        ExternalOutcome::RetryAfter(error.to_string(), retry.get_duration())
    } else {
        ExternalOutcome::Failed(error.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the task did not stop within {}s of its cancel", EXTERNAL_STOP_WAIT.as_secs())]
struct Stopped;

#[derive(Debug, thiserror::Error)]
#[error("the task's handler panicked: {0}")]
struct Panicked(String);

/// The backend's middleware: reports each task's end to its job.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrchestratorLayer;

impl<S> Layer<S> for OrchestratorLayer {
    type Service = OrchestratorService<S>;

    fn layer(&self, inner: S) -> OrchestratorService<S> {
        OrchestratorService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct OrchestratorService<S> {
    inner: S,
}

impl<S, Args> Service<Task<Args>> for OrchestratorService<S>
where
    S: Service<Task<Args>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxDynError> + Send + 'static,
    S::Response: Serialize + Send + 'static,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<S::Response, BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Args>) -> Self::Future {
        let settle = task.ctx().data().get::<Settle>().cloned();
        let run = self.inner.call(task);
        async move {
            match settle {
                Some(settle) => settle.run(run).await,
                // Not one of ours (a task built by hand): nothing to report.
                None => run.await.map_err(Into::into),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use apalis_core::error::{AbortError, RetryAfterError};
    use std::time::Duration;

    use crate::apalis::outcome_of;
    use crate::app::ExternalOutcome;

    #[test]
    fn errors_map_to_outcomes() {
        let plain: Box<dyn std::error::Error + Send + Sync> = "boom".into();
        assert_eq!(outcome_of(&*plain), ExternalOutcome::Failed("boom".into()));
        let abort = AbortError::new("bad input");
        assert!(matches!(outcome_of(&abort), ExternalOutcome::Fatal(m) if m.contains("bad input")));
        let retry = RetryAfterError::new("429", Duration::from_secs(7));
        assert!(matches!(
            outcome_of(&retry),
            ExternalOutcome::RetryAfter(m, d) if m.contains("429") && d == Duration::from_secs(7)
        ));
    }
}
