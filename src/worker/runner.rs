//! Runs one claimed job: its handler, under its timeout, inside a span that
//! carries the job id; then hands the outcome to the completer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Throttles that give their attempt back, per job; later ones use one up.
const MAX_FREE_THROTTLES: i64 = 20;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::claimer::Buffered;
use super::completer::Completion;
use super::{Shared, StopReason};
use crate::metrics as m;
use crate::pipeline::{JobContext, JobError, StageCell};
use crate::store::{ClaimedJob, Finish};

pub(super) async fn run(
    shared: Arc<Shared>,
    item: Buffered,
    slot: OwnedSemaphorePermit,
    completions: mpsc::Sender<Completion>,
) {
    let Buffered { queue, job, credit } = item;
    let job = Arc::new(job);
    let (cancel, reason) = match shared.inflight().get(&job.id) {
        Some(f) => (f.cancel.clone(), f.reason.clone()),
        None => (CancellationToken::new(), Arc::new(Mutex::new(None))),
    };
    let span = tracing::info_span!("job", job.id = %job.id, job.kind = %job.kind, queue = %queue, attempt = job.attempt);
    let started = Instant::now();
    let stage = StageCell::default();
    let outcome = execute(&shared, &job, cancel, stage.clone())
        .instrument(span.clone())
        .await;
    metrics::histogram!(m::JOB_RUN_SECONDS, "queue" => job.queue.to_string(), "kind" => job.kind.to_string())
        .record(started.elapsed().as_secs_f64());

    let stop_reason = reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let finish = match (outcome, stop_reason) {
        (Ok(result), _) => Some(Finish::succeeded(job.id, job.lease_id, result)),
        // However the stopped work reports its end (a killed process often
        // looks like a failure), a cancelled job is never retried.
        (
            Err(_),
            Some(StopReason::Cancelled {
                actor,
                reason,
                requested_ms,
            }),
        ) => {
            // The sandbox and worktree are gone by now: cleanup runs before
            // the pipeline returns. Said in Valkey first, so that the kill
            // switch can count it while Postgres is down.
            if let Err(err) = shared.queue.confirm_stopped(job.id).await {
                tracing::warn!(job.id = %job.id, error = %err, "cannot confirm the stop in Valkey");
            }
            if let Some(ms) = requested_ms {
                m::record_cancel_duration(job.queue.as_str(), ms);
            }
            Some(Finish::cancelled(job.id, job.lease_id, &actor, &reason))
        }
        (Err(JobError::Failed(error)), _) => Some(Finish::failed(
            job.id,
            job.lease_id,
            job.attempt,
            &job.retry,
            error,
        )),
        (Err(JobError::Fatal(error)), _) => Some(Finish::dead(job.id, job.lease_id, error)),
        (
            Err(JobError::Throttled {
                message,
                retry_after,
                counts_attempt,
            }),
            _,
        ) => {
            // An agent's output asked for this: after MAX_FREE_THROTTLES
            // free ones, throttles use up attempts, so no agent keeps its
            // job alive for ever. (Unreadable: counted, failing closed.)
            let earlier = shared
                .store
                .event_count(job.id, "throttled")
                .await
                .unwrap_or(MAX_FREE_THROTTLES);
            Some(Finish::throttled(
                job.id,
                job.lease_id,
                job.attempt,
                &job.retry,
                retry_after,
                counts_attempt || earlier >= MAX_FREE_THROTTLES,
                message,
            ))
        }
        (Err(JobError::FailedWith { message, result }), _) => {
            let mut finish = Finish::failed(job.id, job.lease_id, job.attempt, &job.retry, message);
            finish.result = Some(result);
            Some(finish)
        }
        (Err(JobError::Rejected { message, result }), _) => {
            let mut finish = Finish::dead(job.id, job.lease_id, message);
            finish.result = Some(result);
            Some(finish)
        }
        (Err(JobError::Interrupted), Some(StopReason::Shutdown)) => {
            Some(Finish::released(job.id, job.lease_id))
        }
        // Another worker may own the job now; whatever we write is stale.
        (Err(JobError::Interrupted), Some(StopReason::LeaseLost)) => None,
        (Err(JobError::Interrupted), None) => Some(Finish::failed(
            job.id,
            job.lease_id,
            job.attempt,
            &job.retry,
            "interrupted".to_owned(),
        )),
    };
    span.in_scope(|| match &finish {
        Some(f) => tracing::debug!(to = %f.to, "attempt ended"),
        None => tracing::warn!("lease lost while running; outcome discarded"),
    });
    match finish {
        Some(finish) => {
            if let Some(entry) = shared.inflight().get_mut(&job.id) {
                entry.reported = true;
            }
            let completion = Completion {
                finish,
                queue,
                kind: job.kind.to_string(),
                priority: job.priority,
                stage: stage.get(),
            };
            if completions.send(completion).await.is_err() {
                // Only during a hard stop: the lease expires and the reaper
                // retries the job; nothing is lost.
                tracing::warn!(job.id = %job.id, "completer gone; the lease will expire");
            }
        }
        None => {
            shared.inflight().remove(&job.id);
        }
    }
    shared.mark_busy();
    drop(slot);
    drop(credit);
    m::set_busy(shared.busy_slots());
}

/// The handler in its own task (a panic fails the attempt instead of
/// leaking the slot), bounded by the job's timeout.
async fn execute(
    shared: &Shared,
    job: &Arc<ClaimedJob>,
    cancel: CancellationToken,
    stage: StageCell,
) -> Result<serde_json::Value, JobError> {
    let Some(handler) = shared.registry.get(job.kind.as_str()) else {
        return Err(JobError::Fatal(format!(
            "this worker has no handler for job kind {:?}",
            job.kind
        )));
    };
    let ctx = JobContext {
        job: job.clone(),
        cancel: cancel.clone(),
        store: shared.store.clone(),
        worker_id: shared.worker_id.clone(),
        stage,
    };
    let mut task = tokio::spawn(handler.run(ctx).in_current_span());
    let limit = Duration::from_secs(u64::from(job.timeout_secs));
    match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) if join.is_panic() => {
            Err(JobError::Failed("the job's handler panicked".to_owned()))
        }
        Ok(Err(_)) => Err(JobError::Interrupted),
        Err(_) => {
            cancel.cancel();
            // Give the handler a moment to clean up after its token fired.
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
            Err(JobError::Failed(format!(
                "timed out after {}s",
                job.timeout_secs
            )))
        }
    }
}

/// Shutdown, past the grace period and the interrupt: release every job
/// whose runner has still not reported, so it goes back to its queue now.
pub(super) async fn release_remaining(shared: &Shared, completions: &mpsc::Sender<Completion>) {
    let stuck: Vec<Completion> = shared
        .inflight()
        .iter_mut()
        .filter(|(_, f)| !f.reported)
        .map(|(id, f)| {
            f.reported = true;
            Completion {
                finish: Finish::released(*id, f.lease_id),
                queue: f.queue.clone(),
                kind: String::new(),
                priority: f.priority,
                stage: "running",
            }
        })
        .collect();
    if !stuck.is_empty() {
        tracing::warn!(
            jobs = stuck.len(),
            "releasing jobs whose handlers ignored cancellation"
        );
    }
    for c in stuck {
        let _ = completions.send(c).await;
    }
}
