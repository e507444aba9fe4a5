//! Lease heartbeats and the worker registry.
//!
//! Every third of a lease, one Postgres statement extends the leases of every
//! job this worker runs, then Valkey follows. A lease Postgres no longer
//! grants (it expired and was reaped, say) means another worker may run the
//! job now: its handler is told to stop and its outcome is discarded.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Shared, StopReason};
use crate::job::{JobId, QueueName};
use crate::metrics as m;

pub(super) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = shared.cfg.lease / 3;
    let started_at = chrono::Utc::now().to_rfc3339();
    // Shown on the dashboard: which host a worker runs on.
    let host = shared.cfg.host.clone();
    loop {
        beat(&shared, &started_at, &host).await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

async fn beat(shared: &Shared, started_at: &str, host: &str) {
    let cfg = &shared.cfg;
    let info = [
        (
            "queues",
            cfg.queues
                .iter()
                .map(|q| q.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("concurrency", cfg.concurrency.to_string()),
        ("busy", shared.busy_slots().to_string()),
        ("pid", std::process::id().to_string()),
        ("host", host.to_owned()),
        ("started_at", started_at.to_owned()),
    ];
    if let Err(err) = shared
        .queue
        .worker_heartbeat(&cfg.worker_id, &info, cfg.lease)
        .await
    {
        tracing::debug!(error = %err, "worker registry heartbeat failed");
    }

    super::poll_kill_switch(shared).await;

    let leases: Vec<(JobId, i64, QueueName)> = shared
        .inflight()
        .iter()
        .map(|(id, f)| (*id, f.lease_id, f.queue.clone()))
        .collect();
    if leases.is_empty() {
        return;
    }
    let ids: Vec<JobId> = leases.iter().map(|(id, _, _)| *id).collect();
    if let Err(err) = super::stop_cancelled(shared, &ids).await {
        tracing::debug!(error = %err, "cannot read cancel flags");
    }
    let pairs: Vec<(JobId, i64)> = leases.iter().map(|(id, lease, _)| (*id, *lease)).collect();
    let held: HashSet<JobId> = match shared.store.heartbeat(&pairs, cfg.lease).await {
        Ok(held) => held.into_iter().collect(),
        Err(err) => {
            metrics::counter!(m::LOOP_ERRORS, "task" => "heartbeat").increment(1);
            tracing::warn!(error = %err, jobs = leases.len(), "lease heartbeat failed; retrying next beat");
            return;
        }
    };
    let mut by_queue: HashMap<QueueName, Vec<JobId>> = HashMap::new();
    {
        let inflight = shared.inflight();
        for (id, _, queue) in leases {
            if held.contains(&id) {
                by_queue.entry(queue).or_default().push(id);
            } else if let Some(job) = inflight.get(&id) {
                if !job.reported {
                    tracing::warn!(job.id = %id, "lease lost; stopping the job");
                    let mut reason = job.reason.lock().unwrap_or_else(|e| e.into_inner());
                    reason.get_or_insert(StopReason::LeaseLost);
                    job.cancel.cancel();
                }
            }
        }
    }
    for (queue, ids) in by_queue {
        if let Err(err) = shared.queue.heartbeat(&queue, &ids, cfg.lease).await {
            tracing::debug!(error = %err, "Valkey lease heartbeat failed");
        }
    }
}
