//! Health, readiness and Prometheus metrics.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::auth::authenticate;
use super::ApiState;

/// Process alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when Postgres and Valkey answer and the schema is current.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "ready"),
    (status = 503, description = "a dependency is not ready")
))]
pub async fn readyz(State(state): State<ApiState>) -> Response {
    let checks = state.app.readiness(state.runs_agents).await;
    let ready = checks.ready();
    // Agent jobs need their sandbox runtime; isolation fails closed, so a
    // worker without its Docker daemon is not ready.
    let sandbox = match &checks.sandbox {
        Ok(Some(name)) => json!(name),
        Ok(None) => json!("not needed: no workers in this process"),
        Err(e) => json!(e),
    };
    let show = |r: &Result<(), String>| match r {
        Ok(()) => json!("ok"),
        Err(e) => json!(e),
    };
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": {
            "postgres": show(&checks.postgres), "valkey": show(&checks.valkey), "migrations": show(&checks.migrations),
            "sandbox": sandbox,
        },
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Prometheus text format. Open unless `api.metrics_public` is false, then
/// any valid token may read it.
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, description = "Prometheus text exposition", content_type = "text/plain"),
    (status = 401, description = "a token is required", body = super::error::Problem, content_type = "application/problem+json")
))]
pub async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if !state.metrics_public {
        if let Err(unauthorized) = authenticate(&state.tokens, &headers) {
            return unauthorized.into_response();
        }
    }
    // Read at scrape time, within 250 ms: the kill switch's gauge (right in
    // a server that runs no workers, whose heartbeats would refresh it,
    // even if the CLI engaged the switch) and every queue's depth (so a
    // Prometheus scraping only the API sees every queue). What cannot be
    // read in time keeps its last value.
    let fresh = tokio::time::timeout(Duration::from_millis(250), async {
        let (switch, depths) =
            tokio::join!(state.app.kill_switch(), state.app.sample_queue_depths());
        switch.map(drop).and(depths)
    });
    if !matches!(fresh.await, Ok(Ok(()))) {
        tracing::debug!("cannot read the kill switch or queue depths for the metrics; they keep their last values");
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
