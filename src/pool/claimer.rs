//! The claim loop: one per queue, filling free slots in batches.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::completer::Completion;
use super::{error_backoff, repair, runner, PoolError, PoolEvent, Shared};
use crate::job::QueueName;
use crate::metrics as m;
use crate::queue::{Claimed, IndexEntry};
use crate::store::ClaimedJob;

pub(super) async fn run(
    shared: Arc<Shared>,
    queue: QueueName,
    completions: mpsc::Sender<Completion>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let mut permits = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            permit = shared.slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let extra = shared
            .slots
            .available_permits()
            .min(shared.cfg.claim_batch.saturating_sub(1));
        if extra > 0 {
            if let Ok(more) = shared.slots.clone().try_acquire_many_owned(extra as u32) {
                permits.merge(more);
            }
        }
        // Armed before claiming, so a wake-up that arrives while the claim is
        // under way is not missed.
        let woken = shared.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();

        match claim(&shared, &queue, permits.num_permits()).await {
            Ok(jobs) if !jobs.is_empty() => {
                failures = 0;
                for job in jobs {
                    let Some(permit) = permits.split(1) else {
                        break;
                    };
                    tokio::spawn(runner::run(
                        shared.clone(),
                        queue.clone(),
                        job,
                        permit,
                        completions.clone(),
                    ));
                }
                m::set_busy(shared.busy_slots());
            }
            Ok(_) => {
                failures = 0;
                drop(permits);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = woken => {}
                    () = tokio::time::sleep(shared.cfg.poll_interval) => {}
                }
            }
            Err(err) => {
                drop(permits);
                failures += 1;
                metrics::counter!(m::LOOP_ERRORS, "task" => "claim").increment(1);
                tracing::warn!(queue = %queue, error = %err, "claim failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(error_backoff(failures)) => {}
                }
            }
        }
    }
}

/// Claims up to `max` jobs: ids from Valkey, then one Postgres transaction.
async fn claim(
    shared: &Shared,
    queue: &QueueName,
    max: usize,
) -> Result<Vec<ClaimedJob>, PoolError> {
    let ids = match shared.queue.claim(queue, max, shared.cfg.lease).await? {
        Claimed::Paused => return Ok(Vec::new()),
        Claimed::Ids(ids) if ids.is_empty() => return Ok(Vec::new()),
        Claimed::Ids(ids) => ids,
    };
    let (jobs, refused) = match shared
        .store
        .claim(&ids, &shared.cfg.worker_id, shared.cfg.lease)
        .await
    {
        Ok(result) => result,
        Err(err) => {
            // Postgres is unreachable: give the ids back at once instead of
            // stranding them until their Valkey lease expires. Should the
            // claim have committed after all, Postgres still holds the lease
            // and the next claimer's transaction refuses the id.
            let entries: Vec<IndexEntry> = ids
                .iter()
                .map(|id| IndexEntry {
                    id: *id,
                    priority: IndexEntry::KEEP_PRIORITY,
                    due_ms: None,
                })
                .collect();
            if let Err(give_back) = shared.queue.schedule(queue, &entries).await {
                tracing::warn!(error = %give_back, "could not give claimed ids back; the reaper will");
            }
            return Err(err.into());
        }
    };
    if !refused.is_empty() {
        repair::resolve(&shared.store, &shared.queue, queue, &refused).await?;
    }
    if !jobs.is_empty() {
        for job in &jobs {
            let due = job.run_at.max(job.created_at);
            let wait = (job.started_at - due).to_std().unwrap_or_default();
            metrics::histogram!(m::JOB_WAIT_SECONDS, "queue" => job.queue.clone())
                .record(wait.as_secs_f64());
        }
        shared.observe(|| PoolEvent::Started(jobs.iter().map(|j| j.id).collect()));
    }
    Ok(jobs)
}

/// Turns Valkey wake-up messages into a notification for every claimer.
pub(super) async fn forward_wakeups(shared: Arc<Shared>, stop: CancellationToken) {
    let mut rx = shared.queue.wake_listener(&shared.cfg.queues);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            msg = rx.recv() => match msg {
                Some(()) => shared.wake.notify_waiters(),
                None => return,
            },
        }
    }
}
