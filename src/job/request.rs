//! A request to enqueue a job, as producers send it (API, CLI), and its
//! validation into a [`NewJob`]. Every error names the field and what is
//! allowed.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::{
    JobId, JobKind, NewJob, Priority, QueueName, RetryPolicy, Status, MAX_ATTEMPTS_LIMIT,
    MAX_BACKOFF_MS,
};

/// Payloads nested deeper than this are refused.
pub const MAX_PAYLOAD_DEPTH: usize = 32;
/// Serialized payloads larger than this are refused.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Serialized metadata larger than this is refused.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;
/// `run_at` may lie this far in the past (clock skew), no further.
pub const MAX_PAST_RUN_AT: Duration = Duration::hours(1);
/// `run_at` may lie this far in the future, no further.
pub const MAX_FUTURE_RUN_AT: Duration = Duration::days(365);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Job kind, e.g. `noop`, `sleep`, `flaky`.
    pub kind: String,
    /// Queue name; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// 1 (lowest) to 10 (highest); 5 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10)]
    pub priority: Option<i64>,
    /// Kind-specific JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub payload: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_cap_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<i64>,
    /// When to run (RFC 3339); exclusive with `delay_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_secs: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The producer's own labels: a JSON object of at most 8 KiB, shown
    /// with the job and editable until it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// An `http` or `https` URL that receives this job's events as signed
    /// webhooks (`started`, `progress`, `succeeded`, `failed`, `dead`,
    /// `cancelled`). Local and private addresses are refused unless the
    /// deployment sets `webhooks.allow_local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// At most one job with this key in the given states within the
    /// window: a duplicate gets the existing job back (200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<UniqueRequest>,
    /// Jobs sharing this key run at most `max_per_key` at once (the
    /// kind's, else the queue's `admission.max_per_key`, else 1). Agent
    /// kinds working on a repository default it to the repository and the
    /// branch they push to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
}

/// `unique` of a [`JobRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UniqueRequest {
    /// 1 to 255 bytes, no control characters.
    pub key: String,
    /// How long the key holds after a job took it; absent: for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_secs: Option<i64>,
    /// The states in which an existing job counts; absent: the unfinished
    /// ones (`queued`, `scheduled`, `running`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub states: Option<Vec<String>>,
}

/// A checked `unique`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unique {
    pub key: String,
    pub for_secs: Option<u64>,
    pub states: Vec<Status>,
}

/// The longest `concurrency_key`, in bytes.
pub const MAX_CONCURRENCY_KEY_LEN: usize = 1024;
/// The longest `unique.for_secs`: a year.
pub const MAX_UNIQUE_SECS: i64 = 366 * 86400;

impl UniqueRequest {
    fn validate(self) -> Result<Unique, FieldError> {
        let key = validate_key("unique.key", &self.key, MAX_IDEMPOTENCY_KEY_LEN)?;
        let for_secs = match self.for_secs {
            None => None,
            Some(s) if (1..=MAX_UNIQUE_SECS).contains(&s) => Some(s as u64),
            Some(s) => {
                return Err(FieldError::new(
                    "unique.for_secs",
                    format!("must be between 1 and {MAX_UNIQUE_SECS}, got {s}"),
                ))
            }
        };
        let states = match self.states {
            None => vec![Status::Queued, Status::Scheduled, Status::Running],
            Some(names) => {
                if names.is_empty() {
                    return Err(FieldError::new(
                        "unique.states",
                        "must name at least one state",
                    ));
                }
                let mut states = Vec::with_capacity(names.len());
                for name in &names {
                    let status: Status = name.parse().map_err(|_| {
                        FieldError::new(
                            "unique.states",
                            format!(
                                "unknown state {name:?}; states are queued, scheduled, running, succeeded, dead, cancelled"
                            ),
                        )
                    })?;
                    if !states.contains(&status) {
                        states.push(status);
                    }
                }
                states
            }
        };
        Ok(Unique {
            key,
            for_secs,
            states,
        })
    }
}

/// A key producers choose: `max` bytes at most, not empty, no control
/// characters (they end up in logs and the dashboard).
fn validate_key(field: &str, key: &str, max: usize) -> Result<String, FieldError> {
    if key.is_empty() || key.len() > max {
        return Err(FieldError::new(
            field,
            format!("must be 1 to {max} bytes long"),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(key.to_owned())
}

/// What a deployment fills in when a request leaves a field out.
#[derive(Debug, Clone, Copy)]
pub struct JobDefaults {
    pub retry: RetryPolicy,
    pub timeout_secs: u32,
    pub max_timeout_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a job kind refused a payload (checked at enqueue, before anything
/// is stored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("unknown job kind {kind:?}; known kinds: {}", known.join(", "))]
    UnknownKind { kind: String, known: Vec<String> },
    /// What is wrong with the payload, and what is allowed.
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for PayloadError {
    fn from(message: String) -> Self {
        PayloadError::Invalid(message)
    }
}

impl From<&str> for PayloadError {
    fn from(message: &str) -> Self {
        PayloadError::Invalid(message.to_owned())
    }
}

fn in_range(
    field: &str,
    value: Option<i64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, FieldError> {
    match value {
        None => Ok(default),
        Some(v) if v >= min as i64 && v <= max as i64 => Ok(v as u64),
        Some(v) => Err(FieldError::new(
            field,
            format!("must be between {min} and {max}, got {v}"),
        )),
    }
}

fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

impl JobRequest {
    /// Checks every field; `check_payload` validates the payload against its
    /// kind (and refuses unknown kinds).
    pub fn validate(
        self,
        defaults: &JobDefaults,
        now: DateTime<Utc>,
        actor: &str,
        check_payload: impl Fn(&str, &serde_json::Value) -> Result<(), PayloadError>,
    ) -> Result<NewJob, FieldError> {
        let kind = JobKind::parse(self.kind).map_err(|e| FieldError::new("kind", e.to_string()))?;
        let queue = match self.queue {
            None => QueueName::default_queue(),
            Some(q) => QueueName::parse(q).map_err(|e| FieldError::new("queue", e.to_string()))?,
        };
        let priority = match self.priority {
            None => Priority::DEFAULT,
            Some(p) => Priority::new(p).map_err(|e| FieldError::new("priority", e.to_string()))?,
        };
        let payload = self.payload.unwrap_or_else(|| serde_json::json!({}));
        if !payload.is_object() {
            return Err(FieldError::new("payload", "must be a JSON object"));
        }
        if depth(&payload) > MAX_PAYLOAD_DEPTH {
            return Err(FieldError::new(
                "payload",
                format!("is nested deeper than {MAX_PAYLOAD_DEPTH} levels"),
            ));
        }
        let size = serde_json::to_vec(&payload)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > MAX_PAYLOAD_BYTES {
            return Err(FieldError::new(
                "payload",
                format!("is {size} bytes; at most {MAX_PAYLOAD_BYTES} are allowed"),
            ));
        }
        check_payload(kind.as_str(), &payload).map_err(|e| {
            let field = match e {
                PayloadError::UnknownKind { .. } => "kind",
                PayloadError::Invalid(_) => "payload",
            };
            FieldError::new(field, e.to_string())
        })?;
        let d = defaults.retry;
        let max_attempts = in_range(
            "max_attempts",
            self.max_attempts,
            d.max_attempts.into(),
            1,
            MAX_ATTEMPTS_LIMIT.into(),
        )?;
        let base = in_range(
            "backoff_base_ms",
            self.backoff_base_ms,
            d.backoff_base_ms,
            1,
            MAX_BACKOFF_MS,
        )?;
        let cap_default = d.backoff_cap_ms.max(base);
        let cap = in_range(
            "backoff_cap_ms",
            self.backoff_cap_ms,
            cap_default,
            base,
            MAX_BACKOFF_MS,
        )?;
        let retry = RetryPolicy {
            max_attempts: max_attempts as u32,
            backoff_base_ms: base,
            backoff_cap_ms: cap,
        };
        let timeout_secs = in_range(
            "timeout_secs",
            self.timeout_secs,
            defaults.timeout_secs.into(),
            1,
            defaults.max_timeout_secs.into(),
        )? as u32;
        let run_at = match (self.run_at, self.delay_secs) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "run_at",
                    "give either run_at or delay_secs, not both",
                ));
            }
            (Some(t), None) => {
                if t < now - MAX_PAST_RUN_AT {
                    return Err(FieldError::new(
                        "run_at",
                        format!("{} is more than an hour in the past", t.to_rfc3339()),
                    ));
                }
                if t > now + MAX_FUTURE_RUN_AT {
                    return Err(FieldError::new(
                        "run_at",
                        format!("{} is more than 365 days in the future", t.to_rfc3339()),
                    ));
                }
                Some(t)
            }
            (None, Some(secs)) => {
                let max = MAX_FUTURE_RUN_AT.num_seconds();
                if !(0..=max).contains(&secs) {
                    return Err(FieldError::new(
                        "delay_secs",
                        format!("must be between 0 and {max}, got {secs}"),
                    ));
                }
                (secs > 0).then(|| now + Duration::seconds(secs))
            }
            (None, None) => None,
        };
        let idempotency_key = match self.idempotency_key {
            None => None,
            Some(k) => Some(validate_idempotency_key(&k)?),
        };
        let metadata = match self.metadata {
            None => serde_json::json!({}),
            Some(m) => validate_metadata(m)?,
        };
        // The address policy (allow_local, what the name resolves to) is
        // the application's to apply; here only the form is checked.
        let callback_url = self
            .callback_url
            .map(|raw| {
                crate::net::HttpUrl::parse(&raw, true)
                    .map(|u| u.as_str().to_owned())
                    .map_err(|e| FieldError::new("callback_url", e))
            })
            .transpose()?;
        let unique = self.unique.map(UniqueRequest::validate).transpose()?;
        // Its limit is the application's to find (kind, queue); 1 until then.
        let concurrency = self
            .concurrency_key
            .map(|k| validate_key("concurrency_key", &k, MAX_CONCURRENCY_KEY_LEN))
            .transpose()?
            .map(|k| (k, 1));
        Ok(NewJob {
            id: JobId::new(),
            queue,
            kind,
            priority,
            payload,
            retry,
            timeout_secs,
            run_at,
            idempotency_key,
            actor: actor.to_owned(),
            yolo: false,
            metadata,
            callback_url,
            unique,
            concurrency,
            schedule: None,
        })
    }
}

/// A job's metadata: an object, nested at most [`MAX_PAYLOAD_DEPTH`]
/// levels, at most [`MAX_METADATA_BYTES`] serialized, and no NUL in any
/// string (Postgres cannot store it in `jsonb`).
pub fn validate_metadata(value: serde_json::Value) -> Result<serde_json::Value, FieldError> {
    fn has_nul(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().any(has_nul),
            serde_json::Value::Object(map) => {
                map.iter().any(|(k, v)| k.contains('\0') || has_nul(v))
            }
            _ => false,
        }
    }
    if !value.is_object() {
        return Err(FieldError::new("metadata", "must be a JSON object"));
    }
    if depth(&value) > MAX_PAYLOAD_DEPTH {
        return Err(FieldError::new(
            "metadata",
            format!("is nested deeper than {MAX_PAYLOAD_DEPTH} levels"),
        ));
    }
    let size = serde_json::to_vec(&value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_METADATA_BYTES {
        return Err(FieldError::new(
            "metadata",
            format!("is {size} bytes; at most {MAX_METADATA_BYTES} are allowed"),
        ));
    }
    if has_nul(&value) {
        return Err(FieldError::new(
            "metadata",
            "must not contain NUL characters",
        ));
    }
    Ok(value)
}

/// `PATCH /v1/jobs/{id}`: what may change before a job starts. Absent
/// fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobPatch {
    /// 1 (lowest) to 10 (highest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10)]
    pub priority: Option<i64>,
    /// When to run (RFC 3339): now or earlier runs it as soon as a worker
    /// is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    /// Above the attempts the job has used already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i64>,
    /// Replaces the job's metadata (an object, at most 8 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

/// A checked [`JobPatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobEdit {
    pub priority: Option<Priority>,
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: Option<u32>,
    pub metadata: Option<serde_json::Value>,
}

impl JobPatch {
    pub fn validate(self, now: DateTime<Utc>) -> Result<JobEdit, FieldError> {
        if self == JobPatch::default() {
            return Err(FieldError::new(
                "priority",
                "nothing to change: give priority, run_at, max_attempts or metadata",
            ));
        }
        let priority = self
            .priority
            .map(Priority::new)
            .transpose()
            .map_err(|e| FieldError::new("priority", e.to_string()))?;
        if let Some(t) = self.run_at {
            if t < now - MAX_PAST_RUN_AT || t > now + MAX_FUTURE_RUN_AT {
                return Err(FieldError::new(
                    "run_at",
                    format!(
                        "{} is more than an hour in the past or 365 days in the future",
                        t.to_rfc3339()
                    ),
                ));
            }
        }
        let max_attempts = match self.max_attempts {
            None => None,
            Some(n) if (1..=i64::from(MAX_ATTEMPTS_LIMIT)).contains(&n) => Some(n as u32),
            Some(n) => {
                return Err(FieldError::new(
                    "max_attempts",
                    format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {n}"),
                ))
            }
        };
        let metadata = self.metadata.map(validate_metadata).transpose()?;
        Ok(JobEdit {
            priority,
            run_at: self.run_at,
            max_attempts,
            metadata,
        })
    }
}

pub fn validate_idempotency_key(key: &str) -> Result<String, FieldError> {
    validate_key("idempotency_key", key, MAX_IDEMPOTENCY_KEY_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> JobDefaults {
        JobDefaults {
            retry: RetryPolicy {
                max_attempts: 5,
                backoff_base_ms: 1000,
                backoff_cap_ms: 60_000,
            },
            timeout_secs: 60,
            max_timeout_secs: 3600,
        }
    }

    fn check(req: JobRequest) -> Result<NewJob, FieldError> {
        req.validate(&defaults(), Utc::now(), "test", |kind, _| {
            if kind == "noop" {
                Ok(())
            } else {
                Err(PayloadError::UnknownKind {
                    kind: kind.to_owned(),
                    known: vec!["noop".to_owned()],
                })
            }
        })
    }

    fn noop() -> JobRequest {
        JobRequest {
            kind: "noop".into(),
            ..JobRequest::default()
        }
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let job = check(noop()).expect("valid");
        assert_eq!(job.queue.as_str(), "default");
        assert_eq!(job.priority.get(), 5);
        assert_eq!(job.retry.max_attempts, 5);
        assert_eq!(job.timeout_secs, 60);
        assert_eq!(job.payload, serde_json::json!({}));
        assert!(job.run_at.is_none());
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(JobRequest, &str)> = vec![
            (
                JobRequest {
                    kind: "nope".into(),
                    ..noop()
                },
                "kind",
            ),
            (
                JobRequest {
                    kind: "".into(),
                    ..noop()
                },
                "kind",
            ),
            (
                JobRequest {
                    priority: Some(11),
                    ..noop()
                },
                "priority",
            ),
            (
                JobRequest {
                    priority: Some(0),
                    ..noop()
                },
                "priority",
            ),
            (
                JobRequest {
                    queue: Some("a b".into()),
                    ..noop()
                },
                "queue",
            ),
            (
                JobRequest {
                    payload: Some(serde_json::json!([1])),
                    ..noop()
                },
                "payload",
            ),
            (
                JobRequest {
                    max_attempts: Some(0),
                    ..noop()
                },
                "max_attempts",
            ),
            (
                JobRequest {
                    max_attempts: Some(-1),
                    ..noop()
                },
                "max_attempts",
            ),
            (
                JobRequest {
                    max_attempts: Some(1_000_000),
                    ..noop()
                },
                "max_attempts",
            ),
            (
                JobRequest {
                    timeout_secs: Some(-5),
                    ..noop()
                },
                "timeout_secs",
            ),
            (
                JobRequest {
                    timeout_secs: Some(10_000_000),
                    ..noop()
                },
                "timeout_secs",
            ),
            (
                JobRequest {
                    backoff_base_ms: Some(0),
                    ..noop()
                },
                "backoff_base_ms",
            ),
            (
                JobRequest {
                    backoff_base_ms: Some(500),
                    backoff_cap_ms: Some(100),
                    ..noop()
                },
                "backoff_cap_ms",
            ),
            (
                JobRequest {
                    delay_secs: Some(-1),
                    ..noop()
                },
                "delay_secs",
            ),
            (
                JobRequest {
                    run_at: Some(Utc::now() - Duration::days(2)),
                    ..noop()
                },
                "run_at",
            ),
            (
                JobRequest {
                    run_at: Some(Utc::now() + Duration::days(400)),
                    ..noop()
                },
                "run_at",
            ),
            (
                JobRequest {
                    run_at: Some(Utc::now()),
                    delay_secs: Some(1),
                    ..noop()
                },
                "run_at",
            ),
            (
                JobRequest {
                    idempotency_key: Some("".into()),
                    ..noop()
                },
                "idempotency_key",
            ),
            (
                JobRequest {
                    idempotency_key: Some("a\u{0}b".into()),
                    ..noop()
                },
                "idempotency_key",
            ),
        ];
        for (req, field) in cases {
            let debug = format!("{req:?}");
            let err = check(req).expect_err(&debug);
            assert_eq!(err.field, field, "{debug}: {err}");
        }
    }

    #[test]
    fn deep_and_huge_payloads_are_refused() {
        let mut deep = serde_json::json!({});
        for _ in 0..40 {
            deep = serde_json::json!({ "a": deep });
        }
        let err = check(JobRequest {
            payload: Some(deep),
            ..noop()
        })
        .unwrap_err();
        assert!(err.message.contains("nested"), "{err}");
        let huge = serde_json::json!({ "s": "x".repeat(MAX_PAYLOAD_BYTES) });
        let err = check(JobRequest {
            payload: Some(huge),
            ..noop()
        })
        .unwrap_err();
        assert!(err.message.contains("bytes"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<JobRequest>(r#"{"kind":"noop","prio":3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn delay_becomes_run_at() {
        let now = Utc::now();
        let job = JobRequest {
            delay_secs: Some(30),
            ..noop()
        }
        .validate(&defaults(), now, "t", |_, _| Ok(()))
        .expect("valid");
        assert_eq!(job.run_at, Some(now + Duration::seconds(30)));
    }
}
