//! Control in Valkey: the kill switch, halted queues, stop confirmations,
//! the audit outbox, and the listener for cancel and kill switch messages.
//!
//! The kill switch lives here first so that it works while Postgres is slow
//! or down; the audit records follow through the outbox.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{parse_id_str, QueueError, ValkeyQueue, CANCEL_FLAG_TTL_SECS};
use crate::job::{JobId, QueueName};

/// An engagement of the kill switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillSwitchState {
    /// The id of its audit record.
    pub id: Uuid,
    pub actor: String,
    pub reason: String,
    pub since: DateTime<Utc>,
}

impl KillSwitchState {
    fn from_fields(fields: &HashMap<String, String>) -> Result<Option<Self>, QueueError> {
        if fields.is_empty() {
            return Ok(None);
        }
        let get = |name: &str| {
            fields
                .get(name)
                .ok_or_else(|| QueueError::Protocol(format!("kill switch record without {name:?}")))
        };
        let id = get("id")?
            .parse()
            .map_err(|_| QueueError::Protocol("kill switch id is not a uuid".into()))?;
        let since = get("since_ms")?
            .parse::<i64>()
            .ok()
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .ok_or_else(|| QueueError::Protocol("kill switch since is not a time".into()))?;
        Ok(Some(KillSwitchState {
            id,
            actor: get("actor")?.clone(),
            reason: get("reason")?.clone(),
            since,
        }))
    }
}

/// A message on the control channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Stop this running job.
    Cancel(JobId),
    /// The kill switch was engaged or lifted: read its state.
    KillSwitch,
}

fn pairs_to_map(flat: Vec<String>) -> HashMap<String, String> {
    let mut map = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        map.insert(k, v);
    }
    map
}

impl ValkeyQueue {
    /// Engages the kill switch (the first engagement is kept) and signals
    /// every worker. Returns the engagement in force.
    pub async fn engage_kill_switch(
        &self,
        wanted: &KillSwitchState,
    ) -> Result<KillSwitchState, QueueError> {
        let mut conn = self.conn.clone();
        let args = [
            self.keys.control_channel(),
            wanted.id.to_string(),
            wanted.since.timestamp_millis().to_string(),
            wanted.actor.clone(),
            wanted.reason.clone(),
        ];
        let flat: Vec<String> = self
            .scripts
            .engage_kill_switch
            .call(&mut conn, &[&self.keys.kill_switch()], &args)
            .await?;
        KillSwitchState::from_fields(&pairs_to_map(flat))?
            .ok_or_else(|| QueueError::Protocol("kill switch not recorded".into()))
    }

    /// Lifts the kill switch and signals every worker; returns the
    /// engagement lifted, if there was one.
    pub async fn lift_kill_switch(&self) -> Result<Option<KillSwitchState>, QueueError> {
        let mut conn = self.conn.clone();
        let flat: Vec<String> = self
            .scripts
            .lift_kill_switch
            .call(
                &mut conn,
                &[&self.keys.kill_switch()],
                &[self.keys.control_channel()],
            )
            .await?;
        KillSwitchState::from_fields(&pairs_to_map(flat))
    }

    /// The engagement in force, if any.
    pub async fn kill_switch(&self) -> Result<Option<KillSwitchState>, QueueError> {
        let mut conn = self.conn.clone();
        let fields: HashMap<String, String> = conn.hgetall(self.keys.kill_switch()).await?;
        KillSwitchState::from_fields(&fields)
    }

    /// Holds (or releases) a queue for the kill switch; returns whether the
    /// state changed. Releasing wakes the queue's workers.
    pub async fn set_halted(&self, queue: &QueueName, halted: bool) -> Result<bool, QueueError> {
        let k = self.keys.queue(queue);
        self.set_queue_flag(&k.halted, &k.wake, halted).await
    }

    /// Every id of `queue` under a lease now.
    pub async fn active_ids(&self, queue: &QueueName) -> Result<Vec<JobId>, QueueError> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = conn.zrange(self.keys.queue(queue).active, 0, -1).await?;
        raw.iter().map(|s| parse_id_str(s)).collect()
    }

    /// Flags many running jobs for cancellation at once (pipelined).
    /// Returns the error of each id that could not be flagged.
    pub async fn request_cancels(
        &self,
        ids: &[JobId],
        actor: &str,
        reason: &str,
        requested: DateTime<Utc>,
    ) -> Vec<(JobId, QueueError)> {
        let requests = ids
            .iter()
            .map(|id| self.request_cancel_at(*id, actor, reason, requested));
        futures_util::future::join_all(requests)
            .await
            .into_iter()
            .zip(ids)
            .filter_map(|(r, id)| r.err().map(|e| (*id, e)))
            .collect()
    }

    /// Records that a cancelled job's sandbox and worktree are gone.
    pub async fn confirm_stopped(&self, id: JobId) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let now = Utc::now().timestamp_millis();
        let _: () = conn
            .set_ex(self.keys.stopped(&id), now, CANCEL_FLAG_TTL_SECS)
            .await?;
        Ok(())
    }

    /// For each of `ids`, when it was confirmed stopped (Unix ms), if it was.
    pub async fn stopped_at(&self, ids: &[JobId]) -> Result<Vec<Option<i64>>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let keys: Vec<String> = ids.iter().map(|id| self.keys.stopped(id)).collect();
        Ok(conn.mget(keys).await?)
    }

    /// Keeps an audit record Postgres could not take yet.
    pub async fn outbox_push(&self, record: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: () = conn.rpush(self.keys.outbox(), record).await?;
        Ok(())
    }

    /// The oldest `n` records waiting in the outbox.
    pub async fn outbox_peek(&self, n: usize) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn.clone();
        let last = isize::try_from(n).unwrap_or(isize::MAX) - 1;
        Ok(conn.lrange(self.keys.outbox(), 0, last).await?)
    }

    /// Moves a record Postgres refuses to the outbox's dead list, where an
    /// operator can read it (`LRANGE <prefix>:outbox:dead 0 -1`).
    pub async fn outbox_bury(&self, record: &str) -> Result<(), QueueError> {
        // Two commands, not a pipeline: in a cluster the two lists may live
        // in different slots. Dead first, so a crash between them leaves the
        // record in both lists (buried again later), never in neither.
        let mut conn = self.conn.clone();
        let _: () = conn.rpush(self.keys.outbox_dead(), record).await?;
        let _: () = conn.lrem(self.keys.outbox(), 1, record).await?;
        Ok(())
    }

    /// Drops a record once Postgres holds it.
    pub async fn outbox_remove(&self, record: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: () = conn.lrem(self.keys.outbox(), 1, record).await?;
        Ok(())
    }

    /// Cancel requests and kill switch changes, forwarded until the receiver
    /// drops; resubscribes after a lost connection (and then reports a
    /// `KillSwitch` change, since one may have been missed).
    pub fn control_listener(&self) -> mpsc::Receiver<Control> {
        let (tx, rx) = mpsc::channel(256);
        let nodes = self.subscribers.clone();
        let cancel = self.keys.cancel_channel();
        let control = self.keys.control_channel();
        tokio::spawn(async move {
            for attempt in 0.. {
                if let Ok(mut pubsub) = super::pubsub(&nodes, attempt).await {
                    if pubsub.subscribe(&[&cancel, &control]).await.is_ok() {
                        if tx.send(Control::KillSwitch).await.is_err() {
                            return;
                        }
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            let message = if msg.get_channel_name() == control {
                                Control::KillSwitch
                            } else {
                                let Ok(text) = msg.get_payload::<String>() else {
                                    continue;
                                };
                                let Ok(id) = text.parse::<JobId>() else {
                                    continue;
                                };
                                Control::Cancel(id)
                            };
                            if tx.send(message).await.is_err() {
                                return;
                            }
                        }
                    }
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
