//! The outbox: audit records the kill switch kept in Valkey while Postgres
//! could not take them are written to Postgres once it answers. Each record
//! carries its own id, so a record written twice (two replicas, a crash
//! between the write and the removal) is stored once.

use super::Maintenance;
use crate::pool::PoolError;
use crate::store::ControlEvent;

/// Records moved per pass.
const OUTBOX_BATCH: usize = 100;

impl Maintenance {
    /// Moves waiting audit records to Postgres; returns how many.
    pub async fn drain_outbox_once(&self) -> Result<usize, PoolError> {
        let records = self.valkey.outbox_peek(OUTBOX_BATCH).await?;
        let mut moved = 0;
        for record in records {
            match serde_json::from_str::<ControlEvent>(&record) {
                Ok(event) => {
                    self.store.record_control(&event).await?;
                    tracing::info!(control.id = %event.id, kind = event.kind.as_str(), "audit record written from the outbox");
                    moved += 1;
                }
                // Only a newer or older release could write one; dropping it
                // would lose audit, so it is logged whole before it goes.
                Err(err) => {
                    tracing::error!(error = %err, record, "unreadable outbox record dropped")
                }
            }
            self.valkey.outbox_remove(&record).await?;
        }
        Ok(moved)
    }
}
