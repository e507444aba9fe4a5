//! The promoter: due delayed jobs become pending even while every worker is
//! busy (claims promote too, but only when a slot is free).

use super::MaintenanceError;
use super::{Maintenance, PROMOTE_LIMIT};

impl Maintenance {
    /// Returns how many ids were promoted.
    pub async fn promote_once(&self) -> Result<u64, MaintenanceError> {
        let mut total = 0;
        for queue in &self.queues {
            total += self.valkey.promote(queue, PROMOTE_LIMIT).await?;
        }
        Ok(total)
    }
}
