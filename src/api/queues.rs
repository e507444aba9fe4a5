//! `/v1/queues`: depth by state and priority, pause and resume.

use std::collections::BTreeMap;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, Problem};
use super::ApiState;
use crate::auth::Scope;
use crate::job::QueueName;

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

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueInfo>,
}

async fn info(
    state: &ApiState,
    queue: &QueueName,
    counts: BTreeMap<String, i64>,
) -> Result<QueueInfo, ApiError> {
    let depth = state.app.queue.depth(queue).await?;
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

/// Every known queue.
#[utoipa::path(get, path = "/v1/queues", tag = "queues", security(("bearer" = [])),
    responses(
        (status = 200, body = QueueList),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the read scope", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<QueueList>, ApiError> {
    caller.require(Scope::Read)?;
    let mut names: BTreeMap<String, BTreeMap<String, i64>> = state
        .app
        .queue
        .known_queues()
        .await?
        .into_iter()
        .map(|q| (q.to_string(), BTreeMap::new()))
        .collect();
    for c in state.app.store.queue_counts().await? {
        names
            .entry(c.queue)
            .or_default()
            .insert(c.status.to_string(), c.count);
    }
    let mut queues = Vec::with_capacity(names.len());
    for (name, counts) in names {
        if let Ok(queue) = QueueName::parse(name) {
            queues.push(info(&state, &queue, counts).await?);
        }
    }
    Ok(Json(QueueList { queues }))
}

fn parse_queue(path: Result<Path<String>, PathRejection>) -> Result<QueueName, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    QueueName::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()).field("name"))
}

async fn set_paused(
    state: ApiState,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    paused: bool,
) -> Result<Json<QueueInfo>, ApiError> {
    caller.require(Scope::Admin)?;
    let queue = parse_queue(path)?;
    state.app.queue.register_queues(&[&queue]).await?;
    state.app.queue.set_paused(&queue, paused).await?;
    tracing::info!(queue = %queue, actor = %caller.name, paused, "queue pause state set");
    info(&state, &queue, BTreeMap::new()).await.map(Json)
}

/// Stop handing out this queue's jobs (admin). Jobs wait; nothing is lost.
#[utoipa::path(post, path = "/v1/queues/{name}/pause", tag = "queues",
    params(("name" = String, Path, description = "queue name")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = QueueInfo),
        (status = 400, description = "not a valid queue name", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn pause(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<QueueInfo>, ApiError> {
    set_paused(state, caller, path, true).await
}

/// Hand out this queue's jobs again (admin).
#[utoipa::path(post, path = "/v1/queues/{name}/resume", tag = "queues",
    params(("name" = String, Path, description = "queue name")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = QueueInfo),
        (status = 400, description = "not a valid queue name", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resume(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<QueueInfo>, ApiError> {
    set_paused(state, caller, path, false).await
}
