//! Jobs run by code outside the handler registry: the apalis backend
//! (`src/apalis/`) hands them to an apalis `Worker`.
//!
//! The worker pool stays in charge. It claims in batches (with prefetch),
//! renews the leases, enforces timeouts, hears cancels and the kill switch,
//! and writes every outcome as a fenced, batched transition. What this
//! module adds is one handler: for each job of its kind it sends an
//! [`ExternalTask`] down a channel and waits for the outcome the outside
//! code reports. So every guarantee of the pool holds for such jobs too: a
//! stale lease cannot complete one, a Valkey flush loses none, and every
//! transition is in `job_events`.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{App, Pool, PoolConfig};
use crate::job::{JobId, PayloadError, QueueName};
use crate::pipeline::{Handler, HandlerFuture, JobContext, JobError, Registry};

/// The one field of an external job's payload: the task's own arguments,
/// as the producer's codec wrote them. Nothing in them is read here.
pub const EXTERNAL_ARGS_FIELD: &str = "args";

/// How long a stopped task (cancelled, timed out) gets to end by itself
/// before its job's end is recorded without it.
pub const EXTERNAL_STOP_WAIT: Duration = Duration::from_secs(5);

/// How a job claimed by a process without the kind's runner waits before
/// it is due again.
const ELSEWHERE_RETRY: Duration = Duration::from_secs(5);

/// How an external task ended, as its runner reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum ExternalOutcome {
    /// Done; the value is kept as the job's result.
    Succeeded(serde_json::Value),
    /// A failed attempt: the job's retry policy (backoff) decides what
    /// follows.
    Failed(String),
    /// A failed attempt that asks to run again after this delay (it uses
    /// up the attempt).
    RetryAfter(String, Duration),
    /// Retrying cannot help: the job is dead at once.
    Fatal(String),
    /// The runner stopped before starting the task: the job goes back to
    /// its queue, its attempt given back, as the pool stops.
    NotRun,
}

/// One claimed job for outside code to run. Dropping it without
/// [`ExternalTask::finish`] (a panic, a dropped future) is a failed
/// attempt.
#[derive(Debug)]
pub struct ExternalTask {
    pub id: JobId,
    pub queue: QueueName,
    pub priority: u8,
    /// 1 on the first run.
    pub attempt: u32,
    pub max_attempts: u32,
    /// The task's arguments (the payload's `args`).
    pub args: serde_json::Value,
    /// Fires when the job is cancelled (one job, or all by the kill
    /// switch), times out, loses its lease, or its worker stops: the runner
    /// should stop. It has [`EXTERNAL_STOP_WAIT`] to do so.
    pub cancel: CancellationToken,
    outcome: oneshot::Sender<ExternalOutcome>,
}

impl ExternalTask {
    pub fn finish(self, outcome: ExternalOutcome) {
        // The pool may have stopped waiting (cancel, timeout): then the
        // outcome has no one left to hear it, by design.
        let _ = self.outcome.send(outcome);
    }
}

/// An external kind's payload: `{"args": …}` and nothing else.
fn check_payload(payload: &serde_json::Value) -> Result<(), PayloadError> {
    match payload.as_object() {
        Some(fields) if fields.len() == 1 && fields.contains_key(EXTERNAL_ARGS_FIELD) => Ok(()),
        _ => Err(
            "payload: must be an object with exactly one field, \"args\" (the task's arguments)"
                .into(),
        ),
    }
}

/// The handler of the external kind: forwards each job, awaits its outcome.
struct Forward {
    tasks: mpsc::Sender<ExternalTask>,
}

impl Handler for Forward {
    fn validate(&self, payload: &serde_json::Value) -> Result<(), PayloadError> {
        check_payload(payload)
    }

    fn run(&self, ctx: JobContext) -> HandlerFuture {
        let tasks = self.tasks.clone();
        Box::pin(async move {
            let (outcome, mut reported) = oneshot::channel();
            let job = &ctx.job;
            let task = ExternalTask {
                id: job.id,
                queue: job.queue.clone(),
                priority: job.priority,
                attempt: job.attempt,
                max_attempts: job.retry.max_attempts,
                args: job
                    .payload
                    .get(EXTERNAL_ARGS_FIELD)
                    .cloned()
                    .unwrap_or_default(),
                cancel: ctx.cancel.child_token(),
                outcome,
            };
            tokio::select! {
                sent = tasks.send(task) => {
                    if sent.is_err() {
                        // Nobody runs the tasks any more: the pool is
                        // stopping, and releases the job when this returns.
                        ctx.cancel.cancelled().await;
                        return Err(JobError::Interrupted);
                    }
                }
                () = ctx.cancel.cancelled() => return Err(JobError::Interrupted),
            }
            let outcome = tokio::select! {
                biased;
                outcome = &mut reported => outcome,
                () = ctx.cancel.cancelled() => {
                    // Recorded once the task has stopped, if it does in
                    // time; work it finished is kept.
                    return match tokio::time::timeout(EXTERNAL_STOP_WAIT, reported).await {
                        Ok(Ok(ExternalOutcome::Succeeded(result))) => Ok(result),
                        _ => Err(JobError::Interrupted),
                    };
                }
            };
            match outcome {
                Ok(ExternalOutcome::Succeeded(result)) => Ok(result),
                Ok(ExternalOutcome::Failed(message)) => Err(JobError::Failed(message)),
                Ok(ExternalOutcome::RetryAfter(message, retry_after)) => Err(JobError::Throttled {
                    message,
                    retry_after,
                    counts_attempt: true,
                }),
                Ok(ExternalOutcome::Fatal(message)) => Err(JobError::Fatal(message)),
                Ok(ExternalOutcome::NotRun) => {
                    ctx.cancel.cancelled().await;
                    Err(JobError::Interrupted)
                }
                Err(_) => Err(JobError::Failed(
                    "the task ended without an outcome (its runner dropped it)".into(),
                )),
            }
        })
    }
}

/// A kind this process does not run, claimed from a shared queue: the job
/// goes back to its queue a little later, without using an attempt, for a
/// process that runs it. (Valid at enqueue, for producers.)
struct Elsewhere {
    external: bool,
}

impl Handler for Elsewhere {
    fn validate(&self, payload: &serde_json::Value) -> Result<(), PayloadError> {
        if self.external {
            check_payload(payload)
        } else {
            // Only a put-back in the external pool, never asked at enqueue.
            Ok(())
        }
    }

    fn run(&self, _ctx: JobContext) -> HandlerFuture {
        Box::pin(async {
            Err(JobError::Throttled {
                message: "this worker does not run this kind: put back for one that does".into(),
                retry_after: ELSEWHERE_RETRY,
                counts_attempt: false,
            })
        })
    }
}

impl App {
    /// Makes `kind` a kind producers may enqueue through this `App`
    /// ([`App::validate`]), run by an [`App::external_pool`]. A plain
    /// worker that claims such a job puts it back for one.
    pub fn accept_external_kind(&mut self, kind: &str) {
        self.registry.register(kind, Elsewhere { external: true });
    }

    /// A worker pool whose jobs of `kind` go to the returned channel as
    /// [`ExternalTask`]s. Jobs of other kinds that it claims from a shared
    /// queue go back for a plain worker. Run the pool (`Pool::run`) and
    /// serve the channel; the pool claims only as many jobs as its
    /// concurrency and prefetch allow.
    pub fn external_pool(
        &self,
        cfg: PoolConfig,
        kind: &str,
    ) -> (Pool, mpsc::Receiver<ExternalTask>) {
        let (tasks, receiver) = mpsc::channel(1);
        let mut registry = Registry::default();
        for other in self.registry.kinds() {
            registry.register(other, Elsewhere { external: false });
        }
        registry.register(kind, Forward { tasks });
        (self.pool_with_registry(cfg, registry), receiver)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn an_external_payload_is_args_and_nothing_else() {
        let check = crate::app::external::check_payload;
        assert!(check(&json!({"args": 7})).is_ok());
        assert!(check(&json!({"args": {"to": "a@b"}})).is_ok());
        for bad in [
            json!(7),
            json!([]),
            json!({}),
            json!({"args": 1, "extra": 2}),
            json!({"arg": 1}),
        ] {
            assert!(check(&bad).is_err(), "{bad} accepted");
        }
    }
}
