//! The dashboard's actions: each a form post that needs the session's CSRF
//! token and the same scope as its `/v1` twin, does what the API does
//! through the same `App` operation (so the audit trail names the token),
//! and redirects back to the page it came from.

use axum::extract::rejection::{FormRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use super::super::error::ApiError;
use super::super::jobs::{parse_job_id, valid_reason};
use super::super::killswitch::task_failed;
use super::super::queues::parse_queue;
use super::super::ApiState;
use super::session::Session;
use super::{OrUi, UiError};
use crate::auth::Scope;

/// What a person types to confirm kill-all.
pub const KILL_CONFIRMATION: &str = "kill all";

#[derive(Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    confirm: String,
}

/// The checks every action starts with: a well-formed form, a request from
/// this site with this session's CSRF token, and the scope.
fn admit(
    session: &Session,
    headers: &HeaderMap,
    form: Result<Form<ActionForm>, FormRejection>,
    scope: Scope,
) -> Result<ActionForm, UiError> {
    let form = form.map(|Form(f)| f);
    if let Err(e) = &form {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Err(UiError::new(
                headers,
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the form is larger than the dashboard accepts (16 KiB)",
                ),
            ));
        }
    }
    // The CSRF check comes before the form's content is looked at, so a
    // forged post learns nothing about it.
    session.check(
        headers,
        form.as_ref().map(|f| f.csrf.as_str()).unwrap_or(""),
    )?;
    let form = form
        .map_err(|e| ApiError::bad_request(e.body_text()))
        .or_ui(headers)?;
    session.caller.require(scope).or_ui(headers)?;
    Ok(form)
}

fn back_to(location: &str) -> Response {
    let location = HeaderValue::from_str(location).unwrap_or(HeaderValue::from_static("/ui/"));
    (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
}

pub async fn cancel(
    State(state): State<ApiState>,
    session: Session,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, UiError> {
    let form = admit(&session, &headers, form, Scope::Cancel)?;
    let id = parse_job_id(path).or_ui(&headers)?;
    let reason = valid_reason(&form.reason).or_ui(&headers)?;
    state
        .app
        .cancel(id, &session.caller.name, reason)
        .await
        .or_ui(&headers)?;
    Ok(back_to(&format!("/ui/jobs/{id}")))
}

pub async fn retry(
    State(state): State<ApiState>,
    session: Session,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, UiError> {
    admit(&session, &headers, form, Scope::Admin)?;
    let id = parse_job_id(path).or_ui(&headers)?;
    state
        .app
        .retry_dead(id, &session.caller.name)
        .await
        .or_ui(&headers)?;
    Ok(back_to(&format!("/ui/jobs/{id}")))
}

pub async fn pause(
    state: State<ApiState>,
    session: Session,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, UiError> {
    set_paused(state, session, headers, path, form, true).await
}

pub async fn resume(
    state: State<ApiState>,
    session: Session,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, UiError> {
    set_paused(state, session, headers, path, form, false).await
}

async fn set_paused(
    State(state): State<ApiState>,
    session: Session,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    form: Result<Form<ActionForm>, FormRejection>,
    paused: bool,
) -> Result<Response, UiError> {
    admit(&session, &headers, form, Scope::Admin)?;
    let queue = parse_queue(path).or_ui(&headers)?;
    state
        .app
        .set_paused(&queue, paused, &session.caller.name)
        .await
        .or_ui(&headers)?;
    Ok(back_to("/ui/"))
}

pub async fn kill_all(
    State(state): State<ApiState>,
    session: Session,
    headers: HeaderMap,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, UiError> {
    let form = admit(&session, &headers, form, Scope::Admin)?;
    if form.confirm.trim() != KILL_CONFIRMATION {
        return Err(UiError::new(
            &headers,
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("type {KILL_CONFIRMATION:?} to confirm kill-all"),
            )
            .field("confirm"),
        ));
    }
    let reason = valid_reason(&form.reason).or_ui(&headers)?.to_owned();
    let app = state.app.clone();
    let actor = session.caller.name.clone();
    // Its own task, as in the API: a browser that goes away must not cut a
    // kill-all short.
    tokio::spawn(async move { app.kill_all(&actor, &reason).await })
        .await
        .map_err(task_failed)
        .or_ui(&headers)?
        .or_ui(&headers)?;
    Ok(back_to("/ui/"))
}

pub async fn lift(
    State(state): State<ApiState>,
    session: Session,
    headers: HeaderMap,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, UiError> {
    let form = admit(&session, &headers, form, Scope::Admin)?;
    let reason = valid_reason(&form.reason).or_ui(&headers)?.to_owned();
    let app = state.app.clone();
    let actor = session.caller.name.clone();
    // Its own task, like kill-all: a resume half done would leave some
    // queues halted.
    tokio::spawn(async move { app.resume(&actor, &reason).await })
        .await
        .map_err(task_failed)
        .or_ui(&headers)?
        .or_ui(&headers)?;
    Ok(back_to("/ui/"))
}
