//! `/v1/killswitch`: engage (kill all), inspect, lift. Admin only, and
//! answered from Valkey, so that it works while Postgres is down.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::body::JsonBody;
use super::error::{ApiError, Problem};
use super::jobs::valid_reason;
use super::ApiState;
use crate::app::{KillReport, KillSwitchStatus, ResumeReport};
use crate::auth::Scope;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    /// Why; recorded in the audit trail (1-1000 characters).
    pub reason: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ResumeParams {
    /// Why; recorded in the audit trail (1-1000 characters; optional).
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ControlEventView {
    #[schema(format = Uuid)]
    pub id: String,
    /// `kill_all` or `resume`.
    #[serde(rename = "type")]
    pub kind: String,
    pub actor: String,
    pub reason: String,
    /// RFC 3339: when it happened.
    pub at: String,
    /// RFC 3339: when Postgres got it (later, if it was down then).
    pub recorded_at: String,
    pub data: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ControlEventList {
    pub events: Vec<ControlEventView>,
}

/// Whether the kill switch is engaged, by whom, why and since when (admin).
#[utoipa::path(get, path = "/v1/killswitch", tag = "killswitch", security(("bearer" = [])),
    responses(
        (status = 200, body = KillSwitchStatus),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Valkey is unreachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<KillSwitchStatus>, ApiError> {
    caller.require(Scope::Admin)?;
    let engaged = state.app.kill_switch().await?;
    Ok(Json(KillSwitchStatus::from_state(engaged.as_ref())))
}

/// Kill all (admin): pause every queue and cancel every running job on
/// every worker; waits for the workers to confirm each stop. Queued jobs stay
/// queued and enqueues are still accepted.
#[utoipa::path(post, path = "/v1/killswitch", tag = "killswitch", request_body = KillRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "engaged; what became of each running job", body = KillReport),
        (status = 400, description = "malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "reason missing, too long or with control characters", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Valkey is unreachable: nothing was engaged", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn engage(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<KillRequest>,
) -> Result<Json<KillReport>, ApiError> {
    caller.require(Scope::Admin)?;
    let reason = valid_reason(&body.reason)?.to_owned();
    let app = state.app.clone();
    // Its own task: a client that hangs up must not cut a kill-all short.
    let report = tokio::spawn(async move { app.kill_all(&caller.name, &reason).await })
        .await
        .map_err(task_failed)??;
    Ok(Json(report))
}

pub(super) fn task_failed(err: tokio::task::JoinError) -> ApiError {
    tracing::error!(error = %err, "kill switch task failed");
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "the kill switch task failed; see the server log",
    )
}

/// Lift the kill switch (admin): the queues it paused run again.
#[utoipa::path(delete, path = "/v1/killswitch", tag = "killswitch", params(ResumeParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "lifted (or was not engaged)", body = ResumeReport),
        (status = 400, description = "malformed query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "reason too long or with control characters", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Valkey is unreachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn lift(
    State(state): State<ApiState>,
    caller: Caller,
    params: Result<Query<ResumeParams>, QueryRejection>,
) -> Result<Json<ResumeReport>, ApiError> {
    caller.require(Scope::Admin)?;
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let reason = match p.reason.as_deref() {
        Some(raw) => valid_reason(raw)?,
        None => "no reason given",
    }
    .to_owned();
    let app = state.app.clone();
    let report = tokio::spawn(async move { app.resume(&caller.name, &reason).await })
        .await
        .map_err(task_failed)??;
    Ok(Json(report))
}

/// The kill switch's audit trail, newest first (admin).
#[utoipa::path(get, path = "/v1/killswitch/events", tag = "killswitch", security(("bearer" = [])),
    responses(
        (status = 200, body = ControlEventList),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn events(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<ControlEventList>, ApiError> {
    caller.require(Scope::Admin)?;
    let rows = state.app.control_events(100).await?;
    Ok(Json(ControlEventList {
        events: rows
            .into_iter()
            .map(|r| ControlEventView {
                id: r.id.to_string(),
                kind: r.kind,
                actor: r.actor,
                reason: r.reason,
                at: r.at.to_rfc3339(),
                recorded_at: r.written_at.to_rfc3339(),
                data: r.data,
            })
            .collect(),
    }))
}
