//! Schedules: writing them (the job template is checked as a job would be,
//! then again at every tick), and the job a tick enqueues.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{App, AppError};
use crate::job::{FieldError, NewJob, Schedule, ScheduleId, ScheduleRequest};
use crate::maintenance::{JobFactory, SchedulerConfig};
use crate::store::ScheduleWriteError;

impl From<ScheduleWriteError> for AppError {
    fn from(e: ScheduleWriteError) -> Self {
        match e {
            ScheduleWriteError::NameTaken(name) => AppError::ScheduleNameTaken(name),
            ScheduleWriteError::NotFound(id) => AppError::NoSuchSchedule(id),
            ScheduleWriteError::Store(e) => AppError::Store(e),
        }
    }
}

impl App {
    pub async fn create_schedule(
        &self,
        request: ScheduleRequest,
        actor: &str,
    ) -> Result<Schedule, AppError> {
        let new = request.validate().map_err(AppError::InvalidRequest)?;
        self.check_template(&new.job, actor).await?;
        Ok(self.store.create_schedule(&new, actor).await?)
    }

    /// A PATCH: the given fields replace the schedule's, and the whole is
    /// checked again.
    pub async fn update_schedule(
        &self,
        id: ScheduleId,
        patch: ScheduleRequest,
        actor: &str,
    ) -> Result<Schedule, AppError> {
        let current = self.schedule(id).await?;
        let new = patch
            .merged_onto(&current)
            .validate()
            .map_err(AppError::InvalidRequest)?;
        self.check_template(&new.job, actor).await?;
        Ok(self.store.update_schedule(id, &new).await?)
    }

    pub async fn schedule(&self, id: ScheduleId) -> Result<Schedule, AppError> {
        self.store
            .schedule(id)
            .await?
            .ok_or(AppError::NoSuchSchedule(id))
    }

    pub async fn schedules(&self) -> Result<Vec<Schedule>, AppError> {
        Ok(self.store.schedules().await?)
    }

    pub async fn delete_schedule(&self, id: ScheduleId) -> Result<(), AppError> {
        if self.store.delete_schedule(id).await? {
            Ok(())
        } else {
            Err(AppError::NoSuchSchedule(id))
        }
    }

    /// A template must make a valid job now (its kind, payload, callback),
    /// named as `job.<field>`.
    async fn check_template(
        &self,
        job: &crate::job::JobRequest,
        actor: &str,
    ) -> Result<(), AppError> {
        let prefixed = |e: AppError| match e {
            AppError::Invalid { error, .. } => AppError::InvalidRequest(FieldError::new(
                format!("job.{}", error.field),
                error.message,
            )),
            other => other,
        };
        let jobs = self.validate(vec![job.clone()], actor).map_err(prefixed)?;
        self.check_callbacks(&jobs).await.map_err(prefixed)
    }

    /// The job a schedule's tick enqueues, recorded as enqueued by
    /// `schedule:<name>`.
    fn scheduled_job(&self, schedule: &Schedule, tick: DateTime<Utc>) -> Result<NewJob, String> {
        let actor = format!("schedule:{}", schedule.name);
        let mut jobs = self
            .validate(vec![schedule.job.clone()], &actor)
            .map_err(|e| match e {
                AppError::Invalid { error, .. } => format!("job.{error}"),
                other => other.to_string(),
            })?;
        let mut job = jobs.pop().ok_or("the template made no job")?;
        job.schedule = Some((schedule.id, tick));
        Ok(job)
    }

    /// How this replica's maintenance runs schedules.
    pub fn scheduler_config(&self) -> SchedulerConfig {
        let app = self.clone();
        let make_job: JobFactory = Arc::new(move |s, tick| app.scheduled_job(s, tick));
        SchedulerConfig {
            interval: std::time::Duration::from_millis(
                self.settings.maintenance.schedule_interval_ms,
            ),
            grace: chrono::Duration::seconds(self.settings.maintenance.schedule_grace_secs as i64),
            make_job,
        }
    }
}
