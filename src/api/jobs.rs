//! `/v1/jobs`: enqueue, read, list, audit trail, cancel, retry.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::body::JsonBody;
use super::error::{ApiError, Problem};
use super::ApiState;
use crate::auth::Scope;
use crate::job::JobFilter;
use crate::job::{
    validate_idempotency_key, Job, JobEvent, JobId, JobKind, JobPatch, JobRequest, NewJob,
    QueueName, Status,
};

/// Most jobs in one batch request.
pub const MAX_BATCH: usize = 1000;
/// Most jobs in one page of a listing.
pub const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 50;
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Up to 1000 jobs; all are valid or none is enqueued.
    pub jobs: Vec<JobRequest>,
}

/// What `POST /v1/jobs/batch` answers: the jobs in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchList {
    pub jobs: Vec<BatchJob>,
}

/// A job of a batch, and why it was not created if it already existed.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchJob {
    #[serde(flatten)]
    pub job: Job,
    /// `idempotency_key` or `unique` when this is an existing job (as the
    /// `Orchestrator-Duplicate` header of `POST /v1/jobs`); absent when the
    /// batch created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<&'static str>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    /// Newest first.
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub events: Vec<JobEvent>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// Why; recorded in the audit trail (1-1000 characters).
    pub reason: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// queued, scheduled, running, succeeded, dead or cancelled.
    pub status: Option<String>,
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// 1-1000, default 50.
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

pub(super) fn parse_job_id(path: Result<Path<String>, PathRejection>) -> Result<JobId, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("{raw:?} is not a job id (a UUID)")).field("id"))
}

/// The key from the `Idempotency-Key` header, reconciled with the body's.
fn idempotency_key(headers: &HeaderMap, request: &mut JobRequest) -> Result<(), ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(());
    };
    let header = value.to_str().map_err(|_| {
        ApiError::bad_request("the Idempotency-Key header must be printable ASCII")
            .field("Idempotency-Key")
    })?;
    let header = validate_idempotency_key(header)
        .map_err(|e| ApiError::invalid(e).field("Idempotency-Key"))?;
    match &request.idempotency_key {
        Some(body) if *body != header => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the Idempotency-Key header and the idempotency_key field differ; send one, or the same in both",
        )
        .field("idempotency_key")),
        _ => {
            request.idempotency_key = Some(header);
            Ok(())
        }
    }
}

/// What only the admin scope may ask for (YOLO: gates skipped or required
/// ones left out; pushing to an existing branch): 403 for other tokens,
/// naming the field and, in a batch, the job.
fn require_admin_where_needed(
    state: &ApiState,
    caller: &Caller,
    jobs: &[NewJob],
    batch: bool,
) -> Result<(), ApiError> {
    if caller.require(Scope::Admin).is_ok() {
        return Ok(());
    }
    for (index, job) in jobs.iter().enumerate() {
        if let Some((field, why)) = state.app.privileges(job).needs_admin.into_iter().next() {
            let mut err = ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{why} and needs the admin scope; token {:?} lacks it",
                    caller.name
                ),
            )
            .field(&field);
            err.index = batch.then_some(index);
            return Err(err);
        }
    }
    Ok(())
}

/// On a 200 from `POST /v1/jobs`: what made it return an existing job
/// (`idempotency_key` or `unique`).
pub const DUPLICATE_HEADER: &str = "orchestrator-duplicate";

/// Enqueue one job.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = JobRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "replays return the same job")),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "created", body = Job),
        (status = 200, description = "an idempotent replay, or a job holding its `unique` key: the existing job; the Orchestrator-Duplicate header says which", body = Job,
            headers(("Orchestrator-Duplicate" = String, description = "`idempotency_key` or `unique`"))),
        (status = 400, description = "malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the enqueue scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the idempotency key belongs to a different job", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(mut request): JsonBody<JobRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Enqueue)?;
    idempotency_key(&headers, &mut request)?;
    let jobs = state
        .app
        .validate(vec![request], &caller.name)
        .map_err(|e| {
            // One job: an index would only be noise.
            let mut e = ApiError::from(e);
            e.index = None;
            e
        })?;
    require_admin_where_needed(&state, &caller, &jobs, false)?;
    let requested_key = jobs.first().and_then(|j| j.idempotency_key.clone());
    let stored = state.app.enqueue(&jobs).await.map_err(|e| {
        let mut e = ApiError::from(e);
        e.index = None;
        e
    })?;
    let (job, created) = stored
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "nothing was stored"))?;
    if created {
        return Ok((StatusCode::CREATED, Json(job)).into_response());
    }
    let why = duplicate_reason(requested_key.as_deref(), &job);
    Ok((StatusCode::OK, [(DUPLICATE_HEADER, why)], Json(job)).into_response())
}

/// Why an enqueue returned an existing job: a replay of the idempotency
/// key it asked for, or else an existing job holding its `unique` key.
fn duplicate_reason(requested_key: Option<&str>, existing: &Job) -> &'static str {
    if requested_key.is_some() && requested_key == existing.idempotency_key.as_deref() {
        "idempotency_key"
    } else {
        "unique"
    }
}

/// Enqueue many jobs at once: all valid or none enqueued.
#[utoipa::path(post, path = "/v1/jobs/batch", tag = "jobs", request_body = BatchRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "the jobs, in request order; an existing one (a replay, a `unique` key's holder) says so in `duplicate`", body = BatchList),
        (status = 200, description = "every job existed already; each says why in `duplicate`", body = BatchList),
        (status = 400, description = "malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the enqueue scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "an idempotency key belongs to a different job", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a job is invalid; `index` says which", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_batch(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(batch): JsonBody<BatchRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Enqueue)?;
    if batch.jobs.is_empty() || batch.jobs.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "jobs must hold 1 to {MAX_BATCH} jobs, got {}",
                batch.jobs.len()
            ),
        )
        .field("jobs"));
    }
    let jobs = state.app.validate(batch.jobs, &caller.name)?;
    require_admin_where_needed(&state, &caller, &jobs, true)?;
    let stored = state.app.enqueue(&jobs).await?;
    let any_created = stored.iter().any(|(_, created)| *created);
    let jobs = stored
        .into_iter()
        .zip(&jobs)
        .map(|((job, created), asked)| {
            let duplicate =
                (!created).then(|| duplicate_reason(asked.idempotency_key.as_deref(), &job));
            BatchJob { job, duplicate }
        })
        .collect();
    // As for one job: 200 when the batch made nothing new.
    let status = if any_created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(BatchList { jobs })).into_response())
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, format = Uuid, description = "job id (UUID)")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Job),
        (status = 400, description = "not a job id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the read scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let id = parse_job_id(path)?;
    Ok(with_etag(state.app.job(id).await?))
}

/// A job as JSON with its version as a strong `ETag`.
fn with_etag(job: Job) -> Response {
    let etag = format!("\"{}\"", job.version);
    ([(header::ETAG, etag)], Json(job)).into_response()
}

/// The version an `If-Match` header names: `"<version>"`, as `ETag` gave it.
fn if_match(headers: &HeaderMap) -> Result<i64, ApiError> {
    let value = headers.get(header::IF_MATCH).ok_or_else(|| {
        ApiError::new(
            StatusCode::PRECONDITION_REQUIRED,
            "an edit needs If-Match: \"<version>\", the ETag of GET /v1/jobs/{id}",
        )
        .field("If-Match")
    })?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix('"')?.strip_suffix('"')?.parse::<i64>().ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "If-Match must be one version in quotes, as the ETag gave it (\"12\"); weak or \"*\" are not accepted",
            )
            .field("If-Match")
        })
}

/// Change a job that has not started (priority, run_at, max_attempts,
/// metadata), if it is still at the version `If-Match` names.
#[utoipa::path(patch, path = "/v1/jobs/{id}", tag = "jobs", request_body = JobPatch,
    params(
        ("id" = String, Path, format = Uuid, description = "job id (UUID)"),
        ("If-Match" = String, Header, description = "the job's ETag: \"<version>\""),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "edited; the new version is the ETag", body = Job),
        (status = 400, description = "not a job id, or a malformed If-Match", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the enqueue scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the job is running or finished, or has used the attempts asked for", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "the job is no longer at that version", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field out of range, or nothing to change", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn edit(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    JsonBody(patch): JsonBody<JobPatch>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Enqueue)?;
    let id = parse_job_id(path)?;
    let version = if_match(&headers)?;
    let edit = patch
        .validate(chrono::Utc::now())
        .map_err(ApiError::invalid)?;
    Ok(with_etag(
        state.app.edit_job(id, version, &edit, &caller.name).await?,
    ))
}

/// Jobs newest first, filtered, cursor-paginated.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, body = JobPage),
        (status = 400, description = "a bad filter or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the read scope", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<JobPage>, ApiError> {
    caller.require(Scope::Read)?;
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = job_filter(p)?;
    let limit = filter.limit;
    let jobs = state.app.jobs(&filter).await?;
    let next_cursor = (jobs.len() == limit as usize)
        .then(|| jobs.last().map(|j| j.id.to_string()))
        .flatten();
    Ok(Json(JobPage { jobs, next_cursor }))
}

/// A list's filter and page from its query, each bad part named.
pub(super) fn job_filter(p: ListParams) -> Result<JobFilter, ApiError> {
    let status = match p.status.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<Status>()
                .map_err(|e| ApiError::bad_request(e.to_string()).field("status"))?,
        ),
    };
    let limit = p.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}, got {limit}"
        ))
        .field("limit"));
    }
    let before = match p.cursor.as_deref() {
        None => None,
        Some(c) => Some(c.parse::<JobId>().map_err(|_| {
            ApiError::bad_request("cursor is not one this API returned; pass next_cursor as is")
                .field("cursor")
        })?),
    };
    // A filter that no valid name could match is a mistake worth naming (and
    // bytes such as NUL would be refused by Postgres).
    if let Some(q) = &p.queue {
        QueueName::parse(q.as_str())
            .map_err(|e| ApiError::bad_request(e.to_string()).field("queue"))?;
    }
    if let Some(k) = &p.kind {
        JobKind::parse(k.as_str())
            .map_err(|e| ApiError::bad_request(e.to_string()).field("kind"))?;
    }
    Ok(JobFilter {
        status,
        queue: p.queue,
        kind: p.kind,
        before,
        limit,
    })
}

/// Cancel a job. A queued or scheduled job is cancelled at once (200); a
/// running one is stopped by its worker shortly after (202).
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", request_body = CancelRequest,
    params(("id" = String, Path, format = Uuid, description = "job id (UUID)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "cancelled (or already cancelled)", body = Job),
        (status = 202, description = "running: its worker has been told to stop it", body = Job),
        (status = 400, description = "malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the cancel scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the job has already finished", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "reason missing or too long", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cancel(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<CancelRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    caller.require(Scope::Cancel)?;
    let id = parse_job_id(path)?;
    let reason = valid_reason(&body.reason)?;
    Ok(match state.app.cancel(id, &caller.name, reason).await? {
        crate::app::Cancel::Done(job) => (StatusCode::OK, Json(job)),
        crate::app::Cancel::Requested(job) => (StatusCode::ACCEPTED, Json(job)),
    })
}

/// A cancel, kill-all or resume reason, as [`crate::app::valid_reason`]
/// wants it; 422 otherwise.
pub(super) fn valid_reason(raw: &str) -> Result<&str, ApiError> {
    crate::app::valid_reason(raw)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()).field("reason"))
}

/// Put a dead job back in its queue with a fresh set of attempts (admin).
#[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = String, Path, format = Uuid, description = "job id (UUID)")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Job),
        (status = 400, description = "not a job id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks the admin scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the job is not dead", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn retry(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Job>, ApiError> {
    caller.require(Scope::Admin)?;
    let id = parse_job_id(path)?;
    Ok(Json(state.app.retry_dead(id, &caller.name).await?))
}
