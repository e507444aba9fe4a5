//! Whether a pool is saturated with short jobs, for the deployment's webhook
//! deliverers to defer fresh deliveries while it is (see
//! [`crate::queue::ValkeyQueue::mark_saturated`]).
//!
//! A pool is saturated when its claims come back full (more is waiting
//! than it has credits for) and it claimed at least as many jobs as it has
//! slots within the last [`WINDOW`]: its jobs are short, so what each one
//! costs in Postgres is what limits it, and a delivery beside it takes
//! from it. A pool of long jobs (agents) with a backlog claims a job a
//! minute and is not saturated in this sense: deliveries cost it nothing
//! that matters.

use std::time::{Duration, Instant};

/// The window claims are counted in.
pub const WINDOW: Duration = Duration::from_secs(1);
/// How long one mark lasts in Valkey: a pool that stops being saturated
/// stops deferring deliveries this long after.
pub const MARK_TTL: Duration = Duration::from_secs(1);
/// The most often a pool marks itself saturated.
const MARK_EVERY: Duration = Duration::from_millis(250);

/// Counts a pool's claims (by hand: a counter and two instants, no crate
/// for that).
#[derive(Debug)]
pub struct Saturation {
    slots: usize,
    window_start: Instant,
    claimed: usize,
    last_mark: Option<Instant>,
}

impl Saturation {
    pub fn new(slots: usize, now: Instant) -> Self {
        Saturation {
            slots,
            window_start: now,
            claimed: 0,
            last_mark: None,
        }
    }

    /// Notes a claim that asked for `asked` jobs and got `got`; true when
    /// the pool should mark itself saturated now.
    pub fn claimed(&mut self, asked: usize, got: usize, now: Instant) -> bool {
        if now.duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.claimed = 0;
        }
        self.claimed = self.claimed.saturating_add(got);
        let saturated = got > 0 && got >= asked && self.claimed >= self.slots.max(1);
        let due = self
            .last_mark
            .is_none_or(|at| now.duration_since(at) >= MARK_EVERY);
        if saturated && due {
            self.last_mark = Some(now);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_claims_of_more_than_the_slots_in_a_window_mark_it() {
        let t = Instant::now();
        let mut s = Saturation::new(10, t);
        // Full, but fewer than the slots so far: jobs could be long.
        assert!(!s.claimed(4, 4, t));
        assert!(!s.claimed(4, 4, t + Duration::from_millis(10)));
        // The tenth job within the window, in a full claim.
        assert!(s.claimed(4, 4, t + Duration::from_millis(20)));
        // Marked once per MARK_EVERY.
        assert!(!s.claimed(4, 4, t + Duration::from_millis(30)));
        assert!(s.claimed(4, 4, t + Duration::from_millis(300)));
    }

    #[test]
    fn a_claim_that_found_less_than_it_asked_for_does_not() {
        let t = Instant::now();
        let mut s = Saturation::new(2, t);
        assert!(!s.claimed(50, 49, t));
        assert!(!s.claimed(50, 0, t));
        assert!(s.claimed(50, 50, t));
    }

    #[test]
    fn the_count_starts_again_with_each_window() {
        let t = Instant::now();
        let mut s = Saturation::new(3, t);
        assert!(!s.claimed(2, 2, t));
        // A second later: a long job's pace, one full claim at a time.
        assert!(!s.claimed(2, 2, t + WINDOW));
        assert!(!s.claimed(1, 1, t + WINDOW * 2));
        assert!(!s.claimed(1, 1, t + WINDOW * 3));
    }
}
