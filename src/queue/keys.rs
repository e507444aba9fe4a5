//! Every Valkey key and channel name is built here, nowhere else.
//!
//! Per-queue keys carry the hash tag `{q:<name>}` so one queue's keys live in
//! one slot and every script is Valkey Cluster-safe. Queue names cannot hold
//! braces (see [`QueueName`]), so the tag is unambiguous.

use crate::job::QueueName;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// The keys of one queue.
#[derive(Debug, Clone)]
pub struct QueueKeys {
    /// zset: id -> priority/FIFO score; what runs next.
    pub pending: String,
    /// zset: id -> due time (ms); delayed jobs and retries in backoff.
    pub delayed: String,
    /// zset: id -> lease deadline (ms); what runs now.
    pub active: String,
    /// hash: id -> priority, for every indexed id.
    pub prio: String,
    /// counter: FIFO sequence within a priority.
    pub seq: String,
    /// flag: present while the queue is paused.
    pub paused: String,
    /// flag: present while the kill switch holds the queue (apart from
    /// `paused`, so lifting the switch leaves an admin's pause alone).
    pub halted: String,
    /// number: most jobs of the queue under a lease at once (optional).
    pub limit: String,
    /// pub/sub channel: published to when ids become pending.
    pub wake: String,
    /// hash: id -> `<limit>\t<tag>`, for ids with a concurrency key.
    pub ckey: String,
    /// zset: id -> pending score, ids held while their key is at its limit.
    pub held: String,
    /// hash: tag -> limit, the keys that hold ids.
    pub heldkeys: String,
    /// hash: the queue's rate-limit token bucket (`tokens`, `ts`).
    pub bucket: String,
    /// flag: present while the pending ids wait for the bucket (set by a
    /// claim it refused, expiring when a token is back).
    pub ratewait: String,
    /// What the per-key keys start with (`<base>ck:<tag>`: running ids,
    /// `<base>held:<tag>`: held ids), in the queue's slot.
    pub base: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Keys {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn queue(&self, queue: &QueueName) -> QueueKeys {
        let base = format!("{}:{{q:{}}}", self.prefix, queue);
        QueueKeys {
            pending: format!("{base}:pending"),
            delayed: format!("{base}:delayed"),
            active: format!("{base}:active"),
            prio: format!("{base}:prio"),
            seq: format!("{base}:seq"),
            paused: format!("{base}:paused"),
            halted: format!("{base}:halted"),
            limit: format!("{base}:limit"),
            wake: format!("{}:wake:{}", self.prefix, queue),
            ckey: format!("{base}:ckey"),
            held: format!("{base}:held"),
            heldkeys: format!("{base}:heldkeys"),
            bucket: format!("{base}:bucket"),
            ratewait: format!("{base}:ratewait"),
            base: format!("{base}:"),
        }
    }

    /// set: every queue name ever used.
    pub fn queues(&self) -> String {
        format!("{}:queues", self.prefix)
    }

    /// zset: worker id -> last heartbeat (ms).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    /// hash: a dashboard session, keyed by the SHA-256 of its cookie (so
    /// Valkey never holds a usable session id).
    pub fn ui_session(&self, id_hash: &str) -> String {
        format!("{}:ui:session:{}", self.prefix, id_hash)
    }

    /// hash: what a worker told the registry about itself.
    pub fn worker_info(&self, worker_id: &str) -> String {
        format!("{}:worker:{}", self.prefix, worker_id)
    }

    /// flag: a cancel request for a running job
    /// (`requested_ms<TAB>actor<TAB>reason`).
    pub fn cancel_flag(&self, id: &crate::job::JobId) -> String {
        format!("{}:cancel:{id}", self.prefix)
    }

    /// pub/sub channel: ids of running jobs to cancel.
    pub fn cancel_channel(&self) -> String {
        format!("{}:cancel", self.prefix)
    }

    /// flag: stopped after a cancel (Unix ms): the sandbox and worktree of
    /// the job are gone. The kill switch waits on these.
    pub fn stopped(&self, id: &crate::job::JobId) -> String {
        format!("{}:stopped:{id}", self.prefix)
    }

    /// hash: the kill switch, present while engaged
    /// (`id`, `since_ms`, `actor`, `reason`).
    pub fn kill_switch(&self) -> String {
        format!("{}:killswitch", self.prefix)
    }

    /// pub/sub channel: `engaged` or `lifted`, when the kill switch changes.
    pub fn control_channel(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// list: audit records (JSON) Postgres could not take yet; maintenance
    /// writes them once it can.
    pub fn outbox(&self) -> String {
        format!("{}:outbox", self.prefix)
    }

    /// list: audit records Postgres refused for good, kept for an operator.
    pub fn outbox_dead(&self) -> String {
        format!("{}:outbox:dead", self.prefix)
    }

    /// flag: present while some worker pool is saturated with short jobs
    /// (each pool renews it while its claims say so); webhook deliverers
    /// defer fresh deliveries while it is.
    pub fn saturated(&self) -> String {
        format!("{}:saturated", self.prefix)
    }

    /// Sentinel written after a full index rebuild; its absence means Valkey
    /// lost its data (flush, restart without persistence) and the reconciler
    /// must rebuild now rather than at its next period.
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
}

/// The tag of a concurrency key in Valkey key names: the first 128 bits of
/// its SHA-256, in hex. Keys are producers' strings of up to 1 KiB; the tag
/// is short, fixed-size and cannot hold a brace or a separator.
pub fn concurrency_tag(key: &str) -> String {
    let mut hex = crate::digest::sha256_hex(key.as_bytes());
    hex.truncate(32);
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_share_one_hash_tag() {
        let q = QueueName::parse("agents.high").expect("valid");
        let k = Keys::new("orch").queue(&q);
        for key in [
            &k.pending,
            &k.delayed,
            &k.active,
            &k.prio,
            &k.seq,
            &k.paused,
            &k.halted,
            &k.ckey,
            &k.held,
            &k.heldkeys,
            &k.base,
        ] {
            assert!(key.starts_with("orch:{q:agents.high}:"), "{key}");
        }
        assert_eq!(k.pending, "orch:{q:agents.high}:pending");
        let tag = concurrency_tag("https://github.com/a/b.git#main {x}");
        assert_eq!(tag.len(), 32);
        assert!(tag.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(tag, concurrency_tag("https://github.com/a/b.git#dev"));
    }
}
