//! Exponential backoff with jitter, for retrying the CA, reconnecting to
//! the control plane and restarting Envoy ([`crate::envoy`]).
//!
//! This module only computes delays; callers sleep on tokio's clock, so
//! tests drive retries on a paused clock.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How retries space out: `initial`, then doubling up to `max`, each delay
/// shortened by up to `jitter` of itself (a fraction in `[0, 1)`) so that
/// many agents cut off together do not come back in step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BackoffPolicy {
    #[serde(with = "crate::duration_secs")]
    pub initial: Duration,
    #[serde(with = "crate::duration_secs")]
    pub max: Duration,
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: 0.2,
        }
    }
}

impl BackoffPolicy {
    /// The delay before retry number `attempt` (0 is the first retry),
    /// with `sample` in `[0, 1)` choosing the jitter.
    pub fn delay(&self, attempt: u32, sample: f64) -> Duration {
        let base = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(30)))
            .min(self.max);
        let jitter = self.jitter.clamp(0.0, 0.99) * sample.clamp(0.0, 1.0);
        base.mul_f64(1.0 - jitter)
    }
}

/// The state of one retry loop.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(policy: BackoffPolicy) -> Backoff {
        Backoff { policy, attempt: 0 }
    }

    /// The next delay; each call doubles the following one.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.policy.delay(self.attempt, fastrand::f64());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the last reset.
    pub(crate) fn failures(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_maximum_and_jitter_only_shortens() {
        let policy = BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            jitter: 0.2,
        };
        let secs: Vec<u64> = (0..6).map(|a| policy.delay(a, 0.0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10]);
        assert_eq!(policy.delay(1, 0.999).as_millis(), 1600);
        assert_eq!(policy.delay(u32::MAX, 0.0), Duration::from_secs(10));

        let mut backoff = Backoff::new(policy);
        for attempt in 0..8 {
            let d = backoff.next_delay();
            let full = policy.delay(attempt, 0.0);
            assert!(d <= full && d >= full.mul_f64(0.8), "{d:?} vs {full:?}");
        }
        assert_eq!(backoff.failures(), 8);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
    }
}
