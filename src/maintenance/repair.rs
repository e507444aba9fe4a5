//! Puts ids back where Postgres says they belong, after Valkey handed them
//! out (claim, reap) but Postgres would not act on them.

use super::MaintenanceError;
use crate::job::{JobId, QueueName, Status};
use crate::queue::{IndexEntry, ValkeyQueue};
use crate::store::Store;

/// For each id: unknown, terminal or of another queue → forgotten; queued →
/// pending; scheduled → delayed until its `run_at`; running → left to its
/// lease holder (or to the reaper once the lease expires).
pub(crate) async fn resolve(
    store: &Store,
    valkey: &ValkeyQueue,
    queue: &QueueName,
    ids: &[JobId],
) -> Result<(), MaintenanceError> {
    let states = store.index_states(ids).await?;
    let mut forget: Vec<JobId> = ids
        .iter()
        .copied()
        .filter(|id| !states.iter().any(|s| s.id == *id))
        .collect();
    let mut back = Vec::new();
    for s in states {
        match s.status {
            _ if s.queue != queue.as_str() => forget.push(s.id),
            Status::Queued => back.push(IndexEntry {
                id: s.id,
                priority: s.priority,
                due_ms: None,
            }),
            Status::Scheduled => back.push(IndexEntry {
                id: s.id,
                priority: s.priority,
                due_ms: Some(s.run_at.timestamp_millis()),
            }),
            Status::Running => {}
            Status::Succeeded | Status::Dead | Status::Cancelled => forget.push(s.id),
        }
    }
    if !forget.is_empty() {
        valkey.forget(queue, &forget).await?;
    }
    if !back.is_empty() {
        valkey.schedule(queue, &back).await?;
    }
    Ok(())
}
