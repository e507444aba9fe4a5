//! `/v1/webhooks` (admin): subscriptions. `/v1/jobs/{id}/deliveries`: what
//! was sent about a job, and `…/{delivery}/redeliver` to send one again.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Caller;
use super::body::JsonBody;
use super::error::{ApiError, Problem};
use super::jobs::parse_job_id;
use super::ApiState;
use crate::auth::Scope;
use crate::job::{Delivery, Webhook, WebhookRequest};

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<Webhook>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<Delivery>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    pub id: Uuid,
    /// Deliveries it still had to send, now dropped.
    pub dropped: u64,
}

/// Subscribe a URL to events (admin).
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = WebhookRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, body = Webhook),
        (status = 400, description = "malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid, the URL is local or private, or no webhook secret is configured", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<WebhookRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let hook = state.app.create_webhook(body, &caller.name).await?;
    Ok((StatusCode::CREATED, Json(hook)).into_response())
}

/// Every subscription (admin).
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", security(("bearer" = [])),
    responses(
        (status = 200, body = WebhookList),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<WebhookList>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(WebhookList {
        webhooks: state.app.webhooks().await?,
    }))
}

/// Unsubscribe (admin); what it still had to send is dropped.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, format = Uuid, description = "webhook id")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Deleted),
        (status = 400, description = "not a webhook id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such webhook", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Deleted>, ApiError> {
    caller.require(Scope::Admin)?;
    let Path(raw) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id: Uuid = raw.parse().map_err(|_| {
        ApiError::bad_request(format!("{raw:?} is not a webhook id (a UUID)")).field("id")
    })?;
    let dropped = state.app.delete_webhook(id, &caller.name).await?;
    Ok(Json(Deleted { id, dropped }))
}

/// A job's webhook deliveries in order, with every attempt.
#[utoipa::path(get, path = "/v1/jobs/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path, format = Uuid, description = "job id (UUID)")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = DeliveryList),
        (status = 400, description = "not a job id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the read scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn deliveries(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DeliveryList>, ApiError> {
    caller.require(Scope::Read)?;
    let id = parse_job_id(path)?;
    Ok(Json(DeliveryList {
        deliveries: state.app.deliveries(id).await?,
    }))
}

/// Send a delivered or dead delivery again, with the same `webhook-id`
/// (admin).
#[utoipa::path(post, path = "/v1/jobs/{id}/deliveries/{delivery}/redeliver", tag = "webhooks",
    params(
        ("id" = String, Path, format = Uuid, description = "job id (UUID)"),
        ("delivery" = i64, Path, description = "delivery id"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "due again now", body = Delivery),
        (status = 400, description = "not a job or delivery id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such delivery of this job", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "the delivery is still pending or being sent", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn redeliver(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let Path((job, delivery)) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = parse_job_id(Ok(Path(job)))?;
    let delivery: i64 = delivery.parse().ok().filter(|d| *d > 0).ok_or_else(|| {
        ApiError::bad_request(format!("{delivery:?} is not a delivery id")).field("delivery")
    })?;
    let redelivered = state.app.redeliver(id, delivery, &caller.name).await?;
    Ok((StatusCode::ACCEPTED, Json(redelivered)).into_response())
}
