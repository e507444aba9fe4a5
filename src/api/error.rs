//! Errors as `application/problem+json` (RFC 9457): a status, a short title
//! and a detail a person can act on, plus the offending field when there is
//! one. Internal failures are logged with their cause and answered with a
//! generic message.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::{AppError, ErrorClass};
use crate::job::FieldError;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For batches: the index of the job at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
    pub field: Option<String>,
    pub index: Option<usize>,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
            field: None,
            index: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, detail)
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn invalid(error: FieldError) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, error.to_string()).field(error.field)
    }

    fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the server failed to process the request; it has been logged",
        )
    }

    /// A dependency is down: a retry later may succeed.
    fn unavailable(cause: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "dependency unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "a backing service (PostgreSQL or Valkey) is unavailable; retry later",
        )
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        match e.class() {
            ErrorClass::NotFound(id) => ApiError::not_found(format!("job {id} does not exist")),
            ErrorClass::Conflict(detail) => ApiError::conflict(detail),
            ErrorClass::PreconditionFailed(detail) => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, detail).field("If-Match")
            }
            ErrorClass::ConflictingField {
                index,
                field,
                detail,
            } => {
                let mut api = ApiError::conflict(detail).field(field);
                api.index = Some(index);
                api
            }
            ErrorClass::Invalid { index, error } => {
                let mut api = ApiError::invalid(error.clone());
                api.index = Some(index);
                api
            }
            ErrorClass::InvalidField(error) => ApiError::invalid(error.clone()),
            ErrorClass::Missing(detail) => ApiError::not_found(detail),
            ErrorClass::Unavailable => ApiError::unavailable(&e),
            ErrorClass::Internal => ApiError::internal(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error").to_owned();
        let slug = title.to_lowercase().replace(' ', "-");
        let body = Problem {
            kind: format!("https://orchestrator.dev/problems/{slug}"),
            title,
            status: self.status.as_u16(),
            detail: self.detail,
            field: self.field,
            index: self.index,
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            json,
        )
            .into_response()
    }
}
