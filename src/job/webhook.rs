//! Webhook subscriptions and deliveries as the API shows them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{FieldError, JobKind, QueueName};
use crate::net::HttpUrl;

/// The events a webhook may report: a job's, and the kill switch's.
pub const WEBHOOK_EVENTS: [&str; 8] = [
    "started",
    "progress",
    "succeeded",
    "failed",
    "dead",
    "cancelled",
    "engaged",
    "lifted",
];

/// The job's own events among [`WEBHOOK_EVENTS`] (the rest are the kill
/// switch's): what a job's `callback_url` receives.
pub const JOB_WEBHOOK_EVENTS: &[&str] = WEBHOOK_EVENTS.split_at(6).0;

/// Most queues or kinds one subscription may name.
const MAX_FILTER: usize = 100;

/// `POST /v1/webhooks`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// An `http` or `https` URL (local and private addresses only with
    /// `webhooks.allow_local`).
    pub url: String,
    /// Which events: `started`, `progress`, `succeeded`, `failed` (a retry
    /// is scheduled), `dead`, `cancelled`, and the kill switch's `engaged`
    /// and `lifted`.
    pub events: Vec<String>,
    /// Only jobs of these queues (default: every queue).
    #[serde(default)]
    pub queues: Option<Vec<String>>,
    /// Only jobs of these kinds (default: every kind).
    #[serde(default)]
    pub kinds: Option<Vec<String>>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A checked subscription, ready to store.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub id: Uuid,
    pub url: HttpUrl,
    pub events: Vec<String>,
    pub queues: Option<Vec<String>>,
    pub kinds: Option<Vec<String>>,
    pub description: String,
    pub created_by: String,
}

impl WebhookRequest {
    /// Checks the form; the address policy is applied by the caller, which
    /// knows `webhooks.allow_local` (`allow_local` here).
    pub fn validate(self, actor: &str, allow_local: bool) -> Result<NewWebhook, FieldError> {
        let url = HttpUrl::parse(&self.url, allow_local).map_err(|e| FieldError::new("url", e))?;
        if self.events.is_empty() {
            return Err(FieldError::new(
                "events",
                format!("name at least one of {}", WEBHOOK_EVENTS.join(", ")),
            ));
        }
        let mut events = Vec::with_capacity(self.events.len());
        for e in self.events {
            if !WEBHOOK_EVENTS.contains(&e.as_str()) {
                return Err(FieldError::new(
                    "events",
                    format!("{e:?} is not one of {}", WEBHOOK_EVENTS.join(", ")),
                ));
            }
            if !events.contains(&e) {
                events.push(e);
            }
        }
        let queues = self
            .queues
            .map(|q| {
                names("queues", q, |n| {
                    QueueName::parse(n).map(|q| q.as_str().to_owned())
                })
            })
            .transpose()?;
        let kinds = self
            .kinds
            .map(|k| {
                names("kinds", k, |n| {
                    JobKind::parse(n).map(|k| k.as_str().to_owned())
                })
            })
            .transpose()?;
        let description = self.description.unwrap_or_default();
        if description.chars().count() > 500 || description.chars().any(char::is_control) {
            return Err(FieldError::new(
                "description",
                "must be at most 500 characters, without control characters",
            ));
        }
        Ok(NewWebhook {
            id: Uuid::now_v7(),
            url,
            events,
            queues,
            kinds,
            description,
            created_by: actor.to_owned(),
        })
    }
}

fn names<E: std::fmt::Display>(
    field: &str,
    list: Vec<String>,
    parse: impl Fn(String) -> Result<String, E>,
) -> Result<Vec<String>, FieldError> {
    if list.is_empty() || list.len() > MAX_FILTER {
        return Err(FieldError::new(
            field,
            format!("must list 1 to {MAX_FILTER} names, or be left out for all"),
        ));
    }
    list.into_iter()
        .map(|n| parse(n).map_err(|e| FieldError::new(field, e.to_string())))
        .collect()
}

/// A stored subscription.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Webhook {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub queues: Option<Vec<String>>,
    pub kinds: Option<Vec<String>>,
    pub description: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// One outbox row: an event for one URL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Delivery {
    pub id: i64,
    /// The `webhook-id` header: the same for every attempt and redelivery.
    pub message_id: String,
    /// The subscription; absent for the job's own `callback_url`.
    pub webhook_id: Option<Uuid>,
    pub event: String,
    pub url: String,
    /// `pending`, `sending`, `delivered`, `dead` or `dropped`.
    pub state: String,
    pub attempts: u32,
    pub next_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// The message as sent (null until its first attempt).
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
    pub attempt_log: Vec<DeliveryAttempt>,
}

/// One try of a delivery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct DeliveryAttempt {
    pub attempt: u32,
    pub at: DateTime<Utc>,
    pub duration_ms: u32,
    /// The HTTP status; absent when none came back.
    pub status: Option<u16>,
    pub error: Option<String>,
    /// At most 1 KiB of the answer.
    pub response: Option<String>,
}

/// The `webhook-id` of an outbox row's message id.
pub fn message_id(id: Uuid) -> String {
    format!("msg_{}", id.simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(url: &str, events: &[&str]) -> WebhookRequest {
        WebhookRequest {
            url: url.into(),
            events: events.iter().map(|e| (*e).to_owned()).collect(),
            queues: None,
            kinds: None,
            description: None,
        }
    }

    #[test]
    fn subscriptions_are_checked_field_by_field() {
        let ok = request("https://example.com/hook", &["started", "started", "dead"])
            .validate("admin", false)
            .expect("valid");
        assert_eq!(ok.events, ["started", "dead"]);
        for (req, field) in [
            (request("http://127.0.0.1/", &["started"]), "url"),
            (request("https://example.com/", &[]), "events"),
            (request("https://example.com/", &["finished"]), "events"),
            (
                WebhookRequest {
                    queues: Some(vec!["bad queue!".into()]),
                    ..request("https://example.com/", &["started"])
                },
                "queues",
            ),
            (
                WebhookRequest {
                    kinds: Some(vec![]),
                    ..request("https://example.com/", &["started"])
                },
                "kinds",
            ),
            (
                WebhookRequest {
                    description: Some("a\u{0}b".into()),
                    ..request("https://example.com/", &["started"])
                },
                "description",
            ),
        ] {
            let err = req.validate("admin", false).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        assert!(request("http://127.0.0.1:9/", &["lifted"])
            .validate("admin", true)
            .is_ok());
    }
}
