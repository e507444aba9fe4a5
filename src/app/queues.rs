//! Queues: what is in them, and pausing them.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use serde::Serialize;
use utoipa::ToSchema;

use super::{App, AppError};
use crate::job::QueueName;

/// A queue's state: depth from Valkey, unfinished jobs from Postgres.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueInfo {
    pub name: String,
    pub paused: bool,
    /// Held by the kill switch (until `DELETE /v1/killswitch`).
    pub halted: bool,
    /// Waiting to run now (Valkey).
    pub pending: u64,
    /// Pending per priority, "1" (lowest) to "10" (highest).
    pub pending_by_priority: BTreeMap<String, u64>,
    /// Waiting for their time (Valkey).
    pub delayed: u64,
    /// Under a lease (Valkey).
    pub active: u64,
    /// Unfinished jobs per status, from Postgres (the truth).
    pub jobs: BTreeMap<String, i64>,
}

impl App {
    /// One queue's state, with `counts` (unfinished jobs per status).
    pub async fn queue_info(
        &self,
        queue: &QueueName,
        counts: BTreeMap<String, i64>,
    ) -> Result<QueueInfo, AppError> {
        let depth = self.queue.depth(queue).await?;
        Ok(QueueInfo {
            name: queue.to_string(),
            paused: depth.paused,
            halted: depth.halted,
            pending: depth.pending(),
            pending_by_priority: depth
                .pending_by_priority
                .iter()
                .enumerate()
                .map(|(i, n)| ((i + 1).to_string(), *n))
                .collect(),
            delayed: depth.delayed,
            active: depth.active,
            jobs: counts,
        })
    }

    /// Every known queue (Valkey's registry, and any Postgres has jobs
    /// for), by name.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>, AppError> {
        let mut names: BTreeMap<QueueName, BTreeMap<String, i64>> = self
            .queue
            .known_queues()
            .await?
            .into_iter()
            .map(|q| (q, BTreeMap::new()))
            .collect();
        for c in self.store.queue_counts().await? {
            names
                .entry(c.queue)
                .or_default()
                .insert(c.status.to_string(), c.count);
        }
        let mut queues = Vec::with_capacity(names.len());
        for (queue, counts) in names {
            queues.push(self.queue_info(&queue, counts).await?);
        }
        Ok(queues)
    }

    /// Sets `orchestrator_queue_depth` for every known queue from Valkey:
    /// at most once a second however often `/metrics` is asked, and one
    /// scrape at a time (a public `/metrics` must not multiply Valkey's
    /// work).
    pub async fn sample_queue_depths(&self) -> Result<(), AppError> {
        let Ok(mut last) = self.depth_sampled.try_lock() else {
            return Ok(());
        };
        if last.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1)) {
            return Ok(());
        }
        *last = Some(std::time::Instant::now());
        let queues = self.queue.known_queues().await?;
        // Side by side: the multiplexed connection pipelines them, so a
        // thousand queues cost a few round trips, not a thousand.
        let depths: Vec<_> = futures_util::stream::iter(queues)
            .map(|queue| {
                let valkey = self.queue.clone();
                async move {
                    let depth = valkey.depth(&queue).await;
                    (queue, depth)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        for (queue, depth) in depths {
            depth?.record(&queue);
        }
        Ok(())
    }

    /// Pauses or resumes a queue (registering it, so it is listed and held
    /// by a kill switch), on behalf of `actor`.
    pub async fn set_paused(
        &self,
        queue: &QueueName,
        paused: bool,
        actor: &str,
    ) -> Result<QueueInfo, AppError> {
        self.queue.register_queues(&[queue]).await?;
        self.queue.set_paused(queue, paused).await?;
        tracing::info!(queue = %queue, actor, paused, "queue pause state set");
        self.queue_info(queue, BTreeMap::new()).await
    }
}
