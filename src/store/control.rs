//! Control events: the kill switch's part of the audit trail.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::job::JobId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlKind {
    KillAll,
    Resume,
}

impl ControlKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlKind::KillAll => "kill_all",
            ControlKind::Resume => "resume",
        }
    }
}

/// A kill-all or a resume, with the running jobs a kill-all asked to stop
/// (each job's own trail records its end: `cancelled`, with who asked, why,
/// and the stage it was in).
/// Serialized into the Valkey outbox while Postgres cannot take it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlEvent {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub kind: ControlKind,
    pub actor: String,
    pub reason: String,
    /// Running jobs asked to stop (kill-all); stored in `data.jobs`.
    #[serde(default)]
    pub jobs: Vec<JobId>,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// The columns a [`ControlRow`] is read from.
const CONTROL_COLUMNS: &str = "id, at, type, actor, reason, data, written_at";

/// A control event as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ControlRow {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub actor: String,
    pub reason: String,
    pub data: serde_json::Value,
    pub written_at: DateTime<Utc>,
}

impl Store {
    /// Writes a control event, once per id: returns false if it was
    /// already there (an outbox record retried).
    pub async fn record_control(&self, event: &ControlEvent) -> Result<bool, StoreError> {
        let mut data = match &event.data {
            serde_json::Value::Object(map) => map.clone(),
            _ => serde_json::Map::new(),
        };
        if !event.jobs.is_empty() {
            data.insert("jobs".into(), serde_json::json!(event.jobs));
        }
        let inserted: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO control_events (id, at, type, actor, reason, data)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO NOTHING
             RETURNING id",
        )
        .bind(event.id)
        .bind(event.at)
        .bind(event.kind.as_str())
        .bind(&event.actor)
        .bind(&event.reason)
        .bind(serde_json::Value::Object(data))
        .fetch_optional(&self.pool)
        .await?;
        Ok(inserted.is_some())
    }

    /// The latest control events, newest first.
    pub async fn control_events(&self, limit: u32) -> Result<Vec<ControlRow>, StoreError> {
        let sql =
            format!("SELECT {CONTROL_COLUMNS} FROM control_events ORDER BY at DESC, id LIMIT $1");
        Ok(sqlx::query_as(&sql)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?)
    }

    /// One control event.
    pub async fn control_event(&self, id: Uuid) -> Result<Option<ControlRow>, StoreError> {
        let sql = format!("SELECT {CONTROL_COLUMNS} FROM control_events WHERE id = $1");
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The latest control event, if any.
    pub async fn latest_control_event(&self) -> Result<Option<ControlRow>, StoreError> {
        let sql = format!(
            "SELECT {CONTROL_COLUMNS} FROM control_events ORDER BY at DESC, id DESC LIMIT 1"
        );
        Ok(sqlx::query_as(&sql).fetch_optional(&self.pool).await?)
    }

    /// Every running job of `queues` (this deployment's; `None`: of any
    /// queue), in id order.
    pub async fn running_jobs(
        &self,
        queues: Option<&[String]>,
    ) -> Result<Vec<(JobId, String)>, StoreError> {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, queue FROM jobs
             WHERE finished_at IS NULL AND status = 'running'
               AND ($1::text[] IS NULL OR queue = ANY($1))
             ORDER BY id",
        )
        .bind(queues)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id, q)| (JobId(id), q)).collect())
    }
}
