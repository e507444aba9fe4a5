//! Samples queue depths into the `orchestrator_queue_depth` gauge.

use super::Maintenance;
use super::MaintenanceError;

impl Maintenance {
    pub async fn sample_once(&self) -> Result<(), MaintenanceError> {
        for queue in &self.queues {
            self.valkey.depth(queue).await?.record(queue);
        }
        Ok(())
    }
}
