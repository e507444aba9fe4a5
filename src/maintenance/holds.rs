//! The kill switch's holds follow the switch: while it is engaged every
//! queue this worker serves is held (a queue created after the kill-all
//! too), and once it is lifted no hold is left behind (a kill-all racing a
//! resume, or a resume that could not reach every queue).

use super::Maintenance;
use super::MaintenanceError;

impl Maintenance {
    /// Sets or clears the `halted` flag of each served queue to match the
    /// switch; returns how many changed.
    pub async fn sync_holds_once(&self) -> Result<usize, MaintenanceError> {
        let mut changed = 0;
        let mut engaged = self.valkey.kill_switch().await?.is_some();
        // Read again after writing: a kill-all or resume that landed in
        // between is followed at once, not a period later.
        for _ in 0..3 {
            let mut failed = None;
            for queue in &self.queues {
                match self.valkey.set_halted(queue, engaged).await {
                    Ok(true) => {
                        tracing::warn!(queue = %queue, held = engaged, "kill switch hold brought in line with the switch");
                        changed += 1;
                    }
                    Ok(false) => {}
                    Err(err) => failed = Some(err),
                }
            }
            if let Some(err) = failed {
                return Err(err.into());
            }
            let now = self.valkey.kill_switch().await?.is_some();
            if now == engaged {
                break;
            }
            engaged = now;
        }
        Ok(changed)
    }
}
