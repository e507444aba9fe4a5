//! The worker runtime: claim loops filling free slots, the batch completer,
//! lease heartbeats, maintenance, and graceful shutdown.
//!
//! A job's path through a worker: a claimer pops ids from Valkey and starts
//! them in Postgres (one transaction per batch), a task runs the handler, the
//! completer writes the outcome to Postgres (one transaction per batch) and
//! only then updates Valkey. Heartbeats keep the leases of running jobs alive
//! until their outcome is committed.

mod claimer;
mod completer;
mod heartbeat;
mod runner;
mod saturation;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::job::{JobId, QueueName, Status};
use crate::pipeline::Registry;
use crate::queue::{CancelRequest, Control, KillSwitchState, ValkeyQueue};
use crate::store::Store;

/// Everything a pool needs to know; see `config/default.toml` for meanings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub worker_id: String,
    /// The host it runs on, as the worker registry and sandbox labels say.
    pub host: String,
    pub queues: Vec<QueueName>,
    pub concurrency: usize,
    pub lease: Duration,
    pub claim_batch: usize,
    /// Jobs claimed ahead of free slots, to claim the next batch while the
    /// current one runs. 0 suits long jobs; hundreds suit tiny ones.
    pub prefetch: usize,
    pub poll_interval: Duration,
    pub shutdown_grace: Duration,
    pub complete_batch: usize,
    pub maintenance: crate::maintenance::MaintenanceConfig,
    /// Most jobs running at once per queue, across every worker.
    pub queue_limits: std::collections::BTreeMap<String, u32>,
    /// Rate limits by queue.
    pub rates: std::collections::BTreeMap<String, crate::queue::Rates>,
    /// Claim at most this many jobs, run them, then stop (`worker
    /// --one-job` is 1): a scaled-to-zero replica that exits after its work,
    /// so scaling down never interrupts a job.
    pub max_jobs: Option<usize>,
    /// Stop once nothing was claimed or running for this long.
    pub idle_exit: Option<Duration>,
    /// Claim jobs. False: run only the maintenance and the heartbeat until
    /// stopped (`worker --maintenance-only`, beside pods that each run one
    /// job and exit, which must not take the maintenance with them).
    pub claim: bool,
}

/// `<host>-<pid>-<random>`: unique per replica, readable in logs.
pub fn new_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..6])
}

/// What a pool reports to an observer (tests and `bench`), in place of sleeps.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolEvent {
    /// Jobs started under a lease.
    Started(Vec<JobId>),
    /// Outcomes committed in Postgres (and then applied to Valkey).
    Finished(Vec<(JobId, Status)>),
    /// Completions refused for a stale lease.
    Stale(Vec<JobId>),
    /// A full reconcile pass ended.
    Reconciled(crate::maintenance::ReconcileCounts),
    /// A cancel request reached a job this pool runs (its stop has begun).
    CancelSeen(JobId),
}

/// A round trip to Valkey or Postgres failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Maintenance(#[from] crate::maintenance::MaintenanceError),
}

/// The pool's maintenance, sharing its connections.
async fn run_maintenance(shared: Arc<Shared>, stop: CancellationToken) {
    let observer = shared.observer.clone().map(|tx| {
        let tell: crate::maintenance::Observer = Arc::new(move |counts| {
            let _ = tx.send(PoolEvent::Reconciled(counts));
        });
        tell
    });
    let maintenance = crate::maintenance::Maintenance::new(
        shared.store.clone(),
        shared.queue.clone(),
        shared.cfg.queues.clone(),
        shared.cfg.worker_id.clone(),
        shared.cfg.maintenance.clone(),
    )
    .with_observer(observer)
    .with_sandboxes(shared.sandboxes.clone())
    .with_git(shared.git.clone())
    .with_webhooks(shared.webhooks.clone())
    .with_schedules(shared.schedules.clone())
    .with_retention(shared.retention.clone());
    maintenance.run(stop).await;
}

/// Why a running job's cancellation token fired.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StopReason {
    /// Shutdown grace period over: release without using up the attempt.
    Shutdown,
    /// Heartbeat found the lease gone: another worker may own the job now.
    LeaseLost,
    /// Someone cancelled the job: it ends `cancelled`.
    Cancelled {
        actor: String,
        reason: String,
        requested_ms: Option<i64>,
    },
}

/// A job this worker holds a lease on: claimed, waiting for a slot or running.
struct InFlight {
    queue: QueueName,
    priority: u8,
    lease_id: i64,
    /// The runner handed its outcome to the completer.
    reported: bool,
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
}

impl InFlight {
    fn new(queue: QueueName, priority: u8, lease_id: i64) -> Self {
        InFlight {
            queue,
            priority,
            lease_id,
            reported: false,
            cancel: CancellationToken::new(),
            reason: Arc::new(Mutex::new(None)),
        }
    }
}

/// State shared by a pool's tasks.
struct Shared {
    store: Store,
    queue: ValkeyQueue,
    registry: Registry,
    cfg: PoolConfig,
    /// Jobs running at once: `concurrency`.
    slots: Arc<Semaphore>,
    /// Jobs claimed and not yet finished: `concurrency + prefetch`.
    credits: Arc<Semaphore>,
    inflight: Mutex<HashMap<JobId, InFlight>>,
    /// Woken by Valkey pub/sub when ids became pending.
    wake: Notify,
    /// The kill switch is engaged (as far as this worker knows): claim
    /// nothing, stop everything.
    halted: AtomicBool,
    /// One read-and-apply of the kill switch at a time (listener and
    /// heartbeat), so an older answer never overrides a newer one.
    kill_switch_sync: tokio::sync::Mutex<()>,
    observer: Option<mpsc::UnboundedSender<PoolEvent>>,
    worker_id: Arc<str>,
    /// Jobs this pool may still claim, when `max_jobs` is set.
    budget: Option<AtomicUsize>,
    /// When a job was last claimed or finished (or the pool started).
    last_busy: Mutex<std::time::Instant>,
    /// Whether the claims say this pool is saturated with short jobs.
    saturation: Mutex<saturation::Saturation>,
    /// For the orphan reapers.
    sandboxes: Option<crate::pipeline::SandboxHost>,
    git: Option<crate::git::repo::GitStage>,
    webhooks: Option<crate::maintenance::DeliveryConfig>,
    schedules: Option<crate::maintenance::SchedulerConfig>,
    retention: Option<crate::maintenance::RetentionConfig>,
}

impl Shared {
    fn observe(&self, event: impl FnOnce() -> PoolEvent) {
        if let Some(tx) = &self.observer {
            let _ = tx.send(event());
        }
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, InFlight>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every critical section is a single insert/remove/iteration).
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn busy_slots(&self) -> usize {
        self.cfg.concurrency - self.slots.available_permits()
    }

    /// Takes up to `want` claims from the budget (all of them without one).
    fn reserve(&self, want: usize) -> usize {
        let Some(budget) = &self.budget else {
            return want;
        };
        let mut left = budget.load(Ordering::SeqCst);
        loop {
            let take = left.min(want);
            match budget.compare_exchange(left, left - take, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return take,
                Err(now) => left = now,
            }
        }
    }

    /// Gives back claims reserved but not made.
    fn unreserve(&self, unused: usize) {
        if let Some(budget) = &self.budget {
            budget.fetch_add(unused, Ordering::SeqCst);
        }
    }

    /// The budget is spent: claim nothing more.
    fn budget_spent(&self) -> bool {
        self.budget
            .as_ref()
            .is_some_and(|b| b.load(Ordering::SeqCst) == 0)
    }

    fn mark_busy(&self) {
        *self.last_busy.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    /// Notes a claim; while the claims say this pool is saturated with
    /// short jobs, tells the deployment's webhook deliverers (in the
    /// background: a claim never waits on it, and a lost mark only means
    /// deliveries are not deferred).
    fn note_claim(&self, asked: usize, got: usize) {
        let mark = self
            .saturation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .claimed(asked, got, std::time::Instant::now());
        if mark {
            let queue = self.queue.clone();
            tokio::spawn(async move {
                if let Err(err) = queue.mark_saturated(saturation::MARK_TTL).await {
                    tracing::debug!(error = %err, "could not mark the pool saturated");
                }
            });
        }
    }

    /// Nothing claimed or running for `idle_exit`.
    fn idle_too_long(&self) -> bool {
        let Some(limit) = self.cfg.idle_exit else {
            return false;
        };
        if !self.inflight().is_empty() {
            self.mark_busy();
            return false;
        }
        self.last_busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            >= limit
    }
}

pub struct Pool {
    shared: Shared,
}

impl Pool {
    pub fn new(store: Store, queue: ValkeyQueue, registry: Registry, cfg: PoolConfig) -> Self {
        let slots = Arc::new(Semaphore::new(cfg.concurrency));
        let credits = Arc::new(Semaphore::new(cfg.concurrency + cfg.prefetch));
        Pool {
            shared: Shared {
                store,
                queue,
                registry,
                slots,
                credits,
                inflight: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                halted: AtomicBool::new(false),
                kill_switch_sync: tokio::sync::Mutex::new(()),
                observer: None,
                worker_id: Arc::from(cfg.worker_id.as_str()),
                budget: cfg.max_jobs.map(AtomicUsize::new),
                last_busy: Mutex::new(std::time::Instant::now()),
                saturation: Mutex::new(saturation::Saturation::new(
                    cfg.concurrency,
                    std::time::Instant::now(),
                )),
                sandboxes: None,
                git: None,
                webhooks: None,
                schedules: None,
                retention: None,
                cfg,
            },
        }
    }

    /// Reports every start and finish to `tx` (tests, benchmarks).
    pub fn with_observer(mut self, tx: mpsc::UnboundedSender<PoolEvent>) -> Self {
        self.shared.observer = Some(tx);
        self
    }

    /// Reaps orphaned sandboxes of this host's runtime.
    pub fn with_sandboxes(mut self, host: crate::pipeline::SandboxHost) -> Self {
        self.shared.sandboxes = Some(host);
        self
    }

    /// Reaps orphaned worktrees of this git stage.
    pub fn with_git(mut self, stage: crate::git::repo::GitStage) -> Self {
        self.shared.git = Some(stage);
        self
    }

    /// Deletes finished jobs past their retention (with the other
    /// maintenance).
    pub fn with_retention(mut self, cfg: Option<crate::maintenance::RetentionConfig>) -> Self {
        self.shared.retention = cfg;
        self
    }

    /// Enqueues the jobs of due schedules (with the other maintenance).
    pub fn with_schedules(mut self, cfg: Option<crate::maintenance::SchedulerConfig>) -> Self {
        self.shared.schedules = cfg;
        self
    }

    /// Delivers webhooks from the outbox (with the other maintenance).
    pub fn with_webhooks(mut self, cfg: Option<crate::maintenance::DeliveryConfig>) -> Self {
        self.shared.webhooks = cfg;
        self
    }

    pub fn worker_id(&self) -> &str {
        &self.shared.cfg.worker_id
    }

    /// Runs until `stop` fires, then shuts down gracefully: no new claims,
    /// in-flight jobs get the grace period to finish, the rest are released
    /// back to their queue without using up an attempt.
    pub async fn run(self, stop: CancellationToken) {
        let shared = Arc::new(self.shared);
        let cfg = &shared.cfg;
        tracing::info!(worker_id = %cfg.worker_id, queues = ?cfg.queues, concurrency = cfg.concurrency, "worker starting");
        metrics::gauge!(crate::metrics::WORKER_SLOTS).set(cfg.concurrency as f64);
        if let Err(err) = shared
            .queue
            .register_queues(&cfg.queues.iter().collect::<Vec<_>>())
            .await
        {
            tracing::warn!(error = %err, "cannot register queues in Valkey yet");
        }
        for queue in &cfg.queues {
            let limit = cfg.queue_limits.get(queue.as_str()).copied();
            if let Err(err) = shared.queue.set_limit(queue, limit).await {
                tracing::warn!(queue = %queue, error = %err, "cannot set the queue's limit yet");
            }
        }

        // Tasks that live as long as the pool itself.
        let background = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let (completions, completer) = completer::start(shared.clone());
        tasks.spawn(heartbeat::run(shared.clone(), background.clone()));
        tasks.spawn(run_maintenance(shared.clone(), background.clone()));
        tasks.spawn(claimer::forward_wakeups(shared.clone(), background.clone()));
        tasks.spawn(listen_for_controls(shared.clone(), background.clone()));

        let (buffer, buffered) = mpsc::unbounded_channel();
        let dispatcher = tokio::spawn(claimer::dispatch(
            shared.clone(),
            buffered,
            completions.clone(),
            stop.clone(),
        ));
        let mut claimers = JoinSet::new();
        if cfg.claim {
            for queue in cfg.queues.clone() {
                claimers.spawn(claimer::run(
                    shared.clone(),
                    queue,
                    buffer.clone(),
                    stop.clone(),
                ));
            }
        }
        drop(buffer);
        if !cfg.claim {
            tracing::info!(worker_id = %cfg.worker_id, "maintenance only: claiming nothing");
            stop.cancelled().await;
        }
        while claimers.join_next().await.is_some() {}
        // Every claimer is gone, so the buffer closes once drained: the
        // dispatcher releases what never started.
        if let Err(err) = dispatcher.await {
            tracing::error!(error = %err, "dispatcher task failed");
        }
        tracing::info!(worker_id = %cfg.worker_id, busy = shared.busy_slots(), "stopped claiming; waiting for in-flight jobs");

        // Claiming ended by itself (budget spent, idle): the jobs run to
        // their end unless a stop comes. Then, or on a stop, the grace
        // period: wait for every slot to come back.
        let all = u32::try_from(cfg.concurrency).unwrap_or(u32::MAX);
        let all_back = shared.slots.acquire_many(all);
        tokio::pin!(all_back);
        let finished = if stop.is_cancelled() {
            tokio::time::timeout(cfg.shutdown_grace, all_back).await
        } else {
            tokio::select! {
                done = &mut all_back => Ok(done),
                () = stop.cancelled() => tokio::time::timeout(cfg.shutdown_grace, all_back).await,
            }
        };
        if finished.is_err() {
            let interrupted = interrupt_all(&shared, StopReason::Shutdown);
            tracing::warn!(
                jobs = interrupted,
                "grace period over; releasing unfinished jobs"
            );
            // Handlers honour their token promptly; give them a moment, then
            // release whatever still has not reported, directly.
            let _ =
                tokio::time::timeout(Duration::from_secs(5), shared.slots.acquire_many(all)).await;
            runner::release_remaining(&shared, &completions).await;
        }
        drop(completions);
        if let Err(err) = completer.await {
            tracing::error!(error = %err, "completer task failed");
        }
        background.cancel();
        while tasks.join_next().await.is_some() {}
        if let Err(err) = shared.queue.worker_deregister(&cfg.worker_id).await {
            tracing::debug!(error = %err, "could not deregister worker");
        }
        tracing::info!(worker_id = %cfg.worker_id, "worker stopped");
    }
}

/// Cancel requests and kill switch changes: jobs this worker holds stop at
/// once (the heartbeat also polls the durable flags, for missed messages).
async fn listen_for_controls(shared: Arc<Shared>, stop: CancellationToken) {
    let mut messages = shared.queue.control_listener();
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            m = messages.recv() => match m { Some(m) => m, None => return },
        };
        match message {
            Control::Cancel(id) => {
                if !shared.inflight().contains_key(&id) {
                    continue;
                }
                if let Err(err) = stop_cancelled(&shared, &[id]).await {
                    tracing::warn!(job.id = %id, error = %err, "cannot read a cancel request; the heartbeat will");
                }
            }
            Control::KillSwitch => sync_kill_switch(&shared).await,
        }
    }
}

/// Reads the kill switch and acts on it: while it is engaged this worker
/// claims nothing and stops every job it holds; once lifted, it claims again.
async fn sync_kill_switch(shared: &Shared) {
    let _one_at_a_time = shared.kill_switch_sync.lock().await;
    read_kill_switch(shared).await;
}

/// The heartbeat's look at the kill switch: skipped while the listener
/// reads it, so a slow Valkey never holds up lease renewals twice.
async fn poll_kill_switch(shared: &Shared) {
    if let Ok(_one_at_a_time) = shared.kill_switch_sync.try_lock() {
        read_kill_switch(shared).await;
    }
}

async fn read_kill_switch(shared: &Shared) {
    match shared.queue.kill_switch().await {
        Ok(state) => apply_kill_switch(shared, state.as_ref()),
        Err(err) => tracing::debug!(error = %err, "cannot read the kill switch"),
    }
}

fn apply_kill_switch(shared: &Shared, state: Option<&KillSwitchState>) {
    crate::metrics::set_kill_switch(state.is_some());
    let Some(state) = state else {
        if shared.halted.swap(false, Ordering::SeqCst) {
            tracing::warn!("kill switch lifted; claiming again");
            shared.wake.notify_waiters();
        }
        return;
    };
    if !shared.halted.swap(true, Ordering::SeqCst) {
        tracing::warn!(actor = %state.actor, reason = %state.reason, "KILL SWITCH ENGAGED: stopping every job and claiming nothing");
    }
    let stop = StopReason::Cancelled {
        actor: state.actor.clone(),
        reason: state.reason.clone(),
        requested_ms: Some(state.since.timestamp_millis()),
    };
    let inflight = shared.inflight();
    for job in inflight.values().filter(|j| !j.reported) {
        let mut r = job.reason.lock().unwrap_or_else(|e| e.into_inner());
        r.get_or_insert_with(|| stop.clone());
        job.cancel.cancel();
    }
}

/// Fires the cancellation token of every running job; returns how many.
fn interrupt_all(shared: &Shared, reason: StopReason) -> usize {
    let inflight = shared.inflight();
    for job in inflight.values() {
        let mut r = job.reason.lock().unwrap_or_else(|e| e.into_inner());
        r.get_or_insert(reason.clone());
        job.cancel.cancel();
    }
    inflight.len()
}

/// Reads the cancel flags of `ids` and stops those jobs this worker holds.
async fn stop_cancelled(shared: &Shared, ids: &[JobId]) -> Result<(), crate::queue::QueueError> {
    let requests = shared.queue.cancel_requests(ids).await?;
    apply_cancels(shared, &requests);
    Ok(())
}

/// Stops the jobs of `requests` that this worker holds.
fn apply_cancels(shared: &Shared, requests: &[CancelRequest]) {
    let inflight = shared.inflight();
    for CancelRequest {
        id,
        actor,
        reason,
        requested_ms,
    } in requests
    {
        let Some(job) = inflight.get(id) else {
            continue;
        };
        let mut r = job.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            tracing::warn!(job.id = %id, actor = %actor, "cancel requested; stopping the job");
            *r = Some(StopReason::Cancelled {
                actor: actor.clone(),
                reason: reason.clone(),
                requested_ms: *requested_ms,
            });
        }
        job.cancel.cancel();
        shared.observe(|| PoolEvent::CancelSeen(*id));
    }
}

/// Sleep after a failed round trip: doubles up to 5 s, so an unreachable
/// service is retried promptly but not hammered.
use crate::maintenance::error_backoff;
