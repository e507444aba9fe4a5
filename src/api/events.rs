//! `GET /v1/jobs/{id}/events`: the audit trail as JSON, or with
//! `Accept: text/event-stream` a live stream that ends once the job is
//! finished and every event was sent. `Last-Event-ID` resumes a stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;

use super::auth::Caller;
use super::error::{ApiError, Problem};
use super::jobs::{parse_job_id, EventList};
use super::ApiState;
use crate::app::App;
use crate::auth::Scope;
use crate::job::{JobEvent, JobId};

/// How often a stream looks for new events.
const POLL: Duration = Duration::from_millis(200);

/// The audit trail of a job.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(
        ("id" = String, Path, format = Uuid, description = "job id (UUID)"),
        ("Last-Event-ID" = Option<String>, Header, description = "with an event stream: resume after this event id"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "events in order; as text/event-stream when asked", body = EventList),
        (status = 400, description = "not a job id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the read scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn events(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let id = parse_job_id(path)?;
    // 404 for an unknown job, in both forms.
    state.app.job(id).await?;
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        let events = state.app.job_events(id, None).await?;
        return Ok(Json(EventList { events }).into_response());
    }
    let after = last_event_id(&headers)?;
    Ok(stream(state.app.clone(), id, after, true))
}

/// The `Last-Event-ID` a reconnecting client sends, if any.
pub(super) fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    match headers.get("last-event-id") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request("Last-Event-ID must be an event id").field("Last-Event-ID")
            }),
    }
}

/// A job's events after `after` as a live stream that ends once the job
/// finished and all were sent. `named` gives each SSE event its type as
/// the event name; otherwise the type is only in the data (what a browser's
/// `EventSource` wants, since it cannot listen for names it does not know).
pub(super) fn stream(app: App, job: JobId, after: Option<i64>, named: bool) -> Response {
    let feed = Feed {
        app,
        job,
        after,
        named,
        ready: VecDeque::new(),
        finished: false,
    };
    let stream = stream::unfold(feed, |mut feed| async move {
        feed.next().await.map(|e| (Ok::<_, Infallible>(e), feed))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

struct Feed {
    app: App,
    job: JobId,
    after: Option<i64>,
    named: bool,
    ready: VecDeque<JobEvent>,
    /// The job was seen finished: send what is left, then end.
    finished: bool,
}

impl Feed {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                self.after = Some(e.id);
                let data = serde_json::to_string(&e).unwrap_or_default();
                let event = Event::default().id(e.id.to_string()).data(data);
                return Some(if self.named {
                    event.event(e.kind.clone())
                } else {
                    event
                });
            }
            if self.finished {
                return None;
            }
            // Read the status before the events, so an event written just
            // before the job finished is never missed.
            let finished = match self.app.job(self.job).await {
                Ok(job) => job.status.is_terminal(),
                Err(err) => {
                    tracing::warn!(job.id = %self.job, error = %err, "event stream ended early");
                    return None;
                }
            };
            match self.app.job_events(self.job, self.after).await {
                Ok(events) => self.ready.extend(events),
                Err(err) => {
                    tracing::warn!(job.id = %self.job, error = %err, "event stream ended early");
                    return None;
                }
            }
            self.finished = finished;
            if self.ready.is_empty() && !finished {
                tokio::time::sleep(POLL).await;
            }
        }
    }
}
