//! Valkey: the index of what runs next and who holds what.
//!
//! Valkey holds ids and scores only; Postgres holds the jobs. Every write here
//! follows a committed Postgres write, and everything here can be rebuilt
//! from Postgres by the reconciler.

mod connection;
mod control;
mod keys;
mod scripts;
mod sessions;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio::sync::mpsc;

pub use crate::job::CancelRequest;
use crate::job::{JobId, QueueName};
pub use connection::{Connection, Topology};
pub use control::{Control, KillSwitchState};
pub use keys::{Keys, QueueKeys};
pub use scripts::Scripts;
pub use sessions::SESSION_FIELDS;
pub use workers::{WorkerEntry, WORKER_FORGET};

/// Return codes shared by the Lua scripts and this module.
mod codes {
    /// `claim`: the queue is paused.
    pub const PAUSED: i64 = -1;
    pub const RATE_LIMITED: i64 = -2;
}

/// How long a cancel request waits for a worker to see it.
pub(crate) const CANCEL_FLAG_TTL_SECS: u64 = 86_400;

/// Ids per script call: keeps each script short so Valkey never blocks long.
const CHUNK: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "cannot reach Valkey at {url} (start it with scripts/services.sh, or set ORCH_VALKEY_URL)"
    )]
    Connect {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("Valkey script {script} failed")]
    Script {
        script: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error(transparent)]
    Command(#[from] redis::RedisError),
    #[error("unexpected answer from Valkey: {0}")]
    Protocol(String),
}

/// At most `starts` starts per `per` (a token bucket in the claim script).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub starts: u32,
    pub per: Duration,
}

impl RateLimit {
    fn arg(limit: Option<RateLimit>) -> String {
        limit
            .map(|r| format!("{}:{}", r.starts.max(1), r.per.as_millis().max(1)))
            .unwrap_or_default()
    }
}

/// A queue's rate limits: of the whole queue, and of each concurrency key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    pub queue: Option<RateLimit>,
    pub per_key: Option<RateLimit>,
}

/// One id to index: its priority and when it is due (`None` = now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: JobId,
    pub priority: u8,
    pub due_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    Paused,
    /// Ids wait, but the queue's rate limit has no start left for now.
    RateLimited,
    /// Ids handed out, with the priority they were queued at.
    Ids(Vec<(JobId, u8)>),
}

/// A snapshot of one queue in Valkey.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Depth {
    /// Pending ids per priority, index 0 is priority 1.
    pub pending_by_priority: [u64; 10],
    pub delayed: u64,
    pub active: u64,
    pub paused: bool,
    /// Held by the kill switch.
    pub halted: bool,
    /// Ids waiting because their concurrency key is at its limit (or its
    /// key's rate limit).
    pub held: u64,
    /// Pending ids that wait because the queue's rate limit has no start
    /// left for now (all of them, or none: they are among `pending`).
    pub rate_limited: u64,
}

impl Depth {
    pub fn pending(&self) -> u64 {
        self.pending_by_priority.iter().sum()
    }

    /// Records this depth in the `orchestrator_queue_depth` gauge.
    pub fn record(&self, queue: &QueueName) {
        crate::metrics::set_queue_depth(
            queue.as_str(),
            crate::metrics::QueueDepth {
                pending: self.pending().saturating_sub(self.rate_limited),
                delayed: self.delayed,
                active: self.active,
                held: self.held,
                rate_limited: self.rate_limited,
            },
        );
    }
}

#[derive(Clone)]
pub struct ValkeyQueue {
    /// For subscriptions, which need a connection of their own: one client
    /// per listed node. In a cluster a plain `PUBLISH` reaches every node,
    /// so a subscriber on any one of them hears it; a listener that loses
    /// its node moves on to the next.
    subscribers: Arc<Vec<redis::Client>>,
    conn: Connection,
    keys: Keys,
    scripts: Arc<Scripts>,
}

impl ValkeyQueue {
    /// Connects to one server, or to a cluster when `url` lists several
    /// nodes or `cluster` is set; checks it answers and loads every script
    /// (on every node of a cluster).
    pub async fn connect(url: &str, prefix: &str, cluster: bool) -> Result<Self, QueueError> {
        let topology = Topology::parse(url, cluster);
        let connect_err = |source| QueueError::Connect {
            url: topology.redacted(),
            source,
        };
        let subscribers = topology
            .urls
            .iter()
            .map(|u| redis::Client::open(u.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(connect_err)?;
        let mut conn = Connection::open(&topology).await.map_err(connect_err)?;
        let scripts = Arc::new(Scripts::new());
        scripts.load(&mut conn).await?;
        Ok(ValkeyQueue {
            subscribers: Arc::new(subscribers),
            conn,
            keys: Keys::new(prefix),
            scripts,
        })
    }

    /// A connection for commands of one's own (tests, tools).
    pub fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// Whether this is a Valkey Cluster.
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Indexes jobs (new ones, or re-indexed by the reconciler). Ids already
    /// indexed are left alone. Returns how many were added.
    pub async fn enqueue(
        &self,
        queue: &QueueName,
        entries: &[IndexEntry],
    ) -> Result<u64, QueueError> {
        self.place(&self.scripts.enqueue, true, queue, entries)
            .await
    }

    /// Moves edited jobs that still wait to their new priority and due
    /// time (see `reindex-5.lua`); returns how many moved. Call only after
    /// Postgres committed the edit.
    pub async fn reindex(
        &self,
        queue: &QueueName,
        entries: &[IndexEntry],
    ) -> Result<u64, QueueError> {
        self.place(&self.scripts.reindex, false, queue, entries)
            .await
    }

    /// Runs `enqueue` (which also looks at the held ids) or `reindex`
    /// (same arguments) in chunks.
    async fn place(
        &self,
        script: &scripts::LuaScript,
        with_held: bool,
        queue: &QueueName,
        entries: &[IndexEntry],
    ) -> Result<u64, QueueError> {
        let k = self.keys.queue(queue);
        let mut keys = vec![k.pending.as_str(), &k.delayed, &k.active, &k.prio, &k.seq];
        if with_held {
            keys.push(&k.held);
        }
        let mut conn = self.conn.clone();
        let mut placed = 0;
        for chunk in entries.chunks(CHUNK) {
            let args = entry_args(&k.wake, chunk);
            placed += script.call::<u64>(&mut conn, &keys, &args).await?;
        }
        Ok(placed)
    }

    /// Indexes jobs Postgres has just stored, queue by queue: the queue
    /// registered, their concurrency keys set first (no claim may see a
    /// keyed id without its key), then the ids. Returns the queues whose
    /// indexing failed, with how many jobs and why; Postgres holds those
    /// jobs, and the reconciler indexes them.
    pub async fn index_jobs<'a>(
        &self,
        jobs: impl IntoIterator<Item = &'a crate::job::Job>,
    ) -> Vec<(QueueName, usize, QueueError)> {
        type Batch<'j> = (Vec<IndexEntry>, Vec<(JobId, u32, &'j str)>);
        let mut by_queue: std::collections::BTreeMap<&QueueName, Batch<'a>> =
            std::collections::BTreeMap::new();
        for job in jobs {
            let (entries, keys) = by_queue.entry(&job.queue).or_default();
            if let (Some(key), Some(limit)) = (&job.concurrency_key, job.concurrency_limit) {
                keys.push((job.id, limit, key.as_str()));
            }
            entries.push(IndexEntry {
                id: job.id,
                priority: job.priority,
                due_ms: (job.status == crate::job::Status::Scheduled)
                    .then(|| job.run_at.timestamp_millis()),
            });
        }
        let mut failed = Vec::new();
        for (queue, (entries, keys)) in by_queue {
            let indexed = async {
                self.register_queues(&[queue]).await?;
                self.set_concurrency(queue, &keys).await?;
                self.enqueue(queue, &entries).await
            };
            if let Err(err) = indexed.await {
                failed.push((queue.clone(), entries.len(), err));
            }
        }
        failed
    }

    /// Gives ids their concurrency key (`limit` ids of one key run at
    /// once): call before they are indexed, so no claim sees them without
    /// it. Entries are (id, limit, key).
    pub async fn set_concurrency(
        &self,
        queue: &QueueName,
        entries: &[(JobId, u32, &str)],
    ) -> Result<(), QueueError> {
        if entries.is_empty() {
            return Ok(());
        }
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        for chunk in entries.chunks(CHUNK) {
            let pairs: Vec<(String, String)> = chunk
                .iter()
                .map(|(id, limit, key)| {
                    (
                        id.to_string(),
                        format!("{limit}\t{}", keys::concurrency_tag(key)),
                    )
                })
                .collect();
            let _: () = conn.hset_multiple(&k.ckey, &pairs).await?;
        }
        Ok(())
    }

    /// After Valkey lost its data: puts running jobs with a concurrency key
    /// back in the active set and their key's running set. Entries are
    /// (id, lease deadline ms, limit, key).
    pub async fn restore_running(
        &self,
        queue: &QueueName,
        entries: &[(JobId, i64, u32, &str)],
    ) -> Result<u64, QueueError> {
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        let mut restored = 0;
        for chunk in entries.chunks(CHUNK) {
            let mut args = Vec::with_capacity(1 + chunk.len() * 4);
            args.push(k.base.clone());
            for (id, deadline, limit, key) in chunk {
                args.push(id.to_string());
                args.push(deadline.to_string());
                args.push(limit.to_string());
                args.push(keys::concurrency_tag(key));
            }
            restored += self
                .scripts
                .restore_running
                .call::<u64>(&mut conn, &[&k.active, &k.ckey], &args)
                .await?;
        }
        Ok(restored)
    }

    /// The ids this queue does not index anywhere (read-only).
    pub async fn missing(
        &self,
        queue: &QueueName,
        ids: &[JobId],
    ) -> Result<Vec<JobId>, QueueError> {
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        let mut missing = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let args: Vec<String> = chunk.iter().map(|id| id.to_string()).collect();
            let found: Vec<String> = self
                .scripts
                .missing
                .call(
                    &mut conn,
                    &[&k.pending, &k.delayed, &k.active, &k.held],
                    &args,
                )
                .await?;
            for id in found {
                missing.push(parse_id_str(&id)?);
            }
        }
        Ok(missing)
    }

    /// Hands out up to `max` ids under a lease of `lease`, within `rates`.
    pub async fn claim(
        &self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
        rates: Rates,
    ) -> Result<Claimed, QueueError> {
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        let args = [
            lease.as_millis().to_string(),
            max.to_string(),
            max.max(100).to_string(),
            k.base.clone(),
            RateLimit::arg(rates.queue),
            RateLimit::arg(rates.per_key),
        ];
        let value: redis::Value = self
            .scripts
            .claim
            .call(
                &mut conn,
                &[
                    &k.pending,
                    &k.delayed,
                    &k.active,
                    &k.prio,
                    &k.seq,
                    &k.paused,
                    &k.limit,
                    &k.halted,
                    &k.ckey,
                    &k.held,
                    &k.heldkeys,
                    &k.bucket,
                ],
                &args,
            )
            .await?;
        match value {
            redis::Value::Int(codes::PAUSED) => Ok(Claimed::Paused),
            redis::Value::Int(codes::RATE_LIMITED) => Ok(Claimed::RateLimited),
            redis::Value::Array(items) => items
                .chunks(2)
                .map(|pair| match pair {
                    [id, redis::Value::Int(p)] => Ok((parse_id(id)?, (*p).clamp(1, 10) as u8)),
                    other => Err(QueueError::Protocol(format!("claim returned {other:?}"))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Claimed::Ids),
            other => Err(QueueError::Protocol(format!("claim returned {other:?}"))),
        }
    }

    /// Extends the leases of running jobs.
    pub async fn heartbeat(
        &self,
        queue: &QueueName,
        ids: &[JobId],
        lease: Duration,
    ) -> Result<(), QueueError> {
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        for chunk in ids.chunks(CHUNK) {
            let mut args = Vec::with_capacity(chunk.len() + 1);
            args.push((lease.as_millis() as u64).to_string());
            args.extend(chunk.iter().map(|id| id.to_string()));
            let _: u64 = self
                .scripts
                .heartbeat
                .call(&mut conn, &[&k.active], &args)
                .await?;
        }
        Ok(())
    }

    /// Releases the leases of finished jobs. Call only after Postgres committed.
    pub async fn ack(&self, queue: &QueueName, ids: &[JobId]) -> Result<(), QueueError> {
        let k = self.keys.queue(queue);
        self.call_with_ids(&self.scripts.ack, &[&k.active, &k.ckey], &k.base, ids)
            .await
    }

    /// Removes every trace of ids (finished, cancelled or unknown jobs).
    pub async fn forget(&self, queue: &QueueName, ids: &[JobId]) -> Result<(), QueueError> {
        let k = self.keys.queue(queue);
        self.call_with_ids(
            &self.scripts.forget,
            &[&k.pending, &k.delayed, &k.active, &k.prio, &k.ckey, &k.held],
            &k.base,
            ids,
        )
        .await
    }

    /// Calls a script whose arguments are the queue's key base, then ids,
    /// in chunks.
    async fn call_with_ids(
        &self,
        script: &scripts::LuaScript,
        keys: &[&str],
        base: &str,
        ids: &[JobId],
    ) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        for chunk in ids.chunks(CHUNK) {
            let mut args = Vec::with_capacity(chunk.len() + 1);
            args.push(base.to_owned());
            args.extend(chunk.iter().map(|id| id.to_string()));
            let _: u64 = script.call(&mut conn, keys, &args).await?;
        }
        Ok(())
    }

    /// Moves active jobs back to waiting (retry, reaped lease, release).
    /// Call only after Postgres committed the new status and due time.
    pub async fn schedule(
        &self,
        queue: &QueueName,
        entries: &[IndexEntry],
    ) -> Result<(), QueueError> {
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        for chunk in entries.chunks(CHUNK) {
            let args = entry_args(&k.wake, chunk);
            let _: u64 = self
                .scripts
                .schedule
                .call(
                    &mut conn,
                    &[&k.pending, &k.delayed, &k.active, &k.prio, &k.seq],
                    &args,
                )
                .await?;
        }
        Ok(())
    }

    /// Moves due delayed jobs to pending. Returns how many moved.
    pub async fn promote(&self, queue: &QueueName, limit: usize) -> Result<u64, QueueError> {
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        let args = [k.wake.clone(), limit.to_string()];
        self.scripts
            .promote
            .call(&mut conn, &[&k.pending, &k.delayed, &k.prio, &k.seq], &args)
            .await
    }

    /// Ids whose lease deadline passed; held for `hold` so that other
    /// reapers skip them meanwhile.
    pub async fn reap(
        &self,
        queue: &QueueName,
        limit: usize,
        hold: Duration,
    ) -> Result<Vec<JobId>, QueueError> {
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        let args = [limit as u64, hold.as_millis() as u64];
        let ids: Vec<String> = self
            .scripts
            .reap
            .call(&mut conn, &[&k.active], &args)
            .await?;
        ids.iter().map(|s| parse_id_str(s)).collect()
    }

    /// Sets (or with `None` lifts) the most jobs of `queue` under a lease at
    /// once, across every worker.
    pub async fn set_limit(&self, queue: &QueueName, limit: Option<u32>) -> Result<(), QueueError> {
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        match limit {
            Some(n) => {
                let _: () = conn.set(&k.limit, n).await?;
            }
            None => {
                let _: () = conn.del(&k.limit).await?;
            }
        }
        Ok(())
    }

    /// Pauses or resumes a queue; returns whether the state changed.
    pub async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<bool, QueueError> {
        let k = self.keys.queue(queue);
        self.set_queue_flag(&k.paused, &k.wake, paused).await
    }

    /// Sets or clears one of a queue's hold flags (`setPaused`); clearing
    /// wakes its workers. Returns whether the state changed.
    async fn set_queue_flag(&self, flag: &str, wake: &str, on: bool) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        let changed: u64 = self
            .scripts
            .set_paused
            .call(&mut conn, &[flag], &[if on { "1" } else { "0" }, wake])
            .await?;
        Ok(changed == 1)
    }

    pub async fn depth(&self, queue: &QueueName) -> Result<Depth, QueueError> {
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        let raw: Vec<u64> = self
            .scripts
            .depth
            .call(
                &mut conn,
                &[
                    &k.pending,
                    &k.delayed,
                    &k.active,
                    &k.paused,
                    &k.halted,
                    &k.held,
                    &k.ratewait,
                ],
                &[] as &[u8],
            )
            .await?;
        if raw.len() != 16 {
            return Err(QueueError::Protocol(format!(
                "depth returned {} values",
                raw.len()
            )));
        }
        let mut depth = Depth {
            delayed: raw[0],
            active: raw[1],
            paused: raw[2] == 1,
            halted: raw[3] == 1,
            held: raw[4],
            ..Depth::default()
        };
        depth.pending_by_priority.copy_from_slice(&raw[6..16]);
        if raw[5] == 1 {
            depth.rate_limited = depth.pending();
        }
        Ok(depth)
    }

    /// Remembers a queue name so that listings and maintenance find it.
    pub async fn register_queues(&self, queues: &[&QueueName]) -> Result<(), QueueError> {
        if queues.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let names: Vec<&str> = queues.iter().map(|q| q.as_str()).collect();
        let _: u64 = conn.sadd(self.keys.queues(), names).await?;
        Ok(())
    }

    /// How many queues the registry holds, and which of `queues` it does
    /// not know yet.
    pub async fn new_queues<'q>(
        &self,
        queues: &[&'q QueueName],
    ) -> Result<(u64, Vec<&'q QueueName>), QueueError> {
        if queues.is_empty() {
            return Ok((0, Vec::new()));
        }
        let mut conn = self.conn.clone();
        let names: Vec<&str> = queues.iter().map(|q| q.as_str()).collect();
        let (count, known): (u64, Vec<bool>) = redis::pipe()
            .scard(self.keys.queues())
            .smismember(self.keys.queues(), names)
            .query_async(&mut conn)
            .await?;
        let new = queues
            .iter()
            .zip(known)
            .filter(|(_, known)| !known)
            .map(|(q, _)| *q)
            .collect();
        Ok((count, new))
    }

    /// Deletes a queue's keys and its name (bench queues, tests). Only for
    /// queues whose jobs are all finished: their ids are gone with it.
    pub async fn drop_queue(&self, queue: &QueueName) -> Result<(), QueueError> {
        let k = self.keys.queue(queue);
        let mut conn = self.conn.clone();
        // The queue's keys share its slot; the registry is elsewhere.
        let _: () = conn
            .del(&[
                &k.pending, &k.delayed, &k.active, &k.prio, &k.seq, &k.paused, &k.halted, &k.limit,
            ])
            .await?;
        let _: () = conn.srem(self.keys.queues(), queue.as_str()).await?;
        Ok(())
    }

    pub async fn known_queues(&self) -> Result<Vec<QueueName>, QueueError> {
        let mut conn = self.conn.clone();
        let names: Vec<String> = conn.smembers(self.keys.queues()).await?;
        let mut queues: Vec<QueueName> = names
            .into_iter()
            .filter_map(|n| QueueName::parse(n).ok())
            .collect();
        queues.sort();
        Ok(queues)
    }

    /// Says for `ttl` that a worker pool is saturated with short jobs (see
    /// [`Keys::saturated`]).
    pub async fn mark_saturated(&self, ttl: Duration) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let _: () = conn.pset_ex(self.keys.saturated(), 1, ms).await?;
        Ok(())
    }

    /// Whether some worker pool said it is saturated within its mark's TTL.
    pub async fn saturated(&self) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.exists(self.keys.saturated()).await?)
    }

    /// Whether the rebuild sentinel is present (see [`Keys::epoch`]).
    pub async fn epoch_present(&self) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.exists(self.keys.epoch()).await?)
    }

    pub async fn set_epoch(&self, value: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: () = conn.set(self.keys.epoch(), value).await?;
        Ok(())
    }

    /// Records a worker's heartbeat in the registry. A worker that stopped
    /// beating stays listed (as missing) for [`WORKER_FORGET`], then is
    /// forgotten.
    pub async fn worker_heartbeat(
        &self,
        worker_id: &str,
        info: &[(&str, String)],
        ttl: Duration,
    ) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let info_key = self.keys.worker_info(worker_id);
        let forget = WORKER_FORGET.max(ttl).as_millis() as i64;
        // A pipeline per key: in a cluster the registry and the worker's
        // hash live in different slots.
        let _: () = redis::pipe()
            .zadd(self.keys.workers(), worker_id, now_ms)
            .ignore()
            .zrembyscore(self.keys.workers(), "-inf", now_ms - forget)
            .ignore()
            .query_async(&mut conn)
            .await?;
        let mut pipe = redis::pipe();
        if !info.is_empty() {
            pipe.hset_multiple(&info_key, info).ignore();
        }
        pipe.pexpire(&info_key, forget).ignore();
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    pub async fn worker_deregister(&self, worker_id: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: () = conn.zrem(self.keys.workers(), worker_id).await?;
        let _: () = conn.del(self.keys.worker_info(worker_id)).await?;
        Ok(())
    }

    /// Worker ids that beat within `ttl`.
    pub async fn live_workers(&self, ttl: Duration) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn.clone();
        let since = chrono::Utc::now().timestamp_millis() - ttl.as_millis() as i64;
        Ok(conn
            .zrangebyscore(self.keys.workers(), since, "+inf")
            .await?)
    }

    /// Asks the worker running `id` to stop it (flag + message). The flag
    /// holds `requested_ms\tactor\treason`.
    pub async fn request_cancel(
        &self,
        id: JobId,
        actor: &str,
        reason: &str,
    ) -> Result<(), QueueError> {
        self.request_cancel_at(id, actor, reason, chrono::Utc::now())
            .await
    }

    async fn request_cancel_at(
        &self,
        id: JobId,
        actor: &str,
        reason: &str,
        requested: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let value = format!("{}\t{actor}\t{reason}", requested.timestamp_millis());
        let args = [
            self.keys.cancel_channel(),
            id.to_string(),
            value,
            CANCEL_FLAG_TTL_SECS.to_string(),
        ];
        let _: u64 = self
            .scripts
            .request_cancel
            .call(&mut conn, &[&self.keys.cancel_flag(&id)], &args)
            .await?;
        Ok(())
    }

    /// The cancel requests pending for any of `ids`.
    pub async fn cancel_requests(&self, ids: &[JobId]) -> Result<Vec<CancelRequest>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let keys: Vec<String> = ids.iter().map(|id| self.keys.cancel_flag(id)).collect();
        let values: Vec<Option<String>> = conn.mget(keys).await?;
        Ok(ids
            .iter()
            .zip(values)
            .filter_map(|(id, v)| {
                let v = v?;
                let mut parts = v.splitn(3, '\t');
                let requested_ms = parts.next().and_then(|ms| ms.parse().ok());
                let actor = parts.next().unwrap_or("?").to_owned();
                let reason = parts.next().unwrap_or_default().to_owned();
                Some(CancelRequest {
                    id: *id,
                    actor,
                    reason,
                    requested_ms,
                })
            })
            .collect())
    }

    pub async fn clear_cancel(&self, ids: &[JobId]) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let keys: Vec<String> = ids.iter().map(|id| self.keys.cancel_flag(id)).collect();
        let _: () = conn.del(keys).await?;
        Ok(())
    }

    /// Subscribes to the wake channels of `queues`; every message (ids became
    /// pending) is forwarded as a `()` on the returned channel. The task
    /// resubscribes after a lost connection and ends when the receiver drops.
    pub fn wake_listener(&self, queues: &[QueueName]) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        let nodes = self.subscribers.clone();
        let channels: Vec<String> = queues.iter().map(|q| self.keys.queue(q).wake).collect();
        tokio::spawn(async move {
            for attempt in 0.. {
                match pubsub(&nodes, attempt).await {
                    Ok(mut pubsub) => {
                        if let Err(err) = pubsub.subscribe(&channels).await {
                            tracing::warn!(error = %err, "wake subscription failed");
                        } else {
                            let mut messages = pubsub.on_message();
                            while messages.next().await.is_some() {
                                match tx.try_send(()) {
                                    Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                                    Err(mpsc::error::TrySendError::Closed(())) => return,
                                }
                            }
                        }
                    }
                    Err(err) => tracing::debug!(error = %err, "wake listener cannot connect"),
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        rx
    }
}

/// A subscription connection to the `attempt`-th of `nodes`, round robin,
/// so that a listener whose node is gone tries the next one.
async fn pubsub(nodes: &[redis::Client], attempt: usize) -> redis::RedisResult<redis::aio::PubSub> {
    match nodes.get(attempt % nodes.len().max(1)) {
        Some(client) => client.get_async_pubsub().await,
        None => Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "no Valkey node to subscribe on",
        ))),
    }
}

fn entry_args(wake: &str, entries: &[IndexEntry]) -> Vec<String> {
    let mut args = Vec::with_capacity(1 + entries.len() * 3);
    args.push(wake.to_owned());
    for e in entries {
        args.push(e.id.to_string());
        args.push(e.priority.to_string());
        args.push(e.due_ms.unwrap_or(0).to_string());
    }
    args
}

fn parse_id(value: &redis::Value) -> Result<JobId, QueueError> {
    match value {
        redis::Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .map_err(|_| QueueError::Protocol("non-UTF-8 id".into()))
            .and_then(parse_id_str),
        other => Err(QueueError::Protocol(format!(
            "expected an id, got {other:?}"
        ))),
    }
}

fn parse_id_str(s: &str) -> Result<JobId, QueueError> {
    s.parse()
        .map_err(|_| QueueError::Protocol(format!("malformed job id {s:?} in Valkey")))
}
