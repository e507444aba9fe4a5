//! Samples queue depths into the `orchestrator_queue_depth` gauge.

use super::Maintenance;
use super::MaintenanceError;
use crate::metrics as m;

impl Maintenance {
    pub async fn sample_once(&self) -> Result<(), MaintenanceError> {
        for queue in &self.queues {
            let depth = self.valkey.depth(queue).await?;
            m::set_queue_depth(
                queue.as_str(),
                depth.pending(),
                depth.delayed,
                depth.active,
                depth.held,
            );
        }
        Ok(())
    }
}
