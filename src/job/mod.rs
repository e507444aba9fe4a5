//! The domain: identifiers, validated names, the job spec and the status machine.
//! Values here are parsed once at the edge; an invalid one cannot exist past it.

mod request;
mod retry;
mod schedule;
mod status;
mod webhook;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use request::{
    validate_idempotency_key, validate_metadata, FieldError, JobDefaults, JobEdit, JobPatch,
    JobRequest, PayloadError, Unique, UniqueRequest, MAX_CONCURRENCY_KEY_LEN, MAX_METADATA_BYTES,
    MAX_PAYLOAD_BYTES, MAX_PAYLOAD_DEPTH,
};
pub use retry::{RetryDecision, RetryPolicy, RetryPolicyError, MAX_ATTEMPTS_LIMIT, MAX_BACKOFF_MS};
pub use schedule::{
    due_ticks, CatchUp, CronSpec, NewSchedule, Overlap, Schedule, ScheduleRequest,
    DEFAULT_CATCH_UP_LIMIT, MAX_CATCH_UP_LIMIT,
};
pub use status::{Status, UnknownStatus};
pub use webhook::{
    message_id, Delivery, DeliveryAttempt, NewWebhook, Webhook, WebhookRequest, JOB_WEBHOOK_EVENTS,
    WEBHOOK_EVENTS,
};

/// A job id: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// A schedule id (UUIDv7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScheduleId(pub Uuid);

impl ScheduleId {
    pub fn new() -> Self {
        ScheduleId(Uuid::now_v7())
    }
}

impl Default for ScheduleId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ScheduleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} characters long; at most {max} are allowed")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} {value:?} may only contain ASCII letters, digits, '-', '_' and '.', and must start with a letter or digit")]
    Charset { what: &'static str, value: String },
}

/// Names that end up inside Valkey keys and metric labels: short, ASCII, no
/// key separators or hash-tag braces.
fn validate_name(what: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > max {
        return Err(NameError::TooLong {
            what,
            len: value.chars().count(),
            max,
        });
    }
    let ok_start = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok_start || !ok_chars {
        return Err(NameError::Charset {
            what,
            value: value.chars().take(80).collect(),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                validate_name($what, &value, $max)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A queue name, e.g. `default` or `agents.high`.
    QueueName,
    "queue name",
    64
);
name_type!(
    /// A job kind, e.g. `noop` or `script-agent`; selects the handler.
    JobKind,
    "job kind",
    64
);

impl QueueName {
    pub fn default_queue() -> Self {
        QueueName("default".to_owned())
    }
}

/// Priority 1..=10, higher runs first; 5 by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Priority(u8);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("priority must be an integer from 1 (lowest) to 10 (highest), got {0}")]
pub struct PriorityError(pub i64);

impl Priority {
    pub const MIN: Priority = Priority(1);
    pub const MAX: Priority = Priority(10);
    pub const DEFAULT: Priority = Priority(5);

    pub fn new(value: i64) -> Result<Self, PriorityError> {
        if (1..=10).contains(&value) {
            Ok(Priority(value as u8))
        } else {
            Err(PriorityError(value))
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::DEFAULT
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        Priority::new(v).map_err(serde::de::Error::custom)
    }
}

/// Everything needed to create a job. Built and validated at the edge
/// (CLI, API), then written to Postgres first and indexed in Valkey second.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub queue: QueueName,
    pub kind: JobKind,
    pub priority: Priority,
    pub payload: serde_json::Value,
    pub retry: RetryPolicy,
    pub timeout_secs: u32,
    /// When the job becomes due; `None` means now.
    pub run_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    /// Who asked for it (token name, `cli`, …); recorded in the audit trail.
    pub actor: String,
    /// Its quality gates are skipped or some required ones left out (YOLO):
    /// marked in its `enqueued` event.
    pub yolo: bool,
    /// The producer's labels (a checked JSON object).
    pub metadata: serde_json::Value,
    /// Where its events go as webhooks (a canonical http/https URL).
    pub callback_url: Option<String>,
    /// At most one such job in the given states within the window.
    pub unique: Option<Unique>,
    /// Its concurrency key and the most jobs of that key running at once.
    pub concurrency: Option<(String, u32)>,
    /// The schedule and tick that enqueued it.
    pub schedule: Option<(ScheduleId, DateTime<Utc>)>,
}

/// A job as stored in Postgres.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Job {
    #[schema(value_type = String, format = Uuid)]
    pub id: JobId,
    #[schema(value_type = String)]
    pub queue: QueueName,
    #[schema(value_type = String)]
    pub kind: JobKind,
    pub status: Status,
    pub stage: Option<String>,
    pub priority: u8,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub attempt: u32,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    pub timeout_secs: u32,
    pub lease_id: i64,
    pub worker_id: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub run_at: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    pub last_error: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Incremented by every write to the job.
    pub version: i64,
    /// What the job's agent last reported (`::progress::<0-100> <message>`).
    pub progress: Option<Progress>,
    /// The producer's labels.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// Where its events go as signed webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Its `unique.key`, while a duplicate may find it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// Jobs sharing it run at most `concurrency_limit` at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<u32>,
    /// The schedule that enqueued it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub schedule_id: Option<ScheduleId>,
    /// The schedule's tick it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<DateTime<Utc>>,
}

/// A job's progress, as its agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// 0 to 100.
    pub percent: u8,
    pub message: String,
    pub at: DateTime<Utc>,
}

/// The line prefix an agent prints to report progress.
pub const PROGRESS_PREFIX: &str = "::progress::";
/// Longest progress message kept (longer ones are cut at a char boundary).
pub const MAX_PROGRESS_MESSAGE: usize = 500;

/// The line prefix an agent prints when its provider throttled it:
/// `::retry-after::<seconds>`.
pub const RETRY_AFTER_PREFIX: &str = "::retry-after::";
/// The longest delay an agent may ask for: a day.
pub const MAX_RETRY_AFTER_SECS: u64 = 86_400;

/// Parses `::retry-after::<seconds>` (whole seconds, 1 to a day; more is
/// cut to a day); `None` for any other line.
pub fn parse_retry_after(line: &str) -> Option<u64> {
    let number = line.strip_prefix(RETRY_AFTER_PREFIX)?.trim();
    if number.is_empty() || number.len() > 9 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = number.parse().ok()?;
    Some(secs.clamp(1, MAX_RETRY_AFTER_SECS))
}

impl Progress {
    /// Parses `::progress::<0-100> <message>`; `None` for any other line
    /// (a malformed progress line is an ordinary log line).
    pub fn parse(line: &str, at: DateTime<Utc>) -> Option<Progress> {
        let rest = line.strip_prefix(PROGRESS_PREFIX)?;
        let (number, message) = rest.split_once(' ').unwrap_or((rest, ""));
        if number.is_empty() || number.len() > 3 || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let percent: u8 = number.parse().ok().filter(|p| *p <= 100)?;
        let message = message.trim();
        let mut end = message.len().min(MAX_PROGRESS_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        Some(Progress {
            percent,
            message: message[..end].to_owned(),
            at,
        })
    }
}

impl Job {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            backoff_base_ms: self.backoff_base_ms,
            backoff_cap_ms: self.backoff_cap_ms,
        }
    }
}

/// One entry of a job's append-only audit trail.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JobEvent {
    pub id: i64,
    #[schema(value_type = String, format = Uuid)]
    pub job_id: JobId,
    pub at: DateTime<Utc>,
    #[serde(rename = "type")]
    pub kind: String,
    pub actor: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// A request to stop a job, as read from its flag.
#[derive(Debug, Clone)]
pub struct CancelRequest {
    pub id: JobId,
    pub actor: String,
    pub reason: String,
    /// When it was asked for (Unix ms), to measure how long stopping took.
    pub requested_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse_and_anything_else_is_a_log_line() {
        let at = Utc::now();
        assert_eq!(parse_retry_after("::retry-after::30"), Some(30));
        assert_eq!(parse_retry_after("::retry-after::0"), Some(1));
        assert_eq!(
            parse_retry_after("::retry-after::999999999"),
            Some(MAX_RETRY_AFTER_SECS)
        );
        for bad in [
            "::retry-after::",
            "::retry-after::-5",
            "::retry-after::1e9",
            "::retry-after::12s",
            "retry-after 5",
        ] {
            assert_eq!(parse_retry_after(bad), None, "{bad}");
        }
        let p = Progress::parse("::progress::42 running the tests", at).expect("progress");
        assert_eq!((p.percent, p.message.as_str()), (42, "running the tests"));
        assert_eq!(
            Progress::parse("::progress::100", at).map(|p| p.percent),
            Some(100)
        );
        for line in [
            "::progress::101 too far",
            "::progress::-1 x",
            "::progress:: 5 x",
            "::progress::5x y",
            "progress::5 x",
            " ::progress::5 x",
            "::progress::0042 x",
            "",
        ] {
            assert!(Progress::parse(line, at).is_none(), "{line:?}");
        }
        let long = format!("::progress::7 {}", "é".repeat(400));
        let p = Progress::parse(&long, at).expect("progress");
        assert!(p.message.len() <= MAX_PROGRESS_MESSAGE && p.message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn queue_names_reject_key_breaking_characters() {
        for bad in [
            "", "a b", "a{b}", "a:b", "-lead", ".hidden", "é", "a\nb", "a*",
        ] {
            assert!(QueueName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(QueueName::parse("x".repeat(65)).is_err());
        for good in ["default", "agents.high", "q_1-2", "9"] {
            assert!(QueueName::parse(good).is_ok(), "{good:?} rejected");
        }
    }

    #[test]
    fn name_errors_say_what_is_allowed() {
        let err = JobKind::parse("bad kind").unwrap_err().to_string();
        assert!(err.contains("job kind") && err.contains("letters"), "{err}");
    }

    #[test]
    fn priority_bounds() {
        assert!(Priority::new(0).is_err());
        assert!(Priority::new(11).is_err());
        assert!(Priority::new(-3).is_err());
        assert_eq!(Priority::new(1).map(Priority::get), Ok(1));
        assert_eq!(Priority::new(10).map(Priority::get), Ok(10));
        assert_eq!(Priority::default().get(), 5);
        assert!(serde_json::from_str::<Priority>("11").is_err());
    }

    #[test]
    fn job_ids_sort_by_creation() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<JobId>().ok(), Some(a));
    }
}

/// Filters for listing jobs; newest first, keyset-paginated by id.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<Status>,
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// Only jobs older than this id (the cursor).
    pub before: Option<JobId>,
    pub limit: u32,
}
