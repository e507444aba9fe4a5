//! The HTTP API (axum): jobs, queues, health, metrics, OpenAPI.
//!
//! Every error is `application/problem+json`; every `/v1` route needs a
//! bearer token with the right scope (see [`auth`]).

mod auth;
mod body;
mod error;
mod events;
mod health;
mod jobs;
mod killswitch;
pub mod openapi;
mod queues;
mod schedules;
mod ui;
mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::app::App;
use crate::metrics as m;
pub use auth::Tokens;
pub use error::{ApiError, Problem};

#[derive(Clone)]
pub struct ApiState {
    pub app: App,
    pub metrics: Arc<PrometheusHandle>,
    pub tokens: Tokens,
    pub body_limit: usize,
    pub metrics_public: bool,
    /// Workers run in this process: `/readyz` needs a sandbox runtime.
    pub runs_agents: bool,
}

impl ApiState {
    pub fn new(app: App, metrics: PrometheusHandle) -> Self {
        let state = Self::quiet(app, metrics);
        if state.tokens.is_empty() {
            tracing::warn!("no API tokens configured: every /v1 request will get 401; set ORCH_ADMIN_TOKEN or [[api.tokens]]");
        }
        state
    }

    /// For a worker's `/metrics`, `/healthz` and `/readyz` (no `/v1`, so
    /// no warning about tokens; `/metrics` still honours them).
    /// `runs_agents`: the worker claims jobs, so `/readyz` needs a sandbox
    /// runtime.
    pub fn for_observability(app: App, metrics: PrometheusHandle, runs_agents: bool) -> Self {
        let mut state = Self::quiet(app, metrics);
        state.runs_agents = runs_agents;
        state
    }

    fn quiet(app: App, metrics: PrometheusHandle) -> Self {
        let tokens = Tokens::from_settings(app.settings());
        ApiState {
            body_limit: app.settings().api.body_limit_bytes,
            metrics_public: app.settings().api.metrics_public,
            runs_agents: false,
            tokens,
            metrics: Arc::new(metrics),
            app,
        }
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/batch", post(jobs::create_batch))
        .route("/v1/jobs/{id}", get(jobs::get).patch(jobs::edit))
        .route("/v1/jobs/{id}/events", get(events::events))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/v1/jobs/{id}/deliveries", get(webhooks::deliveries))
        .route(
            "/v1/jobs/{id}/deliveries/{delivery}/redeliver",
            post(webhooks::redeliver),
        )
        .route(
            "/v1/schedules",
            post(schedules::create).get(schedules::list),
        )
        .route(
            "/v1/schedules/{id}",
            get(schedules::get)
                .patch(schedules::edit)
                .delete(schedules::delete),
        )
        .route("/v1/webhooks", post(webhooks::create).get(webhooks::list))
        .route("/v1/webhooks/{id}", axum::routing::delete(webhooks::delete))
        .route(
            "/v1/killswitch",
            get(killswitch::get)
                .post(killswitch::engage)
                .delete(killswitch::lift),
        )
        .route("/v1/killswitch/events", get(killswitch::events))
        .route("/v1/queues", get(queues::list))
        .route("/v1/queues/{name}/pause", post(queues::pause))
        .route("/v1/queues/{name}/resume", post(queues::resume))
        .route("/v1/openapi.json", get(openapi_json))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .merge(ui::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// What a process without the API serves (`orchestrator worker` on
/// `metrics_addr`): `/metrics`, `/healthz` and `/readyz` only.
pub fn observability_router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
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

#[derive(Debug, thiserror::Error)]
pub enum ObservabilityError {
    #[error("installing the metrics recorder: {0}")]
    Metrics(#[source] metrics_exporter_prometheus::BuildError),
    #[error("cannot listen on {addr} (set ORCH_METRICS_ADDR): {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a worker process serves on the settings' `metrics_addr`:
/// `/metrics`, `/healthz` and `/readyz`, in a task of their own until
/// `stop` fires. `None` when `metrics_addr` is `off`. An address in use is
/// an error naming the variable: a worker nobody can scrape or probe should
/// not pass for a healthy one. `runs_agents`: the
/// process runs sandboxes, so `/readyz` needs a sandbox runtime.
pub async fn spawn_observability(
    app: &App,
    stop: CancellationToken,
    runs_agents: bool,
) -> Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>, ObservabilityError> {
    let addr = app.settings().metrics_addr.clone();
    if addr.trim().eq_ignore_ascii_case("off") {
        tracing::warn!("metrics_addr = off: this worker serves no /metrics, /healthz or /readyz");
        return Ok(None);
    }
    let handle = m::install().map_err(ObservabilityError::Metrics)?;
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| ObservabilityError::Listen {
            addr: addr.clone(),
            source,
        })?;
    if let Ok(local) = listener.local_addr() {
        tracing::info!(addr = %local, "metrics, health and readiness listening");
    }
    let state = ApiState::for_observability(app.clone(), handle, runs_agents);
    Ok(Some(tokio::spawn(serve(
        listener,
        observability_router(state),
        stop,
    ))))
}

async fn openapi_json() -> impl IntoResponse {
    Json(openapi::ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; GET /v1/openapi.json lists them")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this endpoint does not accept that method",
    )
}

/// Counts and times every request by matched route (bounded label values),
/// inside a span that names the route, never the token or the body.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    // A client may invent methods: those share one label value.
    let method = match *req.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::HEAD
        | Method::OPTIONS => req.method().as_str().to_owned(),
        _ => "other".to_owned(),
    };
    let started = Instant::now();
    let span = tracing::info_span!("http", method = %method, route = %route);
    let response = tracing::Instrument::instrument(next.run(req), span).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(m::HTTP_REQUESTS, "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(m::HTTP_REQUEST_SECONDS, "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
