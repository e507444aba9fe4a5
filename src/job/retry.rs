//! Retry policy: exponential backoff with jitter, capped, with a maximum
//! number of attempts after which a job is dead-lettered.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use serde::{Deserialize, Serialize};

/// Upper bounds accepted for any policy; values beyond them are mistakes.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1_000;
pub const MAX_BACKOFF_MS: u64 = 7 * 24 * 3600 * 1000;

/// How much a delay may deviate from its nominal value (0.25 = ±25%).
const JITTER: f64 = 0.25;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in total, the first included. 1 means "never retry".
    pub max_attempts: u32,
    /// Delay before the first retry, in milliseconds.
    pub backoff_base_ms: u64,
    /// No delay exceeds this, in milliseconds.
    pub backoff_cap_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetryPolicyError {
    #[error("max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {0}")]
    MaxAttempts(u32),
    #[error("backoff_base_ms must be between 1 and {MAX_BACKOFF_MS}, got {0}")]
    Base(u64),
    #[error(
        "backoff_cap_ms must be between backoff_base_ms ({base}) and {MAX_BACKOFF_MS}, got {cap}"
    )]
    Cap { base: u64, cap: u64 },
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    RetryAfter(Duration),
    Dead,
}

impl RetryPolicy {
    pub fn validate(&self) -> Result<(), RetryPolicyError> {
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(RetryPolicyError::MaxAttempts(self.max_attempts));
        }
        if self.backoff_base_ms == 0 || self.backoff_base_ms > MAX_BACKOFF_MS {
            return Err(RetryPolicyError::Base(self.backoff_base_ms));
        }
        if self.backoff_cap_ms < self.backoff_base_ms || self.backoff_cap_ms > MAX_BACKOFF_MS {
            return Err(RetryPolicyError::Cap {
                base: self.backoff_base_ms,
                cap: self.backoff_cap_ms,
            });
        }
        Ok(())
    }

    /// Decide after attempt number `attempt` (1-based) failed.
    pub fn after_failure(&self, attempt: u32) -> RetryDecision {
        if attempt >= self.max_attempts {
            RetryDecision::Dead
        } else {
            RetryDecision::RetryAfter(self.delay(attempt))
        }
    }

    /// Delay before the retry that follows failed attempt `attempt`:
    /// `base * 2^(attempt-1)`, capped, then jittered by ±25% by the `backoff`
    /// crate's randomisation (and capped again so the cap is a hard bound).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = Duration::from_millis(self.backoff_base_ms);
        let cap = Duration::from_millis(self.backoff_cap_ms);
        let exponent = attempt.saturating_sub(1).min(40);
        let nominal = base.saturating_mul(1u32 << exponent.min(31)).min(cap);
        let mut policy = ExponentialBackoff {
            current_interval: nominal,
            initial_interval: base,
            randomization_factor: JITTER,
            multiplier: 2.0,
            max_interval: cap,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        policy.next_backoff().unwrap_or(nominal).min(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            backoff_base_ms: 100,
            backoff_cap_ms: 10_000,
        }
    }

    #[test]
    fn delays_grow_exponentially_within_jitter() {
        let p = policy();
        for attempt in 1..=6u32 {
            let nominal = 100.0 * 2f64.powi(attempt as i32 - 1);
            for _ in 0..200 {
                let d = p.delay(attempt).as_secs_f64() * 1000.0;
                assert!(
                    d >= nominal * (1.0 - JITTER) - 1.0 && d <= nominal * (1.0 + JITTER) + 1.0,
                    "attempt {attempt}: {d}ms not within ±25% of {nominal}ms"
                );
            }
        }
    }

    #[test]
    fn delays_carry_jitter() {
        let p = policy();
        let samples: std::collections::HashSet<_> = (0..50).map(|_| p.delay(3)).collect();
        assert!(
            samples.len() > 10,
            "expected varied delays, got {samples:?}"
        );
    }

    #[test]
    fn delays_stop_at_the_cap() {
        let p = policy();
        for attempt in [8, 9, 20, 64, u32::MAX] {
            for _ in 0..100 {
                assert!(p.delay(attempt) <= Duration::from_millis(10_000));
            }
        }
        // Far past the cap, the jitter keeps delays near the cap, never above.
        let min = (0..200).map(|_| p.delay(30)).min().unwrap_or_default();
        assert!(min >= Duration::from_millis(7_500), "{min:?}");
    }

    #[test]
    fn dead_after_max_attempts() {
        let p = policy();
        assert!(matches!(p.after_failure(9), RetryDecision::RetryAfter(_)));
        assert_eq!(p.after_failure(10), RetryDecision::Dead);
        assert_eq!(p.after_failure(11), RetryDecision::Dead);
        let once = RetryPolicy {
            max_attempts: 1,
            ..p
        };
        assert_eq!(once.after_failure(1), RetryDecision::Dead);
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = policy();
        p.max_attempts = 0;
        assert_eq!(p.validate(), Err(RetryPolicyError::MaxAttempts(0)));
        let mut p = policy();
        p.backoff_cap_ms = 10;
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("backoff_cap_ms"));
        assert_eq!(policy().validate(), Ok(()));
    }
}
