//! Maintenance services, each a small unit with a `*_once` step that tests
//! call directly: the promoter, the reaper (and its slower scan for lost
//! leases), the reconciler, the kill switch's holds, the audit outbox and
//! the depth sampler. Every one is idempotent and safe to run in every
//! replica at once.

mod deliverer;
mod holds;
mod outbox;
mod promoter;
mod reaper;
mod reconciler;
pub(crate) mod repair;
mod retention;
mod sampler;
mod sandboxes;
mod scheduler;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::job::QueueName;
use crate::metrics as m;
use crate::queue::ValkeyQueue;
use crate::store::Store;

pub use deliverer::{DeliveryConfig, RESPONSE_LIMIT};
pub use reaper::ReapCounts;
pub use retention::{prune, PruneCounts, RetentionConfig};
pub use scheduler::{JobFactory, SchedulerConfig};

/// Called at the end of every full reconcile pass.
pub type Observer = Arc<dyn Fn(ReconcileCounts) + Send + Sync>;

/// A round trip to Valkey or Postgres (or the sandbox runtime) failed; the
/// service retries after a pause.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("sandbox runtime: {0}")]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("git: {0}")]
    Git(#[from] crate::git::repo::GitError),
    /// A blocking task (git work) panicked or was cancelled.
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The pause after `failures` failed rounds in a row: 200 ms doubling to 5 s.
pub(crate) fn error_backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)).min(5_000))
}
pub use reconciler::ReconcileCounts;
pub use sandboxes::OrphanReport;

/// Most delayed ids promoted per queue per run.
pub const PROMOTE_LIMIT: usize = 1_000;
/// Most expired leases handled per queue per run.
pub const REAP_LIMIT: u32 = 500;
/// Live jobs read per page while rebuilding the index.
pub const RECONCILE_PAGE: u32 = 2_000;

#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    /// How often due delayed jobs are promoted.
    pub promote_interval: Duration,
    /// How often expired leases are looked for.
    pub reap_interval: Duration,
    /// How often Postgres is scanned for expired leases Valkey lost.
    pub lease_scan_interval: Duration,
    /// How long a reaper holds expired ids before another may look at them.
    pub reap_hold: Duration,
    /// Period of the full index rebuild.
    pub reconcile_interval: Duration,
    /// How often the rebuild sentinel is checked (detects a flushed Valkey).
    pub flush_check_interval: Duration,
    /// How often queue depths are sampled into metrics.
    pub sample_interval: Duration,
    /// How often orphaned sandboxes are looked for.
    pub orphan_interval: Duration,
}

/// The maintenance services of one worker, over the queues it serves.
#[derive(Clone)]
pub struct Maintenance {
    store: Store,
    valkey: ValkeyQueue,
    queues: Vec<QueueName>,
    /// Recorded as the actor of the transitions maintenance makes.
    actor: String,
    cfg: MaintenanceConfig,
    observer: Option<Observer>,
    sandboxes: Option<crate::pipeline::SandboxHost>,
    git: Option<crate::git::repo::GitStage>,
    webhooks: Option<DeliveryConfig>,
    schedules: Option<SchedulerConfig>,
    retention: Option<RetentionConfig>,
}

impl Maintenance {
    pub fn new(
        store: Store,
        valkey: ValkeyQueue,
        queues: Vec<QueueName>,
        actor: String,
        cfg: MaintenanceConfig,
    ) -> Self {
        Maintenance {
            store,
            valkey,
            queues,
            actor,
            cfg,
            observer: None,
            sandboxes: None,
            git: None,
            webhooks: None,
            schedules: None,
            retention: None,
        }
    }

    /// Also deletes finished jobs past their retention.
    pub fn with_retention(mut self, cfg: Option<RetentionConfig>) -> Self {
        self.retention = cfg;
        self
    }

    /// Also enqueues the jobs of due schedules.
    pub fn with_schedules(mut self, cfg: Option<SchedulerConfig>) -> Self {
        self.schedules = cfg;
        self
    }

    /// Also delivers webhooks from the outbox.
    pub fn with_webhooks(mut self, cfg: Option<DeliveryConfig>) -> Self {
        self.webhooks = cfg;
        self
    }

    /// Also reaps orphaned worktrees of `stage`.
    pub fn with_git(mut self, stage: Option<crate::git::repo::GitStage>) -> Self {
        self.git = stage;
        self
    }

    /// Also reaps orphaned sandboxes of `host`'s runtime.
    pub fn with_sandboxes(mut self, host: Option<crate::pipeline::SandboxHost>) -> Self {
        self.sandboxes = host;
        self
    }

    /// Reports the end of every full reconcile pass to `tell` (tests, bench).
    pub fn with_observer(mut self, tell: Option<Observer>) -> Self {
        self.observer = tell;
        self
    }

    fn observe(&self, counts: ReconcileCounts) {
        if let Some(tell) = &self.observer {
            tell(counts);
        }
    }

    /// Runs every service until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        let mut tasks = JoinSet::new();
        let me = Arc::new(self);
        let cfg = me.cfg.clone();
        let m = me.clone();
        tasks.spawn(periodic(
            "promoter",
            cfg.promote_interval,
            stop.clone(),
            move || {
                let m = m.clone();
                async move { m.promote_once().await.map(drop) }
            },
        ));
        let m = me.clone();
        tasks.spawn(periodic(
            "reaper",
            cfg.reap_interval,
            stop.clone(),
            move || {
                let m = m.clone();
                async move { m.reap_once().await.map(drop) }
            },
        ));
        let m = me.clone();
        tasks.spawn(periodic(
            "lease-scanner",
            cfg.lease_scan_interval,
            stop.clone(),
            move || {
                let m = m.clone();
                async move { m.reap_lost_once().await.map(drop) }
            },
        ));
        let m = me.clone();
        let full_every = (cfg.reconcile_interval.as_millis()
            / cfg.flush_check_interval.as_millis().max(1))
        .max(1);
        let mut tick = 0u128;
        tasks.spawn(periodic(
            "reconciler",
            cfg.flush_check_interval,
            stop.clone(),
            move || {
                let m = m.clone();
                // The first run (startup) and every `full_every`-th is a full rebuild.
                let full = tick % full_every == 0;
                tick += 1;
                async move { m.reconcile_once(full).await.map(drop) }
            },
        ));
        let m = me.clone();
        tasks.spawn(periodic(
            "kill-switch-holds",
            cfg.flush_check_interval,
            stop.clone(),
            move || {
                let m = m.clone();
                async move { m.sync_holds_once().await.map(drop) }
            },
        ));
        let m = me.clone();
        tasks.spawn(periodic(
            "outbox",
            cfg.flush_check_interval,
            stop.clone(),
            move || {
                let m = m.clone();
                async move { m.drain_outbox_once().await.map(drop) }
            },
        ));
        let m = me.clone();
        tasks.spawn(periodic(
            "sampler",
            cfg.sample_interval,
            stop.clone(),
            move || {
                let m = m.clone();
                async move { m.sample_once().await }
            },
        ));
        me.spawn_webhooks(&mut tasks, &stop);
        if let Some(sched) = me.schedules.clone() {
            let m = me.clone();
            tasks.spawn(periodic(
                "scheduler",
                sched.interval,
                stop.clone(),
                move || {
                    let m = m.clone();
                    let sched = sched.clone();
                    async move { m.schedule_once(&sched).await.map(drop) }
                },
            ));
        }
        if let Some(retention) = me.retention.clone() {
            let m = me.clone();
            tasks.spawn(periodic(
                "retention",
                retention.interval,
                stop.clone(),
                move || {
                    let m = m.clone();
                    let retention = retention.clone();
                    async move { m.prune_once(&retention).await.map(drop) }
                },
            ));
        }
        if me.sandboxes.is_some() || me.git.is_some() {
            let m = me.clone();
            tasks.spawn(periodic(
                "orphan-reaper",
                cfg.orphan_interval,
                stop.clone(),
                move || {
                    let m = m.clone();
                    async move {
                        m.reap_sandboxes_once().await?;
                        m.reap_worktrees_once().await.map(drop)
                    }
                },
            ));
        }
        while tasks.join_next().await.is_some() {}
    }
}

impl Maintenance {
    /// Runs only the webhook deliverer and its sampler (a replica without
    /// workers) until `stop` fires.
    pub async fn run_webhooks(self, stop: CancellationToken) {
        let mut tasks = JoinSet::new();
        Arc::new(self).spawn_webhooks(&mut tasks, &stop);
        while tasks.join_next().await.is_some() {}
    }

    fn spawn_webhooks(self: &Arc<Self>, tasks: &mut JoinSet<()>, stop: &CancellationToken) {
        let Some(delivery) = self.webhooks.clone() else {
            return;
        };
        let m = self.clone();
        let until = stop.clone();
        tasks.spawn(async move { m.deliver(delivery, until).await });
        let m = self.clone();
        tasks.spawn(periodic(
            "webhook-sampler",
            self.cfg.sample_interval,
            stop.clone(),
            move || {
                let m = m.clone();
                async move { m.sample_webhooks_once().await }
            },
        ));
    }
}

/// Calls `step` every `interval` until `stop` fires; failures are logged,
/// counted and retried with a growing pause.
async fn periodic<F, Fut>(
    name: &'static str,
    interval: Duration,
    stop: CancellationToken,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), MaintenanceError>>,
{
    let mut failures = 0u32;
    loop {
        let pause = match step().await {
            Ok(()) => {
                failures = 0;
                interval
            }
            Err(err) => {
                failures += 1;
                metrics::counter!(m::LOOP_ERRORS, "task" => name).increment(1);
                tracing::warn!(task = name, error = %err, "maintenance step failed");
                interval.max(error_backoff(failures))
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
