//! The batch completer: outcomes are collected while the previous batch is
//! being written, then committed to Postgres in one transaction, and only
//! then applied to Valkey. The bounded channel makes runners wait when the
//! backlog grows (Postgres slow or down), which stops new claims.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{error_backoff, PoolEvent, Shared};
use crate::job::{JobId, QueueName, Status};
use crate::metrics as m;
use crate::queue::IndexEntry;
use crate::store::{Finish, FinishOutcome};

pub(super) struct Completion {
    pub finish: Finish,
    pub queue: QueueName,
    pub kind: String,
    /// For retries: the priority to index with.
    pub priority: u8,
    /// Where the job was when it ended (counted for cancellations).
    pub stage: &'static str,
}

pub(super) fn start(shared: Arc<Shared>) -> (mpsc::Sender<Completion>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(shared.cfg.complete_batch * 2);
    (tx, tokio::spawn(run(shared, rx)))
}

/// Runs until every sender is dropped and the channel is drained: the final
/// flush at shutdown happens here, not in a cancelled context.
async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Completion>) {
    let max = shared.cfg.complete_batch;
    let mut batch = Vec::with_capacity(max);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        flush(&shared, &mut batch).await;
    }
}

async fn flush(shared: &Shared, batch: &mut Vec<Completion>) {
    let finishes: Vec<Finish> = batch.iter().map(|c| c.finish.clone()).collect();
    let mut failures = 0;
    let t0 = std::time::Instant::now();
    let outcome = loop {
        match shared.store.finish(&finishes, &shared.cfg.worker_id).await {
            Ok(outcome) => break outcome,
            Err(err) if err.is_transient() => {
                failures += 1;
                metrics::counter!(m::LOOP_ERRORS, "task" => "complete").increment(1);
                tracing::warn!(error = %err, jobs = finishes.len(), "cannot record outcomes yet; retrying");
                tokio::time::sleep(error_backoff(failures)).await;
            }
            Err(err) => {
                // Not retryable: leave these jobs to lease expiry and the
                // reaper, which retries them. Never hold their slots forever.
                tracing::error!(error = %err, jobs = finishes.len(), "recording outcomes failed");
                let mut inflight = shared.inflight();
                for c in batch.iter() {
                    inflight.remove(&c.finish.id);
                }
                batch.clear();
                return;
            }
        }
    };
    let pg = t0.elapsed();
    {
        let mut inflight = shared.inflight();
        for c in batch.iter() {
            inflight.remove(&c.finish.id);
        }
    }
    record_metrics(batch, &outcome);
    apply_to_valkey(shared, batch, &outcome).await;
    tracing::debug!(
        jobs = batch.len(),
        postgres_ms = pg.as_millis() as u64,
        total_ms = t0.elapsed().as_millis() as u64,
        "completed batch"
    );
    if !outcome.stale.is_empty() {
        tracing::warn!(
            jobs = outcome.stale.len(),
            "stale completions refused: leases no longer current"
        );
    }
    shared.observe(|| PoolEvent::Finished(outcome.applied.clone()));
    if !outcome.stale.is_empty() {
        shared.observe(|| PoolEvent::Stale(outcome.stale.clone()));
    }
    batch.clear();
}

fn record_metrics(batch: &[Completion], outcome: &FinishOutcome) {
    let by_id: HashMap<JobId, &Completion> = batch.iter().map(|c| (c.finish.id, c)).collect();
    let mut counts: HashMap<(&str, &str, &'static str), u64> = HashMap::new();
    for (id, status) in &outcome.applied {
        if let Some(c) = by_id.get(id) {
            if *status == Status::Cancelled {
                m::count_cancel(c.queue.as_str(), c.stage);
            }
            let label = match status {
                Status::Succeeded => "succeeded",
                Status::Scheduled => "retried",
                Status::Dead => "dead",
                Status::Queued => "released",
                Status::Cancelled => "cancelled",
                Status::Running => "running",
            };
            *counts
                .entry((c.queue.as_str(), c.kind.as_str(), label))
                .or_default() += 1;
        }
    }
    for ((queue, kind, outcome), n) in counts {
        metrics::counter!(m::JOBS_FINISHED, "queue" => queue.to_owned(), "kind" => kind.to_owned(), "outcome" => outcome)
            .increment(n);
        match outcome {
            "retried" => {
                metrics::counter!(m::JOB_RETRIES, "queue" => queue.to_owned()).increment(n)
            }
            "dead" => metrics::counter!(m::JOBS_DEAD, "queue" => queue.to_owned()).increment(n),
            _ => {}
        }
    }
    let mut stale: HashMap<&str, u64> = HashMap::new();
    for id in &outcome.stale {
        if let Some(c) = by_id.get(id) {
            *stale.entry(c.queue.as_str()).or_default() += 1;
        }
    }
    for (queue, n) in stale {
        metrics::counter!(m::STALE_COMPLETIONS, "queue" => queue.to_owned()).increment(n);
    }
}

/// Postgres committed; now the index follows. A failure here is repaired by
/// the reaper (finished ids left active) and the reconciler.
async fn apply_to_valkey(shared: &Shared, batch: &[Completion], outcome: &FinishOutcome) {
    let by_id: HashMap<JobId, &Completion> = batch.iter().map(|c| (c.finish.id, c)).collect();
    let mut acks: HashMap<&QueueName, Vec<JobId>> = HashMap::new();
    let mut requeue: HashMap<&QueueName, Vec<IndexEntry>> = HashMap::new();
    for (id, status) in &outcome.applied {
        let Some(c) = by_id.get(id) else { continue };
        if status.is_terminal() {
            acks.entry(&c.queue).or_default().push(*id);
        } else {
            requeue.entry(&c.queue).or_default().push(IndexEntry {
                id: *id,
                priority: c.priority,
                due_ms: c.finish.run_at.map(|t| t.timestamp_millis()),
            });
        }
    }
    // Done with; and a request left for a job that went dead first must not
    // cancel an admin's retry of it. (A succeeded job never runs again.)
    let finished: Vec<JobId> = outcome
        .applied
        .iter()
        .filter(|(_, s)| matches!(s, Status::Cancelled | Status::Dead))
        .map(|(id, _)| *id)
        .collect();
    if let Err(err) = shared.queue.clear_cancel(&finished).await {
        tracing::debug!(error = %err, "cancel flags left to expire");
    }
    for (queue, ids) in acks {
        if let Err(err) = shared.queue.ack(queue, &ids).await {
            tracing::warn!(error = %err, jobs = ids.len(), "ack failed; the reaper will clean up");
        }
    }
    for (queue, entries) in requeue {
        if let Err(err) = shared.queue.schedule(queue, &entries).await {
            tracing::warn!(error = %err, jobs = entries.len(), "requeue failed; the reconciler will repair");
        }
    }
}
