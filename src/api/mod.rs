//! The HTTP interface (axum): health, readiness and Prometheus metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;

#[derive(Clone)]
pub struct ApiState {
    pub app: App,
    pub metrics: Arc<PrometheusHandle>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves until `stop` fires; bind first (port 0 works in tests).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when Postgres and Valkey answer and the schema is current.
async fn readyz(State(state): State<ApiState>) -> Response {
    let postgres = state.app.store.ping().await.map_err(|e| e.to_string());
    let valkey = state.app.queue.ping().await.map_err(|e| e.to_string());
    let migrations = state.app.ensure_migrated().await.map_err(|e| e.to_string());
    let ready = postgres.is_ok() && valkey.is_ok() && migrations.is_ok();
    let show = |r: &Result<(), String>| match r {
        Ok(()) => json!("ok"),
        Err(e) => json!(e),
    };
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": { "postgres": show(&postgres), "valkey": show(&valkey), "migrations": show(&migrations) },
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
