//! Samples queue depths into the `orchestrator_queue_depth` gauge.

use super::Maintenance;
use super::MaintenanceError;
use crate::metrics as m;

impl Maintenance {
    pub async fn sample_once(&self) -> Result<(), MaintenanceError> {
        for queue in &self.queues {
            let depth = self.valkey.depth(queue).await?;
            let name = queue.to_string();
            for (state, value) in [
                ("pending", depth.pending()),
                ("delayed", depth.delayed),
                ("active", depth.active),
            ] {
                metrics::gauge!(m::QUEUE_DEPTH, "queue" => name.clone(), "state" => state)
                    .set(value as f64);
            }
        }
        Ok(())
    }
}
