//! The application: connections, the handler registry, and the operations
//! every front end (CLI, HTTP API, bench) shares.

mod dashboard;
mod error;
mod external;
mod killswitch;
mod queues;
mod schedules;
mod webhooks;

pub use dashboard::{Finished, Overview, WorkerInfo, THROUGHPUT_WINDOW};
pub use error::{AppError, ErrorClass};
pub use external::{ExternalOutcome, ExternalTask, EXTERNAL_ARGS_FIELD, EXTERNAL_STOP_WAIT};
pub use queues::QueueInfo;
// What `App::pool` takes and gives, for front ends that run workers.
pub use crate::maintenance::{PruneCounts, RetentionConfig};
/// A new random webhook secret (`whsec_…`), for `webhooks secret` and the
/// webhook bench.
pub use crate::webhook::new_secret as new_webhook_secret;
pub use crate::worker::{Pool, PoolConfig};
pub use killswitch::{KillOutcome, KillReport, KillSwitchStatus, KilledJob, ResumeReport};

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;

use crate::config::Settings;
use crate::git::repo::GitStage;
use crate::git::secrets::Scanner;
use crate::job::{
    FieldError, Job, JobDefaults, JobEdit, JobEvent, JobFilter, JobId, JobRequest, NewJob,
    QueueName, Status,
};
use crate::metrics as m;
use crate::pipeline::kinds::KindDef;
use crate::pipeline::{GitHost, Registry, SandboxHost};
use crate::queue::{IndexEntry, ValkeyQueue};
use crate::store::{ControlRow, Store, StoreError};

/// A replayed idempotency key must describe the same job.
fn check_replay(index: usize, requested: &NewJob, existing: &Job) -> Result<(), AppError> {
    if existing.kind != requested.kind
        || existing.queue != requested.queue
        || existing.payload != requested.payload
    {
        return Err(AppError::KeyReused {
            index,
            key: existing.idempotency_key.clone().unwrap_or_default(),
            job: existing.id,
        });
    }
    Ok(())
}

/// What `/readyz` checks, each `Err` saying why.
#[derive(Debug)]
pub struct Readiness {
    pub postgres: Result<(), String>,
    pub valkey: Result<(), String>,
    pub migrations: Result<(), String>,
    /// The sandbox runtime's name; `None` when not needed here.
    pub sandbox: Result<Option<&'static str>, String>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.postgres.is_ok()
            && self.valkey.is_ok()
            && self.migrations.is_ok()
            && self.sandbox.is_ok()
    }
}

/// The longest reason a cancel request may give.
pub const MAX_CANCEL_REASON_CHARS: usize = 1000;

/// A cancel, kill-all or resume reason: 1 to [`MAX_CANCEL_REASON_CHARS`]
/// characters once trimmed, no control characters but newline and tab
/// (Postgres refuses NUL in text and JSON).
pub fn valid_reason(raw: &str) -> Result<&str, BadReason> {
    let reason = raw.trim();
    if reason.is_empty() || reason.chars().count() > MAX_CANCEL_REASON_CHARS {
        return Err(BadReason::Length);
    }
    if let Some(c) = reason
        .chars()
        .find(|c| c.is_control() && *c != '\n' && *c != '\t')
    {
        return Err(BadReason::Control(c));
    }
    Ok(reason)
}

/// Why [`valid_reason`] refused a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadReason {
    #[error("reason must be 1 to {MAX_CANCEL_REASON_CHARS} characters")]
    Length,
    #[error("reason must not hold control characters (found U+{:04X})", u32::from(*.0))]
    Control(char),
}

/// What a cancel request achieved.
#[derive(Debug)]
pub enum Cancel {
    /// The job was waiting and is now cancelled (or already was).
    Done(Job),
    /// The job is running; its worker has been told to stop it.
    Requested(Job),
}

/// Every operation a front end offers (the API, the CLI, the benchmarks):
/// each does the same thing whichever front end asks. Its parts are
/// private; the accessors below exist for benchmarks and the test kit.
#[derive(Clone)]
pub struct App {
    settings: Settings,
    store: Store,
    queue: ValkeyQueue,
    registry: Registry,
    sandboxes: SandboxHost,
    git: GitHost,
    /// How this replica delivers webhooks (`None`: no secret configured).
    delivery: Option<crate::maintenance::DeliveryConfig>,
    /// When queue depths were last read for `/metrics`.
    depth_sampled: Arc<tokio::sync::Mutex<Option<std::time::Instant>>>,
}

impl App {
    /// Connects to Postgres and Valkey; the errors say which URL failed and
    /// what to run.
    pub async fn connect(settings: Settings) -> Result<Self, AppError> {
        let store = Store::connect(
            settings.database_url.expose(),
            settings.database.max_connections,
        )
        .await?;
        Self::with_store(settings, store).await
    }

    /// Like [`App::connect`], but Postgres is only asked when needed, so
    /// that the kill switch works while it is down.
    pub async fn connect_without_postgres(settings: Settings) -> Result<Self, AppError> {
        let store = Store::connect_lazy(settings.database_url.expose(), 2)?;
        Self::with_store(settings, store).await
    }

    async fn with_store(settings: Settings, store: Store) -> Result<Self, AppError> {
        let queue = ValkeyQueue::connect(
            settings.valkey_url.expose(),
            &settings.key_prefix,
            settings.valkey.cluster,
        )
        .await?;
        let kinds = KindDef::load_dir(&settings.sandbox.workers_dir)?;
        let scanner = Arc::new(match &settings.git.secret_rules {
            Some(path) => Scanner::from_file(path),
            None => Scanner::default_rules(),
        }?);
        let sandboxes = SandboxHost::new(&settings.sandbox.host_options(), &settings.key_prefix)
            .with_host_name(settings.host_name())
            .with_redactor(scanner.clone());
        let git = GitHost {
            stage: GitStage::new(
                // Absolute: worktrees are bind-mounted into sandboxes.
                std::path::absolute(&settings.git.data_dir).map_err(|source| {
                    AppError::DataDir {
                        path: settings.git.data_dir.clone(),
                        source,
                    }
                })?,
                settings.git.author_name.clone(),
                settings.git.author_email.clone(),
                scanner,
            )
            .with_limits(settings.git.limits())
            .with_network(settings.git.network()),
            policy: settings.git.policy(),
            no_changes: settings.git.no_changes,
            yolo: settings.git.yolo,
            coordinator: Some(settings.webhooks.coordinator(&settings.gates)?),
        };
        if settings.git.yolo {
            tracing::warn!(
                "YOLO MODE for the whole deployment (git.yolo): no job's quality gates run"
            );
        }
        Ok(App {
            delivery: settings.webhooks.delivery()?,
            registry: Registry::with_kinds(kinds, &sandboxes, Some(&git), &settings.admission),
            git,
            sandboxes,
            settings,
            store,
            queue,
            depth_sampled: Arc::new(tokio::sync::Mutex::new(None)),
        })
    }

    /// Fails with a clear message when migrations are missing.
    pub async fn ensure_migrated(&self) -> Result<(), AppError> {
        match self.store.migrations_applied().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(AppError::NotMigrated),
            Err(StoreError::Db(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some("42P01") =>
            {
                Err(AppError::NotMigrated)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn job_defaults(&self) -> JobDefaults {
        JobDefaults {
            retry: self.settings.retry,
            timeout_secs: self.settings.jobs.timeout_secs,
            max_timeout_secs: self.settings.jobs.max_timeout_secs,
        }
    }

    /// Validates requests, all or nothing.
    pub fn validate(
        &self,
        requests: Vec<JobRequest>,
        actor: &str,
    ) -> Result<Vec<NewJob>, AppError> {
        let defaults = self.job_defaults();
        let now = Utc::now();
        requests
            .into_iter()
            .enumerate()
            .map(|(index, r)| {
                let mut job = r
                    .validate(&defaults, now, actor, |kind, payload| {
                        self.registry.validate(kind, payload)
                    })
                    .map_err(|error| AppError::Invalid { index, error })?;
                job.yolo = self.privileges(&job).yolo;
                let kind = self.registry.concurrency(job.kind.as_str(), &job.payload);
                let key = job.concurrency.take().map(|(k, _)| k).or(kind.default_key);
                job.concurrency = key.map(|k| {
                    let limit = kind
                        .max_per_key
                        .or_else(|| {
                            self.settings
                                .admission
                                .max_per_key
                                .get(job.queue.as_str())
                                .copied()
                        })
                        .unwrap_or(1)
                        .max(1);
                    (k, limit)
                });
                Ok(job)
            })
            .collect()
    }

    /// What of a valid job needs the admin scope (YOLO, pushing to an
    /// existing branch); front ends without scopes (the CLI) have it.
    pub fn privileges(&self, job: &NewJob) -> crate::pipeline::Privileges {
        self.registry.privileges(job.kind.as_str(), &job.payload)
    }

    /// Writes jobs to Postgres (committed), then indexes them in Valkey.
    /// Returns each job with whether it was created (false: an idempotent
    /// replay, or the job holding its `unique` key). Should indexing fail, the jobs are still safe: the
    /// reconciler indexes them on its next pass.
    ///
    /// Idempotency keys are checked first, for every front end alike: a key
    /// twice in one batch is invalid, and a key that already names a job
    /// with another kind, queue or payload is refused; either way nothing
    /// is written. A replay of the same job returns it, not created. One
    /// race remains: a key first written by a concurrent request between
    /// the check and the insert is refused too, but the other jobs of this
    /// batch are stored (and indexed) by then.
    pub async fn enqueue(&self, jobs: &[NewJob]) -> Result<Vec<(Job, bool)>, AppError> {
        self.check_callbacks(jobs).await?;
        self.check_keys(jobs).await?;
        self.check_queue_cap(jobs).await?;
        let stored = self.store.insert_jobs(jobs).await?;
        // A key written by a concurrent request between the check and the
        // insert comes back as a replay: it must still be the same job. The
        // rest of the batch is stored by then, so it is indexed first.
        let reused = stored
            .iter()
            .zip(jobs)
            .enumerate()
            // A replay of the idempotency key, not a `unique` duplicate
            // (which may differ from the request: that is its point).
            .filter(|(_, ((job, created), requested))| {
                !created
                    && requested.idempotency_key.is_some()
                    && job.idempotency_key == requested.idempotency_key
            })
            .find_map(|(index, ((job, _), requested))| check_replay(index, requested, job).err());
        let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (job, _) in stored.iter().filter(|(_, created)| *created) {
            *counts
                .entry((job.queue.as_str(), job.kind.as_str()))
                .or_default() += 1;
        }
        let created = stored.iter().filter(|(_, c)| *c).map(|(job, _)| job);
        for (queue, jobs, err) in self.queue.index_jobs(created).await {
            tracing::warn!(queue = %queue, error = %err, jobs, "jobs stored but not yet indexed; the reconciler will index them");
        }
        for ((queue, kind), n) in counts {
            metrics::counter!(m::JOBS_ENQUEUED, "queue" => queue.to_owned(), "kind" => kind.to_owned()).increment(n);
        }
        match reused {
            Some(err) => Err(err),
            None => Ok(stored),
        }
    }

    /// Refuses jobs for new queues past `api.max_queues`, naming the first
    /// such job. Without Valkey the cap cannot be read, and the jobs are
    /// taken (Postgres holds them; indexing waits for Valkey anyway).
    async fn check_queue_cap(&self, jobs: &[NewJob]) -> Result<(), AppError> {
        let max = self.settings.api.max_queues;
        let mut queues: Vec<&QueueName> = jobs.iter().map(|j| &j.queue).collect();
        queues.sort();
        queues.dedup();
        let (count, new) = match self.queue.new_queues(&queues).await {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the queue registry; api.max_queues not checked");
                return Ok(());
            }
        };
        // Queues it knows are always taken, even past a lowered cap.
        if new.is_empty() || count + new.len() as u64 <= max {
            return Ok(());
        }
        let index = jobs
            .iter()
            .position(|j| new.contains(&&j.queue))
            .unwrap_or_default();
        Err(AppError::Invalid {
            index,
            error: FieldError::new(
                "queue",
                format!(
                    "queue {:?} would be new, and this deployment already has {count} of at most {max} queues (api.max_queues); use an existing queue",
                    jobs[index].queue.as_str()
                ),
            ),
        })
    }

    /// Idempotency keys: none twice in the batch, none naming another job.
    async fn check_keys(&self, jobs: &[NewJob]) -> Result<(), AppError> {
        let mut seen = std::collections::HashSet::new();
        let mut unique = std::collections::HashSet::new();
        for (index, job) in jobs.iter().enumerate() {
            if let Some(u) = &job.unique {
                if !unique.insert(u.key.as_str()) {
                    return Err(AppError::Invalid {
                        index,
                        error: FieldError::new(
                            "unique.key",
                            format!("unique key {:?} appears twice in this batch", u.key),
                        ),
                    });
                }
            }
            if let Some(key) = &job.idempotency_key {
                if !seen.insert(key.as_str()) {
                    return Err(AppError::Invalid {
                        index,
                        error: FieldError::new(
                            "idempotency_key",
                            format!("idempotency key {key:?} appears twice in this batch"),
                        ),
                    });
                }
            }
        }
        let keyed: Vec<String> = jobs
            .iter()
            .filter_map(|j| j.idempotency_key.clone())
            .collect();
        if keyed.is_empty() {
            return Ok(());
        }
        for existing in self.store.jobs_by_idempotency_keys(&keyed).await? {
            if let Some((index, requested)) = jobs
                .iter()
                .enumerate()
                .find(|(_, j)| j.idempotency_key == existing.idempotency_key)
            {
                check_replay(index, requested, &existing)?;
            }
        }
        Ok(())
    }

    /// Admin retry of a dead job: Postgres first, then the index.
    /// Edits a job that has not started (`PATCH /v1/jobs/{id}`), if it is
    /// still at `version`; then moves it in the index if it still waits.
    pub async fn edit_job(
        &self,
        id: JobId,
        version: i64,
        edit: &JobEdit,
        actor: &str,
    ) -> Result<Job, AppError> {
        let job = self.store.edit_job(id, version, edit, actor).await?;
        let entry = IndexEntry {
            id,
            priority: job.priority,
            due_ms: (job.status == Status::Scheduled).then(|| job.run_at.timestamp_millis()),
        };
        if let Err(err) = self.queue.reindex(&job.queue, &[entry]).await {
            // The edit is committed. The old place may stay: claims check
            // Postgres (a job moved later is refused until due), and the
            // job runs once, perhaps at its old priority.
            tracing::warn!(job.id = %id, error = %err, "edited job not yet moved in the index");
        }
        Ok(job)
    }

    pub async fn retry_dead(&self, id: JobId, actor: &str) -> Result<Job, AppError> {
        let (queue, priority) = self.store.retry_dead(id, actor).await?;
        let job = self.store.get_job(id).await?;
        let entry = IndexEntry {
            id,
            priority,
            due_ms: None,
        };
        let keys: Vec<(JobId, u32, &str)> = job
            .concurrency_key
            .as_deref()
            .zip(job.concurrency_limit)
            .map(|(key, limit)| (id, limit, key))
            .into_iter()
            .collect();
        let indexed = async {
            self.queue.set_concurrency(&queue, &keys).await?;
            self.queue.enqueue(&queue, &[entry]).await
        };
        if let Err(err) = indexed.await {
            tracing::warn!(job.id = %id, error = %err, "retried job not yet indexed; the reconciler will");
        }
        Ok(job)
    }

    /// Cancels a queued or scheduled job: Postgres first, then its index
    /// entry is removed. Idempotent for an already cancelled job.
    pub async fn cancel_waiting(
        &self,
        id: JobId,
        actor: &str,
        reason: &str,
    ) -> Result<Job, AppError> {
        let (job, from) = self.store.cancel_waiting(id, actor, reason).await?;
        if let Some(from) = from {
            m::count_cancel(job.queue.as_str(), from.as_str());
            // Should this fail, a claim of the id is refused by Postgres
            // and the id forgotten then.
            if let Err(err) = self.queue.forget(&job.queue, &[id]).await {
                tracing::warn!(job.id = %id, error = %err, "cancelled job still indexed; it will be dropped when claimed");
            }
            metrics::counter!(m::JOBS_FINISHED, "queue" => job.queue.to_string(), "kind" => job.kind.to_string(), "outcome" => "cancelled").increment(1);
        }
        Ok(job)
    }

    /// Cancels a job wherever it is. A waiting job is cancelled at once; a
    /// running one is flagged, and the worker holding it stops the sandbox,
    /// removes the worktree and records the cancellation itself.
    pub async fn cancel(&self, id: JobId, actor: &str, reason: &str) -> Result<Cancel, AppError> {
        match self.cancel_waiting(id, actor, reason).await {
            Ok(job) => Ok(Cancel::Done(job)),
            Err(err) if err.is_transition_from(Status::Running) => {
                let job = self.store.get_job(id).await?;
                self.store
                    .record_event(
                        id,
                        "cancel_requested",
                        actor,
                        serde_json::json!({ "reason": reason, "status": job.status, "stage": job.stage }),
                    )
                    .await?;
                self.queue.request_cancel(id, actor, reason).await?;
                Ok(Cancel::Requested(job))
            }
            Err(err) => Err(err),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The Postgres store, for benchmarks and tests; front ends use the
    /// operations.
    #[doc(hidden)]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The Valkey index, for benchmarks and tests.
    #[doc(hidden)]
    pub fn queue(&self) -> &ValkeyQueue {
        &self.queue
    }

    /// The sandbox host, for benchmarks and tests.
    #[doc(hidden)]
    pub fn sandboxes(&self) -> &SandboxHost {
        &self.sandboxes
    }

    /// Applies the database migrations.
    pub async fn migrate(&self) -> Result<(), AppError> {
        Ok(self.store.migrate().await?)
    }

    /// What `/readyz` reports: Postgres, Valkey and the schema, and (when
    /// `agents`, workers in this process) the sandbox runtime's name.
    pub async fn readiness(&self, agents: bool) -> Readiness {
        Readiness {
            postgres: self.store.ping().await.map_err(|e| e.to_string()),
            valkey: self.queue.ping().await.map_err(|e| e.to_string()),
            migrations: self.ensure_migrated().await.map_err(|e| e.to_string()),
            sandbox: if agents {
                self.sandboxes
                    .check()
                    .await
                    .map(Some)
                    .map_err(|e| e.to_string())
            } else {
                Ok(None)
            },
        }
    }

    pub async fn job(&self, id: JobId) -> Result<Job, AppError> {
        Ok(self.store.get_job(id).await?)
    }

    /// The jobs with these ids that exist, in no particular order.
    pub async fn jobs_by_ids(&self, ids: &[JobId]) -> Result<Vec<Job>, AppError> {
        Ok(self.store.get_jobs(ids).await?)
    }

    /// Newest first, keyset-paginated.
    pub async fn jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, AppError> {
        Ok(self.store.list_jobs(filter).await?)
    }

    /// The jobs already holding these idempotency keys.
    pub async fn jobs_by_idempotency_keys(&self, keys: &[String]) -> Result<Vec<Job>, AppError> {
        Ok(self.store.jobs_by_idempotency_keys(keys).await?)
    }

    /// A job's audit trail, after the event id `after` when given.
    pub async fn job_events(
        &self,
        id: JobId,
        after: Option<i64>,
    ) -> Result<Vec<JobEvent>, AppError> {
        Ok(self.store.job_events(id, after).await?)
    }

    /// The kill switch's audit trail, newest first.
    pub async fn control_events(&self, limit: u32) -> Result<Vec<ControlRow>, AppError> {
        Ok(self.store.control_events(limit).await?)
    }

    /// One retention pass with `cfg`, as the maintenance service runs it
    /// (the benchmark drives it beside a queue run).
    pub async fn prune_finished_jobs(
        &self,
        cfg: &RetentionConfig,
    ) -> Result<PruneCounts, AppError> {
        Ok(crate::maintenance::prune(&self.store, cfg).await?)
    }

    /// A worker pool over this app's connections.
    pub fn pool(&self, cfg: PoolConfig) -> Pool {
        self.pool_with_registry(cfg, self.registry.clone())
    }

    fn pool_with_registry(&self, cfg: PoolConfig, registry: Registry) -> Pool {
        Pool::new(self.store.clone(), self.queue.clone(), registry, cfg)
            .with_sandboxes(self.sandboxes.clone())
            .with_git(self.git.stage.clone())
            .with_webhooks(self.delivery.clone())
            .with_schedules(Some(self.scheduler_config()))
            .with_retention(self.settings.retention.config())
    }
}
