//! `/v1/schedules`: cron schedules that enqueue a job every tick. Writing
//! one needs the admin scope (it enqueues jobs for as long as it lives);
//! reading needs `read`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::body::JsonBody;
use super::error::{ApiError, Problem};
use super::ApiState;
use crate::auth::Scope;
use crate::job::{Schedule, ScheduleId, ScheduleRequest};

#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<Schedule>,
}

fn parse_id(path: Result<Path<String>, PathRejection>) -> Result<ScheduleId, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    raw.parse().map(ScheduleId).map_err(|_| {
        ApiError::bad_request(format!("{raw:?} is not a schedule id (a UUID)")).field("id")
    })
}

/// Create a schedule (admin).
#[utoipa::path(post, path = "/v1/schedules", tag = "schedules", request_body = ScheduleRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, body = Schedule),
        (status = 400, description = "malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a schedule of that name exists", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid (`job.<field>` for the job template)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<ScheduleRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let schedule = state.app.create_schedule(body, &caller.name).await?;
    Ok((StatusCode::CREATED, Json(schedule)).into_response())
}

/// Every schedule, by name.
#[utoipa::path(get, path = "/v1/schedules", tag = "schedules", security(("bearer" = [])),
    responses(
        (status = 200, body = ScheduleList),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the read scope", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<ScheduleList>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(ScheduleList {
        schedules: state.app.schedules().await?,
    }))
}

/// One schedule.
#[utoipa::path(get, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path, format = Uuid, description = "schedule id")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Schedule),
        (status = 400, description = "not a schedule id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the read scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such schedule", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Schedule>, ApiError> {
    caller.require(Scope::Read)?;
    let id = parse_id(path)?;
    Ok(Json(state.app.schedule(id).await?))
}

/// Change a schedule (admin): the fields given replace its own, and the
/// whole is checked again. A new cron or time zone, or `paused: false`,
/// starts from the next tick after now.
#[utoipa::path(patch, path = "/v1/schedules/{id}", tag = "schedules", request_body = ScheduleRequest,
    params(("id" = String, Path, format = Uuid, description = "schedule id")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Schedule),
        (status = 400, description = "malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such schedule", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "another schedule has that name", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn edit(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ScheduleRequest>,
) -> Result<Json<Schedule>, ApiError> {
    caller.require(Scope::Admin)?;
    let id = parse_id(path)?;
    Ok(Json(
        state.app.update_schedule(id, body, &caller.name).await?,
    ))
}

/// Delete a schedule (admin); the jobs it enqueued stay.
#[utoipa::path(delete, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path, format = Uuid, description = "schedule id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "deleted"),
        (status = 400, description = "not a schedule id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such schedule", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    let id = parse_id(path)?;
    state.app.delete_schedule(id).await?;
    Ok(StatusCode::NO_CONTENT)
}
