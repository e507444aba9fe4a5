//! The application's errors, and how a front end should answer each
//! without knowing the adapters behind it.

use crate::job::{FieldError, JobId, Status};
use crate::queue::QueueError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("invalid job {index}: {error}")]
    Invalid { index: usize, error: FieldError },
    #[error("the database schema is not up to date; run `orchestrator migrate`")]
    NotMigrated,
    #[error("invalid job kind definition: {0}")]
    Kind(#[from] crate::pipeline::kinds::KindError),
    /// An idempotency key already names a job with a different kind,
    /// queue or payload (`index`: the request's place in its batch).
    #[error(
        "idempotency key {key:?} was used for job {job} with a different kind, queue or payload"
    )]
    KeyReused {
        index: usize,
        key: String,
        job: JobId,
    },
    /// A request other than a job's was invalid (a webhook subscription).
    #[error("{0}")]
    InvalidRequest(FieldError),
    #[error("webhook {0} does not exist")]
    NoSuchWebhook(uuid::Uuid),
    #[error("schedule {0} does not exist")]
    NoSuchSchedule(crate::job::ScheduleId),
    #[error("a schedule named {0:?} exists already")]
    ScheduleNameTaken(String),
    #[error("job {job} has no delivery {delivery}")]
    NoSuchDelivery { job: JobId, delivery: i64 },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("git stage: the secret rules: {0}")]
    SecretRules(#[from] crate::git::secrets::ScanError),
    #[error("git stage: git.data_dir {path:?}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an [`AppError`] means to whoever asked: front ends map these to
/// their own answers (an HTTP status, an exit code).
#[derive(Debug)]
pub enum ErrorClass<'a> {
    /// No such job.
    NotFound(JobId),
    /// The job is not in a state that allows this.
    Conflict(String),
    /// A request conflicts with what exists: `field` of the job at `index`.
    ConflictingField {
        index: usize,
        field: &'static str,
        detail: String,
    },
    /// A request was invalid: the job at `index` of the batch.
    Invalid { index: usize, error: &'a FieldError },
    /// A request that is not a batch of jobs was invalid.
    InvalidField(&'a FieldError),
    /// Something other than a job does not exist.
    Missing(String),
    /// The caller's `If-Match` version is not the current one.
    PreconditionFailed(String),
    /// A backing service is down or not ready; retrying later may work.
    Unavailable,
    /// A fault of ours; log it.
    Internal,
}

impl AppError {
    pub fn class(&self) -> ErrorClass<'_> {
        match self {
            AppError::Store(StoreError::NotFound(id)) => ErrorClass::NotFound(*id),
            AppError::Store(StoreError::InvalidTransition { job, from, to }) => {
                ErrorClass::Conflict(format!("job {job} is {from}; it cannot become {to}"))
            }
            AppError::Store(
                e @ (StoreError::StaleLease { .. }
                | StoreError::NotEditable { .. }
                | StoreError::AttemptsUsed { .. }),
            ) => ErrorClass::Conflict(e.to_string()),
            AppError::Store(e @ StoreError::VersionMismatch { .. }) => {
                ErrorClass::PreconditionFailed(e.to_string())
            }
            AppError::Store(e) if e.is_transient() => ErrorClass::Unavailable,
            AppError::Store(_) => ErrorClass::Internal,
            AppError::Queue(_) => ErrorClass::Unavailable,
            AppError::KeyReused { index, .. } => ErrorClass::ConflictingField {
                index: *index,
                field: "idempotency_key",
                detail: self.to_string(),
            },
            AppError::Invalid { index, error } => ErrorClass::Invalid {
                index: *index,
                error,
            },
            AppError::InvalidRequest(error) => ErrorClass::InvalidField(error),
            AppError::ScheduleNameTaken(_) => ErrorClass::ConflictingField {
                index: 0,
                field: "name",
                detail: self.to_string(),
            },
            AppError::NoSuchWebhook(_)
            | AppError::NoSuchSchedule(_)
            | AppError::NoSuchDelivery { .. } => ErrorClass::Missing(self.to_string()),
            AppError::NotMigrated
            | AppError::Config(_)
            | AppError::Kind(_)
            | AppError::SecretRules(_)
            | AppError::DataDir { .. } => ErrorClass::Unavailable,
        }
    }

    /// Whether this is the store refusing a transition out of `status`.
    pub(super) fn is_transition_from(&self, status: Status) -> bool {
        matches!(self, AppError::Store(StoreError::InvalidTransition { from, .. }) if *from == status)
    }
}
