//! The kill switch: stop everything at once, and lift it again.
//!
//! Valkey first, so that it works while Postgres is slow or down: the
//! engagement is recorded and signalled, every queue is halted, every
//! running job is flagged for cancellation; then the audit record goes to
//! Postgres, or to the Valkey outbox that maintenance drains once Postgres
//! answers. Workers stop their jobs on the signal (or their next heartbeat)
//! and confirm each stop in Valkey; kill-all waits for those confirmations.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{App, AppError};
use crate::job::{JobId, QueueName, Status};
use crate::queue::KillSwitchState;
use crate::store::{ControlEvent, ControlKind};

/// How long kill-all and resume give Postgres before leaving the audit
/// record to the outbox.
const POSTGRES_PATIENCE: Duration = Duration::from_secs(2);
/// How often stop confirmations are read while kill-all waits.
const CONFIRM_POLL: Duration = Duration::from_millis(100);

/// Whether the kill switch is engaged, and by whom, why, since when.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KillSwitchStatus {
    pub engaged: bool,
    /// The token name (or `cli`) that engaged it.
    pub actor: Option<String>,
    pub reason: Option<String>,
    /// RFC 3339.
    pub since: Option<String>,
}

impl KillSwitchStatus {
    pub fn from_state(state: Option<&KillSwitchState>) -> Self {
        KillSwitchStatus {
            engaged: state.is_some(),
            actor: state.map(|s| s.actor.clone()),
            reason: state.map(|s| s.reason.clone()),
            since: state.map(|s| s.since.to_rfc3339()),
        }
    }
}

/// What became of one running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KillOutcome {
    /// Its worker confirmed the sandbox and worktree gone.
    Cancelled,
    /// It finished on its own before the request reached it.
    Finished,
    /// Not confirmed stopped (see `error`).
    Failed,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KilledJob {
    #[schema(value_type = String, format = Uuid)]
    pub id: JobId,
    pub outcome: KillOutcome,
    pub error: Option<String>,
}

/// The answer to kill-all.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KillReport {
    #[serde(flatten)]
    pub status: KillSwitchStatus,
    /// Queues now held (nothing is claimed from them until resume).
    pub queues_paused: Vec<String>,
    /// Running jobs confirmed stopped.
    pub cancelled: usize,
    /// Running jobs that finished on their own first.
    pub finished: usize,
    /// Running jobs not confirmed stopped.
    pub failed: usize,
    pub jobs: Vec<KilledJob>,
    /// What went wrong beyond single jobs (Postgres unreachable, say).
    pub errors: Vec<String>,
    /// `recorded` in Postgres, or `pending` in the outbox until Postgres
    /// answers.
    pub audit: String,
}

/// The answer to resume.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResumeReport {
    #[serde(flatten)]
    pub status: KillSwitchStatus,
    /// The engagement lifted, if the switch was engaged.
    pub lifted: Option<KillSwitchStatus>,
    pub queues_resumed: Vec<String>,
    pub errors: Vec<String>,
    pub audit: String,
}

impl App {
    /// The kill switch as Valkey holds it.
    pub async fn kill_switch(&self) -> Result<Option<KillSwitchState>, AppError> {
        let state = self.queue.kill_switch().await?;
        crate::metrics::set_kill_switch(state.is_some());
        Ok(state)
    }

    /// Engages the kill switch: halts every queue, cancels every running
    /// job on every worker, and waits (up to the configured time) for each
    /// to be confirmed stopped. Queued jobs stay queued; enqueues go on.
    pub async fn kill_all(&self, actor: &str, reason: &str) -> Result<KillReport, AppError> {
        let now = Utc::now();
        let wanted = KillSwitchState {
            id: Uuid::now_v7(),
            actor: actor.to_owned(),
            reason: reason.to_owned(),
            since: now,
        };
        let engaged = self.queue.engage_kill_switch(&wanted).await?;
        crate::metrics::set_kill_switch(true);
        tracing::warn!(actor, reason, "KILL SWITCH ENGAGED");
        let mut errors = Vec::new();

        // From here on the switch is engaged: whatever fails is reported
        // (and the engagement audited), not returned early.
        let known = self.known_queues(&mut errors).await;
        let mut queues: BTreeSet<String> = BTreeSet::new();
        for queue in &known {
            match self.queue.set_halted(queue, true).await {
                Ok(_) => {
                    queues.insert(queue.to_string());
                }
                Err(err) => errors.push(format!("queue {queue}: cannot pause it: {err}")),
            }
        }

        // Running jobs: the index's leases (Valkey) are flagged first; then
        // Postgres, if it answers in time, names leases the index lost.
        let mut running: BTreeSet<JobId> = BTreeSet::new();
        for queue in &known {
            match self.queue.active_ids(queue).await {
                Ok(ids) => running.extend(ids),
                Err(err) => errors.push(format!(
                    "queue {queue}: cannot list its running jobs: {err}"
                )),
            }
        }
        let mut failed = self.flag(&running, actor, reason, now).await;
        // This deployment's queues; all of them if Valkey could name none.
        let names: Vec<String> = known.iter().map(|q| q.to_string()).collect();
        let scope = (!names.is_empty()).then_some(names.as_slice());
        match tokio::time::timeout(POSTGRES_PATIENCE, self.store.running_jobs(scope)).await {
            Ok(Ok(jobs)) => {
                let lost: BTreeSet<JobId> = jobs
                    .into_iter()
                    .map(|(id, _)| id)
                    .filter(|id| !running.contains(id))
                    .collect();
                failed.extend(self.flag(&lost, actor, reason, now).await);
                running.extend(lost);
            }
            Ok(Err(err)) => errors.push(format!(
                "Postgres: {err}; running jobs were found in Valkey alone"
            )),
            Err(_) => errors.push(format!(
                "Postgres did not answer within {}s; running jobs were found in Valkey alone",
                POSTGRES_PATIENCE.as_secs()
            )),
        }
        let ids: Vec<JobId> = running.into_iter().collect();

        let event = ControlEvent {
            // A repeated kill-all is its own event; the first keeps the
            // engagement's id.
            id: if engaged.id == wanted.id {
                wanted.id
            } else {
                Uuid::now_v7()
            },
            at: now,
            kind: ControlKind::KillAll,
            actor: actor.to_owned(),
            reason: reason.to_owned(),
            jobs: ids.clone(),
            data: serde_json::json!({
                "queues_paused": queues,
                "engagement": engaged.id,
            }),
        };
        let flagged: Vec<JobId> = ids
            .iter()
            .copied()
            .filter(|id| !failed.contains_key(id))
            .collect();
        let (audit, confirmed) = tokio::join!(self.audit(&event), self.await_stops(&flagged));
        let (cancelled, finished) = confirmed;

        let timeout = self.settings.kill_switch.confirm_timeout_secs;
        let jobs: Vec<KilledJob> = ids
            .iter()
            .map(|id| {
                let (outcome, error) = if let Some(err) = failed.remove(id) {
                    (KillOutcome::Failed, Some(err))
                } else if cancelled.contains(id) {
                    (KillOutcome::Cancelled, None)
                } else if finished.contains(id) {
                    (KillOutcome::Finished, None)
                } else {
                    (
                        KillOutcome::Failed,
                        Some(format!(
                            "not confirmed stopped within {timeout}s; if its worker is gone, \
                             the reaper cancels it once its lease expires"
                        )),
                    )
                };
                KilledJob {
                    id: *id,
                    outcome,
                    error,
                }
            })
            .collect();
        let count = |o: KillOutcome| jobs.iter().filter(|j| j.outcome == o).count();
        let report = KillReport {
            status: KillSwitchStatus::from_state(Some(&engaged)),
            queues_paused: queues.into_iter().collect(),
            cancelled: count(KillOutcome::Cancelled),
            finished: count(KillOutcome::Finished),
            failed: count(KillOutcome::Failed),
            jobs,
            errors,
            audit,
        };
        tracing::warn!(
            cancelled = report.cancelled,
            finished = report.finished,
            failed = report.failed,
            "kill-all done"
        );
        Ok(report)
    }

    /// Lifts the kill switch and releases every queue it held.
    pub async fn resume(&self, actor: &str, reason: &str) -> Result<ResumeReport, AppError> {
        let lifted = self.queue.lift_kill_switch().await?;
        crate::metrics::set_kill_switch(false);
        let mut errors = Vec::new();
        let mut resumed = Vec::new();
        for queue in self.known_queues(&mut errors).await {
            match self.queue.set_halted(&queue, false).await {
                Ok(_) => resumed.push(queue.to_string()),
                Err(err) => errors.push(format!("queue {queue}: cannot resume it: {err}")),
            }
        }
        tracing::warn!(
            actor,
            reason,
            was_engaged = lifted.is_some(),
            "kill switch lifted"
        );
        let event = ControlEvent {
            id: Uuid::now_v7(),
            at: Utc::now(),
            kind: ControlKind::Resume,
            actor: actor.to_owned(),
            reason: reason.to_owned(),
            jobs: Vec::new(),
            data: serde_json::json!({
                "engagement": lifted.as_ref().map(|s| s.id),
                "queues_resumed": resumed,
            }),
        };
        let audit = self.audit(&event).await;
        Ok(ResumeReport {
            status: KillSwitchStatus::from_state(None),
            lifted: lifted
                .as_ref()
                .map(|s| KillSwitchStatus::from_state(Some(s))),
            queues_resumed: resumed,
            errors,
            audit,
        })
    }

    /// Every queue Valkey knows; a failure is reported in `errors`.
    async fn known_queues(&self, errors: &mut Vec<String>) -> Vec<QueueName> {
        self.queue.known_queues().await.unwrap_or_else(|err| {
            errors.push(format!("cannot list the queues: {err}"));
            Vec::new()
        })
    }

    /// Flags `ids` for cancellation; returns those that could not be.
    async fn flag(
        &self,
        ids: &BTreeSet<JobId>,
        actor: &str,
        reason: &str,
        at: chrono::DateTime<Utc>,
    ) -> BTreeMap<JobId, String> {
        let ids: Vec<JobId> = ids.iter().copied().collect();
        self.queue
            .request_cancels(&ids, actor, reason, at)
            .await
            .into_iter()
            .map(|(id, err)| (id, format!("cannot flag it for cancellation: {err}")))
            .collect()
    }

    /// Writes a control event to Postgres, or keeps it in the outbox.
    async fn audit(&self, event: &ControlEvent) -> String {
        match tokio::time::timeout(POSTGRES_PATIENCE, self.store.record_control(event)).await {
            Ok(Ok(_)) => return "recorded".to_owned(),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "control event kept in the outbox until Postgres answers")
            }
            Err(_) => tracing::warn!("Postgres is slow; control event kept in the outbox"),
        }
        let record = match serde_json::to_string(event) {
            Ok(r) => r,
            Err(err) => return format!("lost: {err}"),
        };
        match self.queue.outbox_push(&record).await {
            Ok(()) => "pending".to_owned(),
            Err(err) => {
                tracing::error!(error = %err, record, "control event could not be kept anywhere");
                format!("lost: {err}")
            }
        }
    }

    /// Waits for the workers to confirm `ids` stopped. Returns those
    /// confirmed, and those that finished on their own (Postgres, when it
    /// answers, says so).
    async fn await_stops(&self, ids: &[JobId]) -> (BTreeSet<JobId>, BTreeSet<JobId>) {
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(self.settings.kill_switch.confirm_timeout_secs);
        let mut pending: BTreeSet<JobId> = ids.iter().copied().collect();
        let mut confirmed = BTreeSet::new();
        let mut finished = BTreeSet::new();
        let mut rounds = 0u32;
        while !pending.is_empty() {
            let asked: Vec<JobId> = pending.iter().copied().collect();
            if let Ok(stops) = self.queue.stopped_at(&asked).await {
                for (id, at) in asked.iter().zip(stops) {
                    if at.is_some() {
                        pending.remove(id);
                        confirmed.insert(*id);
                    }
                }
            }
            // Every second, ask Postgres about the rest: a job that ended on
            // its own waits no longer. (One cancelled by a reaper counts once
            // that reaper confirms its sandbox gone, above.)
            if rounds % 10 == 9 && !pending.is_empty() {
                let asked: Vec<JobId> = pending.iter().copied().collect();
                if let Ok(Ok(states)) =
                    tokio::time::timeout(CONFIRM_POLL, self.store.index_states(&asked)).await
                {
                    for s in states {
                        if s.status.is_terminal() && s.status != Status::Cancelled {
                            pending.remove(&s.id);
                            finished.insert(s.id);
                        }
                    }
                }
            }
            if pending.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            rounds += 1;
            tokio::time::sleep(CONFIRM_POLL).await;
        }
        (confirmed, finished)
    }
}
