//! `/v1/queues`: depth by state and priority, pause and resume.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, Problem};
use super::ApiState;
use crate::app::QueueInfo;
use crate::auth::Scope;
use crate::job::QueueName;

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueInfo>,
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
    let queues = state.app.queues().await?;
    Ok(Json(QueueList { queues }))
}

pub(super) fn parse_queue(
    path: Result<Path<String>, PathRejection>,
) -> Result<QueueName, ApiError> {
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
    Ok(Json(
        state.app.set_paused(&queue, paused, &caller.name).await?,
    ))
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
