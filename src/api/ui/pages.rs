//! The dashboard's pages, and the fragments its script fetches to keep
//! them live (the same markup, without the page around it).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::super::error::ApiError;
use super::super::events::{last_event_id, stream};
use super::super::jobs::{job_filter, parse_job_id, ListParams};
use super::super::ApiState;
use super::session::Session;
use super::{views, OrUi, UiError};
use crate::auth::Scope;
use crate::job::{Job, JobEvent, JobId};

/// Jobs per page of the list.
const PAGE: u32 = 50;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FragmentQuery {
    /// Only the live part of the page.
    #[serde(default)]
    fragment: Option<String>,
}

pub async fn overview(
    State(state): State<ApiState>,
    session: Session,
    headers: HeaderMap,
    query: Result<Query<FragmentQuery>, QueryRejection>,
) -> Result<Html<String>, UiError> {
    session.caller.require(Scope::Read).or_ui(&headers)?;
    let Query(q) = query
        .map_err(|e| ApiError::bad_request(e.body_text()))
        .or_ui(&headers)?;
    let overview = state.app.overview().await.or_ui(&headers)?;
    Ok(Html(
        if q.fragment.is_some() {
            views::overview_live(&overview, &session)
        } else {
            views::overview_page(&overview, &session)
        }
        .into_string(),
    ))
}

/// The list's query: filters (empty form fields mean "any"), a job id to
/// go to, and the cursor.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    #[serde(default)]
    pub queue: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub cursor: String,
    #[serde(default)]
    fragment: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

pub async fn jobs(
    State(state): State<ApiState>,
    session: Session,
    headers: HeaderMap,
    query: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Response, UiError> {
    session.caller.require(Scope::Read).or_ui(&headers)?;
    let Query(q) = query
        .map_err(|e| ApiError::bad_request(e.body_text()))
        .or_ui(&headers)?;
    if let Some(id) = non_empty(&q.id) {
        let id: JobId = id
            .parse()
            .map_err(|_| {
                ApiError::bad_request(format!("{id:?} is not a job id (a UUID)")).field("id")
            })
            .or_ui(&headers)?;
        // 404 here, rather than on the page it would lead to.
        state.app.job(id).await.or_ui(&headers)?;
        return Ok(Redirect::to(&format!("/ui/jobs/{id}")).into_response());
    }
    let filter = job_filter(ListParams {
        status: non_empty(&q.status),
        queue: non_empty(&q.queue),
        kind: non_empty(&q.kind),
        limit: Some(PAGE),
        cursor: non_empty(&q.cursor),
    })
    .or_ui(&headers)?;
    let jobs = state.app.jobs(&filter).await.or_ui(&headers)?;
    let next = (jobs.len() == PAGE as usize)
        .then(|| jobs.last().map(|j| j.id))
        .flatten();
    let markup = if q.fragment.is_some() {
        views::job_rows(&jobs)
    } else {
        let queues = state.app.queues().await.or_ui(&headers)?;
        let names: Vec<String> = queues.into_iter().map(|q| q.name).collect();
        views::jobs_page(&session, &q, &names, &jobs, next)
    };
    Ok(Html(markup.into_string()).into_response())
}

pub async fn job(
    state: State<ApiState>,
    session: Session,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Html<String>, UiError> {
    let (job, events) = job_with_events(state, &session, &headers, path).await?;
    Ok(Html(views::job_page(&session, &job, &events).into_string()))
}

pub async fn job_summary(
    state: State<ApiState>,
    session: Session,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Html<String>, UiError> {
    let (job, events) = job_with_events(state, &session, &headers, path).await?;
    Ok(Html(views::job_live(&session, &job, &events).into_string()))
}

/// What a job's page and its live part both show: the job and its trail.
async fn job_with_events(
    State(state): State<ApiState>,
    session: &Session,
    headers: &HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<(Job, Vec<JobEvent>), UiError> {
    session.caller.require(Scope::Read).or_ui(headers)?;
    let id = parse_job_id(path).or_ui(headers)?;
    let job = state.app.job(id).await.or_ui(headers)?;
    let events = state.app.job_events(id, None).await.or_ui(headers)?;
    Ok((job, events))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Events after this id (what the page already shows).
    #[serde(default)]
    after: Option<i64>,
}

/// The job's events as a live stream for the page's `EventSource`. The
/// log lines in it were redacted before they were stored.
pub async fn job_events(
    State(state): State<ApiState>,
    session: Session,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, UiError> {
    session.caller.require(Scope::Read).or_ui(&headers)?;
    let id = parse_job_id(path).or_ui(&headers)?;
    let Query(q) = query
        .map_err(|e| ApiError::bad_request(e.body_text()))
        .or_ui(&headers)?;
    state.app.job(id).await.or_ui(&headers)?;
    // A reconnecting EventSource says where it got to; that wins over the
    // id the page was rendered with.
    let after = last_event_id(&headers).or_ui(&headers)?.or(q.after);
    Ok(stream(state.app.clone(), id, after, false))
}
