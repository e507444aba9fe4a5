//! What the operators' dashboard shows beyond single jobs: the overview
//! (queues, throughput, workers, the kill switch, the last failures) and
//! the storage of its sessions.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{App, AppError, KillSwitchStatus, QueueInfo};
use crate::queue::WorkerEntry;
use crate::store::Failure;

/// How far back the overview counts finished jobs.
pub const THROUGHPUT_WINDOW: Duration = Duration::from_secs(300);
/// How many failed attempts the overview lists.
const FAILURES_SHOWN: u32 = 10;

/// A worker as the registry knows it.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub queues: Vec<String>,
    pub busy: Option<u32>,
    pub slots: Option<u32>,
    pub pid: Option<u32>,
    pub started_at: Option<String>,
    pub last_beat: DateTime<Utc>,
    /// No heartbeat for longer than a lease: the process is gone or stuck,
    /// and its jobs will be reaped when their leases expire.
    pub missing: bool,
}

impl WorkerInfo {
    fn from_entry(entry: WorkerEntry, lease: Duration, now: DateTime<Utc>) -> Self {
        let WorkerEntry {
            id,
            last_beat_ms,
            mut info,
        } = entry;
        let mut take = |k: &str| info.remove(k);
        let number = |v: Option<String>| v.and_then(|v| v.parse().ok());
        let last_beat = DateTime::from_timestamp_millis(last_beat_ms).unwrap_or(now);
        let silent = now
            .signed_duration_since(last_beat)
            .to_std()
            .unwrap_or_default();
        WorkerInfo {
            host: take("host").unwrap_or_default(),
            queues: take("queues")
                .map(|q| {
                    q.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            busy: number(take("busy")),
            slots: number(take("concurrency")),
            pid: number(take("pid")),
            started_at: take("started_at"),
            missing: silent > lease,
            last_beat,
            id,
        }
    }
}

/// Jobs finished in the last [`THROUGHPUT_WINDOW`], by terminal status.
#[derive(Debug, Clone, Default)]
pub struct Finished {
    pub succeeded: i64,
    pub dead: i64,
    pub cancelled: i64,
}

impl Finished {
    pub fn per_minute(&self) -> f64 {
        let total = (self.succeeded + self.dead + self.cancelled) as f64;
        total * 60.0 / THROUGHPUT_WINDOW.as_secs_f64()
    }
}

/// Everything the overview page shows, read in one go.
#[derive(Debug)]
pub struct Overview {
    pub queues: Vec<QueueInfo>,
    /// By queue name.
    pub finished: BTreeMap<String, Finished>,
    pub workers: Vec<WorkerInfo>,
    pub kill_switch: KillSwitchStatus,
    pub failures: Vec<Failure>,
}

impl App {
    /// The registry's workers, each flagged when its heartbeat stopped.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, AppError> {
        let lease = Duration::from_millis(self.settings.worker.lease_ms);
        let now = Utc::now();
        Ok(self
            .queue
            .workers()
            .await?
            .into_iter()
            .map(|e| WorkerInfo::from_entry(e, lease, now))
            .collect())
    }

    pub async fn overview(&self) -> Result<Overview, AppError> {
        let since = Utc::now()
            - chrono::Duration::from_std(THROUGHPUT_WINDOW).unwrap_or(chrono::Duration::zero());
        let (queues, counts, workers, kill_switch, failures) = tokio::try_join!(
            self.queues(),
            async { Ok::<_, AppError>(self.store.finished_counts(since).await?) },
            self.workers(),
            self.kill_switch(),
            async { Ok::<_, AppError>(self.store.recent_failures(FAILURES_SHOWN).await?) },
        )?;
        let mut finished: BTreeMap<String, Finished> = BTreeMap::new();
        for c in counts {
            let entry = finished.entry(c.queue.to_string()).or_default();
            match c.status {
                crate::job::Status::Succeeded => entry.succeeded += c.count,
                crate::job::Status::Dead => entry.dead += c.count,
                crate::job::Status::Cancelled => entry.cancelled += c.count,
                _ => {}
            }
        }
        Ok(Overview {
            queues,
            finished,
            workers,
            kill_switch: KillSwitchStatus::from_state(kill_switch.as_ref()),
            failures,
        })
    }

    /// Stores a dashboard session under the hash of its id.
    pub async fn put_session(
        &self,
        id_hash: &str,
        fields: &[(&str, String)],
        ttl: Duration,
    ) -> Result<(), AppError> {
        Ok(self.queue.put_session(id_hash, fields, ttl).await?)
    }

    pub async fn session(
        &self,
        id_hash: &str,
    ) -> Result<Option<HashMap<String, String>>, AppError> {
        Ok(self.queue.session(id_hash).await?)
    }

    pub async fn end_session(&self, id_hash: &str) -> Result<(), AppError> {
        Ok(self.queue.delete_session(id_hash).await?)
    }
}
