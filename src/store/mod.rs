//! Postgres: the truth about every job.
//!
//! Every status change is one transaction that locks the rows it changes
//! (`SELECT … FOR UPDATE`, in id order so concurrent batches never deadlock),
//! checks the current status against [`Status::can_transition_to`] and, for
//! running jobs, the fencing token (`lease_id`) and lease deadline, writes the
//! new state and appends a `job_events` row, all in one statement.

mod control;
mod jobs;
mod rows;
mod schedules;
mod transitions;
mod webhooks;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::job::{JobId, Status};
pub use control::{ControlEvent, ControlKind, ControlRow};
pub use jobs::{Failure, IndexState, LeaseHolder, ProgressWrite, QueueCounts};
pub use schedules::{ScheduleWriteError, TickRun};
pub use transitions::{ClaimedJob, Finish, FinishOutcome, Reaped};
pub use webhooks::{ClaimedDelivery, DeliveryOutcome, FanOutPass};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Takes a transaction-scoped advisory lock on each of `keys` (within
/// `namespace`), in key order and each once, so two transactions locking
/// overlapping sets cannot deadlock. Returns the keys, sorted and deduped.
pub(crate) async fn lock_keys<'k>(
    conn: &mut sqlx::PgConnection,
    namespace: &str,
    keys: impl IntoIterator<Item = &'k str>,
) -> Result<Vec<&'k str>, StoreError> {
    let mut keys: Vec<&str> = keys.into_iter().collect();
    keys.sort_unstable();
    keys.dedup();
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended($1 || k, 0))
         FROM UNNEST($2::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
    )
    .bind(namespace)
    .bind(&keys)
    .execute(&mut *conn)
    .await?;
    Ok(keys)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot reach PostgreSQL at {url} (start it with scripts/services.sh, or set ORCH_DATABASE_URL)")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("job {0} not found")]
    NotFound(JobId),
    #[error("job {job} is {from}; it cannot become {to}")]
    InvalidTransition {
        job: JobId,
        from: Status,
        to: Status,
    },
    /// The caller's lease is gone: it expired, or another worker holds the
    /// job now. Nothing was changed.
    #[error(
        "stale lease on job {job}: lease {lease_id} is no longer current; nothing was changed"
    )]
    StaleLease { job: JobId, lease_id: i64 },
    #[error("corrupt row in the database: {0}")]
    Corrupt(String),
    /// An edit named a version the job is no longer at.
    #[error("job {job} is at version {current}, not {expected}; read it again and retry")]
    VersionMismatch {
        job: JobId,
        expected: i64,
        current: i64,
    },
    /// Only a job that has not started may be edited.
    #[error("job {job} is {status}; only a queued or scheduled job can be edited")]
    NotEditable { job: JobId, status: Status },
    #[error("job {job} has used {used} attempts; max_attempts must be above that, got {asked}")]
    AttemptsUsed { job: JobId, used: u32, asked: u32 },
}

impl StoreError {
    /// Whether retrying later may succeed (the database is unreachable or
    /// restarting), as opposed to a definite answer.
    /// Postgres refused the data itself (data exception, constraint
    /// violation): sending it again cannot help.
    pub fn is_bad_data(&self) -> bool {
        match self {
            StoreError::Db(e) => e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            _ => false,
        }
    }

    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect { .. } => true,
            StoreError::Db(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Protocol(_)
                        | sqlx::Error::Tls(_)
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| {
                        c.starts_with("57") || c.starts_with("08") || c == "40001" || c == "40P01"
                    })
            }
            _ => false,
        }
    }
}

/// Masks the password of a connection URL for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

/// Sessions say which process they belong to (`orchestrator pid <pid>` in
/// `pg_stat_activity`), so an operator can tell which replica holds a lock
/// or runs a slow statement, unless the URL names them itself.
fn named(options: PgConnectOptions) -> PgConnectOptions {
    if options.get_application_name().is_some() {
        return options;
    }
    let name = format!("orchestrator pid {}", std::process::id());
    options.application_name(&name)
}

impl Store {
    /// Connects and checks the server answers.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let connect_err = |source| StoreError::Connect {
            url: redact_url(url),
            source,
        };
        let options: PgConnectOptions = url.parse().map_err(connect_err)?;
        // Batch statements take arrays of any length; a cached generic plan
        // (estimated for 100 rows) can turn their joins into nested loops
        // that take seconds on large batches. Plan each execution instead.
        // The random_page_cost suits SSDs and makes lookups of id arrays use
        // the primary key rather than scan small tables.
        let options = named(options).options([
            ("plan_cache_mode", "force_custom_plan"),
            ("random_page_cost", "1.1"),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(connect_err)?;
        Ok(Store { pool })
    }

    /// A pool that connects on first use: for the kill switch, which must
    /// work while Postgres is down.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse().map_err(|source| StoreError::Connect {
            url: redact_url(url),
            source,
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(named(options));
        Ok(Store { pool })
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Store { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Whether every migration this binary knows has been applied.
    pub async fn migrations_applied(&self) -> Result<bool, StoreError> {
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?;
        Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
