//! Reading the worker registry (written by [`ValkeyQueue::worker_heartbeat`]).

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use super::{QueueError, ValkeyQueue};

/// How long a worker that stopped beating stays listed, shown as missing.
pub const WORKER_FORGET: Duration = Duration::from_secs(600);

/// Most workers listed at once: the registry is written by processes we
/// run, but a bound keeps one page cheap whatever it holds.
const MAX_LISTED: isize = 500;

/// One worker in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEntry {
    pub id: String,
    /// Its last heartbeat, in Unix milliseconds.
    pub last_beat_ms: i64,
    /// What it said about itself (queues, concurrency, busy, host, pid,
    /// started_at); empty once that record has expired.
    pub info: HashMap<String, String>,
}

impl ValkeyQueue {
    /// The workers seen in the last [`WORKER_FORGET`], most recent beat
    /// first.
    pub async fn workers(&self) -> Result<Vec<WorkerEntry>, QueueError> {
        let mut conn = self.conn.clone();
        let beats: Vec<(String, f64)> = conn
            .zrevrange_withscores(self.keys.workers(), 0, MAX_LISTED - 1)
            .await?;
        if beats.is_empty() {
            return Ok(Vec::new());
        }
        // One request per worker, sent together: in a cluster their hashes
        // live in different slots, which one pipeline cannot span.
        let infos: Vec<HashMap<String, String>> =
            futures_util::future::try_join_all(beats.iter().map(|(id, _)| {
                let mut conn = conn.clone();
                let key = self.keys.worker_info(id);
                async move { conn.hgetall(key).await }
            }))
            .await?;
        Ok(beats
            .into_iter()
            .zip(infos)
            .map(|((id, score), info)| WorkerEntry {
                id,
                // Scores are milliseconds written by `worker_heartbeat`.
                last_beat_ms: score as i64,
                info,
            })
            .collect())
    }
}
