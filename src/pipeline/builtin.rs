//! Built-in job kinds for tests and benchmarks.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Handler, HandlerFuture, JobContext, JobError};
use crate::job::PayloadError;

/// Longest `sleep` a payload may ask for: one day.
const MAX_SLEEP_MS: u64 = 86_400_000;

fn object_of<T: for<'de> Deserialize<'de>>(
    kind: &str,
    example: &str,
    payload: &Value,
) -> Result<T, PayloadError> {
    serde_json::from_value(payload.clone()).map_err(|e| {
        PayloadError::Invalid(format!(
            "payload of a {kind} job must look like {example}: {e}"
        ))
    })
}

/// Does nothing, successfully.
pub struct Noop;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoopPayload {}

impl Handler for Noop {
    fn validate(&self, payload: &Value) -> Result<(), PayloadError> {
        if payload.is_null() {
            return Ok(());
        }
        object_of::<NoopPayload>("noop", "{}", payload).map(drop)
    }

    fn run(&self, _ctx: JobContext) -> HandlerFuture {
        Box::pin(async { Ok(Value::Null) })
    }
}

/// Sleeps `{"ms": N}` milliseconds; stops early when cancelled.
pub struct Sleep;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepPayload {
    ms: u64,
}

impl Handler for Sleep {
    fn validate(&self, payload: &Value) -> Result<(), PayloadError> {
        let p: SleepPayload = object_of("sleep", r#"{"ms": 1000}"#, payload)?;
        if p.ms > MAX_SLEEP_MS {
            return Err(PayloadError::Invalid(format!(
                "payload.ms must be at most {MAX_SLEEP_MS}, got {}",
                p.ms
            )));
        }
        Ok(())
    }

    fn run(&self, ctx: JobContext) -> HandlerFuture {
        Box::pin(async move {
            let p: SleepPayload = object_of("sleep", r#"{"ms": 1000}"#, &ctx.job.payload)
                .map_err(|e| JobError::Fatal(e.to_string()))?;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(p.ms)) => Ok(json!({ "slept_ms": p.ms })),
                () = ctx.cancel.cancelled() => Err(JobError::Interrupted),
            }
        })
    }
}

/// Fails its first `{"fail_times": N}` attempts, then succeeds.
pub struct Flaky;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlakyPayload {
    fail_times: u32,
}

impl Handler for Flaky {
    fn validate(&self, payload: &Value) -> Result<(), PayloadError> {
        object_of::<FlakyPayload>("flaky", r#"{"fail_times": 2}"#, payload).map(drop)
    }

    fn run(&self, ctx: JobContext) -> HandlerFuture {
        Box::pin(async move {
            let p: FlakyPayload = object_of("flaky", r#"{"fail_times": 2}"#, &ctx.job.payload)
                .map_err(|e| JobError::Fatal(e.to_string()))?;
            if ctx.job.attempt <= p.fail_times {
                Err(JobError::Failed(format!(
                    "flaky: attempt {} of {} planned failures",
                    ctx.job.attempt, p.fail_times
                )))
            } else {
                Ok(json!({ "succeeded_on_attempt": ctx.job.attempt }))
            }
        })
    }
}
