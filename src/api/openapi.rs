//! The OpenAPI 3 document, generated from the handlers' annotations.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{error, events, health, jobs, killswitch, queues, schedules, webhooks};
use crate::job::{
    CatchUp, Delivery, DeliveryAttempt, Job, JobEvent, JobPatch, JobRequest, Overlap, Schedule,
    ScheduleRequest, Status, UniqueRequest, Webhook, WebhookRequest,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "orchestrator", description = "A durable job queue for coding agents."),
    paths(
        jobs::create, jobs::create_batch, jobs::get, jobs::edit, jobs::list, jobs::cancel, jobs::retry,
        events::events,
        queues::list, queues::pause, queues::resume,
        killswitch::get, killswitch::engage, killswitch::lift, killswitch::events,
        webhooks::create, webhooks::list, webhooks::delete, webhooks::deliveries, webhooks::redeliver,
        schedules::create, schedules::list, schedules::get, schedules::edit, schedules::delete,
        health::healthz, health::readyz, health::metrics,
    ),
    components(schemas(
        Job, JobEvent, JobPatch, JobRequest, Status, error::Problem,
        jobs::BatchRequest, jobs::BatchList, jobs::BatchJob, jobs::JobPage, jobs::EventList, jobs::CancelRequest,
        crate::app::QueueInfo, queues::QueueList,
        killswitch::KillRequest, killswitch::ControlEventList, killswitch::ControlEventView,
        crate::app::KillSwitchStatus, crate::app::KillReport,
        crate::app::ResumeReport, crate::app::KilledJob, crate::app::KillOutcome,
        Webhook, WebhookRequest, Delivery, DeliveryAttempt,
        webhooks::WebhookList, webhooks::DeliveryList, webhooks::Deleted,
        Schedule, ScheduleRequest, Overlap, CatchUp, UniqueRequest, schedules::ScheduleList,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
