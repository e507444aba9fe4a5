//! Webhooks: subscriptions, a job's deliveries, redelivery, the address
//! policy of callback URLs, and the deliverer of an API-only replica.

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{App, AppError};
use crate::job::{Delivery, FieldError, JobId, NewJob, Webhook, WebhookRequest};
use crate::maintenance::{Maintenance, MaintenanceConfig};
use crate::net::HttpUrl;

impl App {
    /// Whether webhooks can be signed here; without a secret nothing is
    /// sent, so nothing that would need sending is taken.
    fn require_secret(&self, field: &str) -> Result<(), FieldError> {
        if self.settings.webhooks.secrets.is_empty() {
            return Err(FieldError::new(
                field,
                "this deployment has no webhook secret (ORCH_WEBHOOK_SECRET or webhooks.secrets), so no webhook could be signed",
            ));
        }
        Ok(())
    }

    /// The address policy for a URL this deployment will POST to: a local
    /// or private host (literal, or by what the name resolves to now) only
    /// with `webhooks.allow_local`. Sending checks again.
    async fn check_url(&self, raw: &str, field: &str) -> Result<HttpUrl, FieldError> {
        let allow_local = self.settings.webhooks.allow_local;
        let url = HttpUrl::parse(raw, allow_local).map_err(|e| FieldError::new(field, e))?;
        crate::webhook::check_resolves(&url, allow_local)
            .await
            .map_err(|e| FieldError::new(field, e))?;
        Ok(url)
    }

    /// Applies the policy to every job's `callback_url` (all or nothing).
    pub(super) async fn check_callbacks(&self, jobs: &[NewJob]) -> Result<(), AppError> {
        for (index, job) in jobs.iter().enumerate() {
            let Some(raw) = &job.callback_url else {
                continue;
            };
            let checked = async {
                self.require_secret("callback_url")?;
                self.check_url(raw, "callback_url").await
            };
            checked
                .await
                .map_err(|error| AppError::Invalid { index, error })?;
        }
        Ok(())
    }

    pub async fn create_webhook(
        &self,
        request: WebhookRequest,
        actor: &str,
    ) -> Result<Webhook, AppError> {
        let hook = request
            .validate(actor, self.settings.webhooks.allow_local)
            .map_err(AppError::InvalidRequest)?;
        self.require_secret("url")
            .map_err(AppError::InvalidRequest)?;
        self.check_url(hook.url.as_str(), "url")
            .await
            .map_err(AppError::InvalidRequest)?;
        let created = self.store.create_webhook(&hook).await?;
        // The host only: a URL may carry a token.
        let host = hook.url.url().host_str().unwrap_or_default().to_owned();
        tracing::info!(webhook = %created.id, host, events = ?created.events, actor, "webhook subscription created");
        Ok(created)
    }

    pub async fn webhooks(&self) -> Result<Vec<Webhook>, AppError> {
        Ok(self.store.webhooks().await?)
    }

    /// Removes a subscription and drops what it had left to send.
    pub async fn delete_webhook(&self, id: Uuid, actor: &str) -> Result<u64, AppError> {
        let dropped = self
            .store
            .delete_webhook(id)
            .await?
            .ok_or(AppError::NoSuchWebhook(id))?;
        tracing::info!(webhook = %id, dropped, actor, "webhook subscription deleted");
        Ok(dropped)
    }

    /// A job's deliveries with their attempts (the job must exist).
    pub async fn deliveries(&self, id: JobId) -> Result<Vec<Delivery>, AppError> {
        self.job(id).await?;
        Ok(self.store.job_deliveries(id).await?)
    }

    /// Sends a delivered or dead delivery again, under its message id.
    pub async fn redeliver(
        &self,
        job: JobId,
        delivery: i64,
        actor: &str,
    ) -> Result<Delivery, AppError> {
        match self.store.redeliver(job, delivery).await? {
            None => return Err(AppError::NoSuchDelivery { job, delivery }),
            Some(false) => {
                return Err(AppError::InvalidRequest(FieldError::new(
                    "delivery",
                    format!("delivery {delivery} is pending, being sent, or dropped with its subscription; only a delivered or dead one is sent again"),
                )))
            }
            Some(true) => {}
        }
        tracing::info!(job.id = %job, delivery, actor, "webhook redelivery requested");
        self.store
            .job_deliveries(job)
            .await?
            .into_iter()
            .find(|d| d.id == delivery)
            .ok_or(AppError::NoSuchDelivery { job, delivery })
    }

    /// Delivers webhooks until `stop` fires: the deliverer of a replica that
    /// runs no worker pool (`serve`). Without a secret, it says so and
    /// returns.
    pub async fn deliver_webhooks(&self, stop: CancellationToken) {
        let Some(delivery) = self.delivery.clone() else {
            tracing::warn!("no webhook secret (ORCH_WEBHOOK_SECRET): webhooks are not delivered from this replica");
            return;
        };
        let cfg: MaintenanceConfig = self.settings.maintenance_config();
        Maintenance::new(
            self.store.clone(),
            self.queue.clone(),
            Vec::new(),
            format!("api@{}", self.settings.http_addr),
            cfg,
        )
        .with_webhooks(Some(delivery))
        .run_webhooks(stop)
        .await;
    }
}
