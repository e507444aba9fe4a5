//! A test environment: a fresh Postgres database and a fresh Valkey key
//! prefix per test (so tests run in parallel), settings tuned for tests, a
//! worker pool in the test's process, and job requests.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use orchestrator::app::App;
use orchestrator::config::Settings;
use orchestrator::job::{Job, JobId, JobRequest, Status};
use orchestrator::maintenance::Maintenance;
use orchestrator::secret::Secret;
use orchestrator::worker::{PoolConfig, PoolEvent};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn env_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh, which starts the services and sets it")
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub(super) fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Replaces the database name of a Postgres URL.
pub fn with_database(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("valid database URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

/// Creates an empty database with the schema applied; returns its URL.
pub async fn fresh_database(server_url: &str) -> String {
    let name = format!("test_{}", short_id());
    let admin = sqlx::PgPool::connect(server_url)
        .await
        .expect("connect to Postgres");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let url = with_database(server_url, &name);
    let pool = sqlx::PgPool::connect(&url)
        .await
        .expect("connect to test database");
    orchestrator::store::MIGRATOR
        .run(&pool)
        .await
        .expect("migrations");
    pool.close().await;
    url
}

/// Settings tuned for tests: short leases and fast maintenance.
pub fn test_settings(database_url: &str, valkey_url: &str) -> Settings {
    let mut s = Settings::load(None).expect("default settings");
    s.database_url = Secret::new(database_url);
    s.valkey_url = Secret::new(valkey_url);
    s.key_prefix = format!("t{}", short_id());
    s.database.max_connections = 8;
    s.worker.lease_ms = 2_000;
    s.worker.poll_interval_ms = 100;
    s.worker.shutdown_grace_secs = 5;
    s.retry.backoff_base_ms = 100;
    s.retry.backoff_cap_ms = 1_000;
    s.maintenance.promote_interval_ms = 100;
    s.maintenance.reap_interval_ms = 200;
    s.maintenance.flush_check_interval_ms = 200;
    s.maintenance.reconcile_interval_secs = 3600;
    s
}

pub struct TestEnv {
    pub app: App,
    pub database_url: String,
    pub valkey_url: String,
}

impl TestEnv {
    /// Shared Valkey (own key prefix), own database.
    pub async fn new() -> TestEnv {
        let valkey_url = env_var("ORCH_VALKEY_URL");
        Self::with_valkey(&valkey_url).await
    }

    pub async fn with_valkey(valkey_url: &str) -> TestEnv {
        let database_url = fresh_database(&env_var("ORCH_DATABASE_URL")).await;
        Self::with_services(&database_url, valkey_url).await
    }

    /// Shared Valkey, own database, settings adjusted by `adjust`.
    pub async fn with_settings(adjust: impl FnOnce(&mut Settings)) -> TestEnv {
        let valkey_url = env_var("ORCH_VALKEY_URL");
        let database_url = fresh_database(&env_var("ORCH_DATABASE_URL")).await;
        let mut settings = test_settings(&database_url, &valkey_url);
        adjust(&mut settings);
        let app = App::connect(settings).await.expect("connect app");
        TestEnv {
            app,
            database_url,
            valkey_url,
        }
    }

    pub async fn with_services(database_url: &str, valkey_url: &str) -> TestEnv {
        let settings = test_settings(database_url, valkey_url);
        let app = App::connect(settings).await.expect("connect app");
        TestEnv {
            app,
            database_url: database_url.to_owned(),
            valkey_url: valkey_url.to_owned(),
        }
    }

    pub fn pool_config(&self, queue: &str, concurrency: usize) -> PoolConfig {
        let mut cfg = self.app.settings().pool_config();
        cfg.queues = vec![queue.parse().expect("queue name")];
        cfg.concurrency = concurrency;
        cfg
    }

    pub fn maintenance(&self, queue: &str) -> Maintenance {
        let cfg = self.pool_config(queue, 1);
        Maintenance::new(
            self.app.store().clone(),
            self.app.queue().clone(),
            cfg.queues.clone(),
            "test-maintenance".to_owned(),
            cfg.maintenance,
        )
    }

    /// Starts an in-process pool with an observer.
    pub fn start_pool(&self, cfg: PoolConfig) -> RunningPool {
        let (tx, events) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let pool = self.app.pool(cfg).with_observer(tx);
        let handle = tokio::spawn(pool.run(stop.clone()));
        RunningPool {
            stop,
            handle,
            events,
        }
    }

    pub async fn enqueue(&self, requests: Vec<JobRequest>) -> Vec<Job> {
        let jobs = self.app.validate(requests, "test").expect("valid requests");
        self.app
            .enqueue(&jobs)
            .await
            .expect("enqueue")
            .into_iter()
            .map(|(job, _)| job)
            .collect()
    }

    pub async fn job(&self, id: JobId) -> Job {
        self.app.store().get_job(id).await.expect("job exists")
    }

    /// Polls Postgres until every job is terminal, or panics after `limit`.
    pub async fn wait_terminal(&self, ids: &[JobId], limit: Duration) -> Vec<Job> {
        let deadline = Instant::now() + limit;
        loop {
            let uuids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status IN ('queued', 'scheduled', 'running')",
            )
            .bind(&uuids)
            .fetch_one(self.app.store().pool())
            .await
            .unwrap_or(i64::MAX);
            if open == 0 {
                let mut jobs = Vec::new();
                for id in ids {
                    jobs.push(self.job(*id).await);
                }
                return jobs;
            }
            assert!(
                Instant::now() < deadline,
                "{open} of {} jobs still not finished after {limit:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Number of events of each given type per job.
    pub async fn event_counts(&self, id: JobId, kind: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM job_events WHERE job_id = $1 AND type = $2")
            .bind(id.0)
            .bind(kind)
            .fetch_one(self.app.store().pool())
            .await
            .expect("count events")
    }

    /// A job's event types, in order.
    pub async fn event_types(&self, id: JobId) -> Vec<String> {
        self.app
            .store()
            .job_events(id, None)
            .await
            .expect("events")
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    /// The data of a job's last event, which must be its `cancelled` event
    /// (who asked, why, from where).
    pub async fn cancelled_event(&self, id: JobId) -> serde_json::Value {
        let events = self.app.store().job_events(id, None).await.expect("events");
        let last = events.last().expect("events");
        assert_eq!(last.kind, "cancelled", "{events:?}");
        last.data.clone()
    }

    /// Terminal events (succeeded, dead, cancelled) of a job.
    pub async fn terminal_events(&self, id: JobId) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM job_events WHERE job_id = $1 AND type IN ('succeeded', 'dead', 'cancelled')",
        )
        .bind(id.0)
        .fetch_one(self.app.store().pool())
        .await
        .expect("count events")
    }
}

pub struct RunningPool {
    pub stop: CancellationToken,
    pub handle: JoinHandle<()>,
    pub events: mpsc::UnboundedReceiver<PoolEvent>,
}

impl RunningPool {
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("pool stops within 30s")
            .expect("pool task did not panic");
    }

    /// Waits until `n` jobs have started (as the pool reports).
    pub async fn wait_started(&mut self, n: usize, limit: Duration) -> Vec<JobId> {
        let mut started = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        while started.len() < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(PoolEvent::Started(ids))) => started.extend(ids),
                Ok(Some(_)) => {}
                _ => panic!(
                    "only {} of {n} jobs started within {limit:?}",
                    started.len()
                ),
            }
        }
        started
    }
}

pub fn request(kind: &str, queue: &str, payload: serde_json::Value) -> JobRequest {
    JobRequest {
        kind: kind.to_owned(),
        queue: Some(queue.to_owned()),
        payload: Some(payload),
        ..JobRequest::default()
    }
}

pub fn unique_queue() -> String {
    format!("q-{}", short_id())
}

pub fn assert_status(jobs: &[Job], status: Status) {
    for j in jobs {
        assert_eq!(
            j.status, status,
            "job {} is {} ({:?})",
            j.id, j.status, j.last_error
        );
    }
}

/// The value of the first sample of `name` carrying every one of `labels`,
/// in Prometheus' text format (as `PrometheusHandle::render` or `/metrics`
/// give it); `None` if there is none.
pub fn metric_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
