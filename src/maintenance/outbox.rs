//! The outbox: audit records the kill switch kept in Valkey while Postgres
//! could not take them are written to Postgres once it answers. Each record
//! carries its own id, so a record written twice (two replicas, a crash
//! between the write and the removal) is stored once.

use super::Maintenance;
use super::MaintenanceError;
use crate::store::ControlEvent;

/// Records moved per pass.
const OUTBOX_BATCH: usize = 100;

impl Maintenance {
    /// Moves waiting audit records to Postgres; returns how many.
    pub async fn drain_outbox_once(&self) -> Result<usize, MaintenanceError> {
        let records = self.valkey.outbox_peek(OUTBOX_BATCH).await?;
        let mut moved = 0;
        for record in records {
            match serde_json::from_str::<ControlEvent>(&record) {
                Ok(event) => match self.store.record_control(&event).await {
                    Ok(_) => {
                        tracing::info!(control.id = %event.id, kind = event.kind.as_str(), "audit record written from the outbox");
                        moved += 1;
                    }
                    // Postgres refuses this record's data for good: set
                    // aside (never lost), so it does not hold back the rest.
                    Err(err) if err.is_bad_data() => {
                        tracing::error!(error = %err, record, "audit record refused by Postgres; moved to the outbox's dead list");
                        self.valkey.outbox_bury(&record).await?;
                        continue;
                    }
                    // Anything else (Postgres away, full, read-only, a
                    // missing table): keep it, and the rest, for later.
                    Err(err) => return Err(err.into()),
                },
                // Only a newer or older release could write one.
                Err(err) => {
                    tracing::error!(error = %err, record, "unreadable outbox record moved to the dead list");
                    self.valkey.outbox_bury(&record).await?;
                    continue;
                }
            }
            self.valkey.outbox_remove(&record).await?;
        }
        Ok(moved)
    }
}
