//! The claim loop (one per queue) and the dispatcher.
//!
//! A claimer holds a *credit* for every job it claims, from the claim until
//! the job's outcome reaches the completer. Credits number `concurrency +
//! prefetch`: with a prefetch, the next batch is claimed while the current
//! one runs (as graphile-worker's local queue does). Claimed jobs wait in a
//! local buffer for a free *slot* (`concurrency` of them); the dispatcher
//! starts them. Claims are batched: a claimer takes every free credit (up to
//! `claim_batch`), and while a claim is under way more come back, so a busy
//! pool claims many ids per round trip and an idle one answers a single job
//! at once.

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::completer::Completion;
use super::{error_backoff, runner, InFlight, PoolError, PoolEvent, Shared};
use crate::job::{JobId, QueueName};
use crate::maintenance::repair;
use crate::metrics as m;
use crate::queue::{Claimed, IndexEntry};
use crate::store::{ClaimedJob, Finish};

/// A claimed job waiting for a slot, with the credit it holds.
pub(super) struct Buffered {
    pub queue: QueueName,
    pub job: ClaimedJob,
    pub credit: OwnedSemaphorePermit,
}

pub(super) async fn run(
    shared: Arc<Shared>,
    queue: QueueName,
    buffer: mpsc::UnboundedSender<Buffered>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    let batch = shared.cfg.claim_batch;
    loop {
        let mut credits = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            credit = shared.credits.clone().acquire_owned() => match credit {
                Ok(c) => c,
                Err(_) => return,
            },
        };
        let extra = shared
            .credits
            .available_permits()
            .min(batch.saturating_sub(credits.num_permits()));
        if extra > 0 {
            if let Ok(c) = shared.credits.clone().try_acquire_many_owned(extra as u32) {
                credits.merge(c);
            }
        }
        if shared.budget_spent() {
            tracing::info!(queue = %queue, "claimed as many jobs as allowed; claiming no more");
            return;
        }
        if shared.idle_too_long() {
            tracing::info!(queue = %queue, "idle for the idle exit; claiming no more");
            return;
        }
        // Armed before claiming, so a wake-up that arrives while the claim is
        // under way is not missed.
        let woken = shared.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();

        if shared.halted.load(std::sync::atomic::Ordering::SeqCst) {
            drop(credits);
            tokio::select! {
                () = stop.cancelled() => return,
                () = woken => {}
                () = tokio::time::sleep(shared.cfg.poll_interval) => {}
            }
            continue;
        }
        let reserved = shared.reserve(credits.num_permits());
        if reserved == 0 {
            // Another queue's claimer took the rest of the budget.
            drop(credits);
            continue;
        }
        let claimed = claim(&shared, &queue, reserved).await;
        shared.unreserve(reserved - claimed.as_ref().map_or(0, Vec::len));
        match claimed {
            Ok(jobs) if !jobs.is_empty() => {
                failures = 0;
                shared.mark_busy();
                shared.note_claim(reserved, jobs.len());
                for job in jobs {
                    let Some(credit) = credits.split(1) else {
                        break;
                    };
                    let item = Buffered {
                        queue: queue.clone(),
                        job,
                        credit,
                    };
                    if let Err(mpsc::error::SendError(item)) = buffer.send(item) {
                        // Dispatcher gone (hard stop): the lease expires and
                        // the reaper retries the job.
                        tracing::warn!(job.id = %item.job.id, "dispatcher gone; leaving the lease to expire");
                    }
                }
            }
            Ok(_) => {
                failures = 0;
                drop(credits);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = woken => {}
                    () = tokio::time::sleep(shared.cfg.poll_interval) => {}
                }
            }
            Err(err) => {
                drop(credits);
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
/// Claimed jobs are registered as in flight at once, so their leases are
/// renewed even while they wait for a slot.
async fn claim(
    shared: &Shared,
    queue: &QueueName,
    max: usize,
) -> Result<Vec<ClaimedJob>, PoolError> {
    let t0 = std::time::Instant::now();
    let rates = shared
        .cfg
        .rates
        .get(queue.as_str())
        .copied()
        .unwrap_or_default();
    let claimed = match shared
        .queue
        .claim(queue, max, shared.cfg.lease, rates)
        .await?
    {
        Claimed::Paused => return Ok(Vec::new()),
        Claimed::RateLimited => {
            metrics::counter!(m::RATE_LIMITED_CLAIMS, "queue" => queue.to_string()).increment(1);
            return Ok(Vec::new());
        }
        Claimed::Ids(ids) if ids.is_empty() => return Ok(Vec::new()),
        Claimed::Ids(ids) => ids,
    };
    let ids: Vec<JobId> = claimed.iter().map(|(id, _)| *id).collect();
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
            let entries: Vec<IndexEntry> = claimed
                .iter()
                .map(|(id, priority)| IndexEntry {
                    id: *id,
                    priority: *priority,
                    due_ms: None,
                })
                .collect();
            if let Err(give_back) = shared.queue.schedule(queue, &entries).await {
                tracing::warn!(error = %give_back, "could not give claimed ids back; the reaper will");
            }
            return Err(err.into());
        }
    };
    tracing::debug!(queue = %queue, asked = max, claimed = jobs.len(), elapsed_ms = t0.elapsed().as_millis() as u64, "claimed batch");
    if !refused.is_empty() {
        repair::resolve(&shared.store, &shared.queue, queue, &refused).await?;
    }
    if !jobs.is_empty() {
        {
            let mut inflight = shared.inflight();
            for job in &jobs {
                inflight.insert(
                    job.id,
                    InFlight::new(queue.clone(), job.priority, job.lease_id),
                );
            }
        }
        // Cancelled while it waited in the queue's index: stop it at once.
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        if let Err(err) = super::stop_cancelled(shared, &ids).await {
            tracing::debug!(error = %err, "cannot read cancel flags; the heartbeat will");
        }
        shared.observe(|| PoolEvent::Started(jobs.iter().map(|j| j.id).collect()));
    }
    Ok(jobs)
}

/// Starts buffered jobs as slots free up. Runs until every claimer has
/// stopped and the buffer is empty; once `stop` fires, buffered jobs that
/// have not started are released back to their queue, attempt refunded.
pub(super) async fn dispatch(
    shared: Arc<Shared>,
    mut buffer: mpsc::UnboundedReceiver<Buffered>,
    completions: mpsc::Sender<Completion>,
    stop: CancellationToken,
) {
    while let Some(item) = buffer.recv().await {
        let slot = tokio::select! {
            biased;
            () = stop.cancelled() => None,
            slot = shared.slots.clone().acquire_owned() => slot.ok(),
        };
        match slot {
            Some(slot) => {
                let due = item.job.run_at.max(item.job.created_at);
                let wait = (chrono::Utc::now() - due).to_std().unwrap_or_default();
                metrics::histogram!(m::JOB_WAIT_SECONDS, "queue" => item.queue.to_string())
                    .record(wait.as_secs_f64());
                tokio::spawn(runner::run(shared.clone(), item, slot, completions.clone()));
                m::set_busy(shared.busy_slots());
            }
            None => release(&shared, item, &completions).await,
        }
    }
}

async fn release(shared: &Shared, item: Buffered, completions: &mpsc::Sender<Completion>) {
    if let Some(f) = shared.inflight().get_mut(&item.job.id) {
        f.reported = true;
    }
    let completion = Completion {
        finish: Finish::released(item.job.id, item.job.lease_id),
        queue: item.queue,
        kind: item.job.kind.to_string(),
        priority: item.job.priority,
        stage: "claimed",
    };
    let _ = completions.send(completion).await;
    drop(item.credit);
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
