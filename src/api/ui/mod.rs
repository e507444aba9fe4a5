//! The operators' dashboard at `/ui/`: server-rendered HTML (maud), one
//! stylesheet and one script embedded in the binary, no CDN, no build step.
//!
//! - [`session`]: token login, a session cookie, CSRF on every action;
//! - [`pages`]: the overview, the jobs list, a job, their live fragments;
//! - [`actions`]: cancel, retry, pause and resume, kill-all and resume;
//! - [`views`]: the markup, escaped by construction.
//!
//! Every response carries a strict Content-Security-Policy: scripts and
//! styles only from `/ui/assets/`, nothing inline, no frames, forms only to
//! this origin. The script never sees a token or the session cookie.

mod actions;
mod pages;
mod session;
mod views;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use super::error::ApiError;
use super::ApiState;

/// Forms carry a reason and a CSRF token: nothing needs more.
const FORM_LIMIT: usize = 16 * 1024;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(pages::overview))
        .route("/ui/login", get(session::login_page).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/jobs", get(pages::jobs))
        .route("/ui/jobs/{id}", get(pages::job))
        .route("/ui/jobs/{id}/summary", get(pages::job_summary))
        .route("/ui/jobs/{id}/events", get(pages::job_events))
        .route("/ui/jobs/{id}/cancel", post(actions::cancel))
        .route("/ui/jobs/{id}/retry", post(actions::retry))
        .route("/ui/queues/{name}/pause", post(actions::pause))
        .route("/ui/queues/{name}/resume", post(actions::resume))
        .route("/ui/killswitch", post(actions::kill_all))
        .route("/ui/killswitch/lift", post(actions::lift))
        .route("/ui/assets/app.js", get(app_js))
        .route("/ui/assets/app.css", get(app_css))
        .layer(DefaultBodyLimit::max(FORM_LIMIT))
        .layer(middleware::from_fn(security_headers))
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // Not `no-referrer`: with it, browsers send `Origin: null` on form
        // posts, and the same-origin check needs the real one.
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    // Pages show live state and who is logged in: never from a cache.
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn app_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", APP_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "private, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// An error on a dashboard route: an HTML page for a browser, the usual
/// `application/problem+json` for anything else.
pub struct UiError {
    error: ApiError,
    html: bool,
}

impl UiError {
    fn new(headers: &HeaderMap, error: impl Into<ApiError>) -> Self {
        UiError {
            error: error.into(),
            html: wants_html(headers),
        }
    }
}

/// Whether the client asked for HTML (a browser), not JSON.
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// Any error the API knows, answered as a dashboard error for this request.
trait OrUi<T> {
    fn or_ui(self, headers: &HeaderMap) -> Result<T, UiError>;
}

impl<T, E: Into<ApiError>> OrUi<T> for Result<T, E> {
    fn or_ui(self, headers: &HeaderMap) -> Result<T, UiError> {
        self.map_err(|e| UiError::new(headers, e))
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        if !self.html {
            return self.error.into_response();
        }
        let status = self.error.status;
        (
            status,
            Html(views::error_page(status, &self.error.detail).into_string()),
        )
            .into_response()
    }
}

/// Where a browser goes when it has no session.
fn to_login() -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/ui/login")]).into_response()
}
