//! When to renew: at a fraction of the certificate's life (half, Istio's
//! default) plus a random part of it (up to a tenth), so that workloads
//! issued together do not all come back together.
//!
//! Pure arithmetic on wall-clock times read from the certificate; the
//! manager turns the result into a deadline on tokio's clock.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::backoff::BackoffPolicy;

/// When certificates are renewed and how failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RenewalPolicy {
    /// Fraction of the life after which renewal starts (0.5).
    pub grace_ratio: f64,
    /// Largest random addition, as a fraction of the life (0.1).
    pub jitter_ratio: f64,
    /// A freshly issued certificate is never renewed sooner than this
    /// (1 s), whatever its life: a guard against renewing in a loop.
    #[serde(with = "crate::duration_secs")]
    pub min_interval: Duration,
    /// How failed attempts are retried.
    pub retry: BackoffPolicy,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            grace_ratio: 0.5,
            jitter_ratio: 0.1,
            min_interval: Duration::from_secs(1),
            retry: BackoffPolicy::default(),
        }
    }
}

impl RenewalPolicy {
    /// How long after `now` a certificate valid from `not_before` to
    /// `not_after` should be renewed, with `sample` in `[0, 1)` choosing the
    /// jitter.
    ///
    /// The life counts from `not_before`, or from `acquired_at` when the
    /// certificate was just issued and that is later: a CA backdates
    /// `notBefore` against clock skew, and for short lives that would
    /// otherwise put the renewal point in the past. Certificates read back
    /// from disk pass `None`.
    pub fn renewal_delay(
        &self,
        not_before: SystemTime,
        not_after: SystemTime,
        acquired_at: Option<SystemTime>,
        now: SystemTime,
        sample: f64,
    ) -> Duration {
        let start = acquired_at.map_or(not_before, |a| a.max(not_before));
        let life = not_after.duration_since(start).unwrap_or_default();
        let ratio = self.grace_ratio.clamp(0.0, 1.0)
            + self.jitter_ratio.clamp(0.0, 1.0) * sample.clamp(0.0, 1.0);
        let renew_at = start + life.mul_f64(ratio.min(1.0));
        let delay = renew_at.duration_since(now).unwrap_or_default();
        if acquired_at.is_some() {
            delay.max(self.min_interval)
        } else {
            delay
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn half_life_plus_at_most_a_tenth() {
        let policy = RenewalPolicy::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let backdate = Duration::from_secs(60);
        // A 24 h certificate read from disk, issued (backdated) just now.
        let (nb, na) = (now - backdate, now + 24 * HOUR);
        let life = na.duration_since(nb).unwrap();
        let earliest = policy.renewal_delay(nb, na, None, now, 0.0);
        assert_eq!(earliest, life / 2 - backdate);
        let latest = policy.renewal_delay(nb, na, None, now, 0.999_999);
        assert!(latest <= life / 2 + life / 10 - backdate && latest > earliest);
        for _ in 0..1000 {
            let d = policy.renewal_delay(nb, na, None, now, fastrand::f64());
            assert!(
                d >= earliest && d <= life / 2 + life / 10 - backdate,
                "{d:?}"
            );
        }

        // Freshly issued: the life counts from receipt, not the backdated start.
        let fresh = policy.renewal_delay(nb, now + HOUR, Some(now), now, 0.0);
        assert_eq!(fresh, HOUR / 2);
        let fresh = policy.renewal_delay(nb, now + HOUR, Some(now), now, 0.5);
        assert_eq!(fresh, HOUR / 2 + HOUR / 20);

        // Later in life the delay shrinks; past the point it is zero (disk)
        // or the minimum interval (fresh).
        let later = now + 10 * HOUR;
        assert_eq!(
            policy.renewal_delay(nb, na, None, later, 0.0),
            life / 2 - backdate - 10 * HOUR
        );
        assert_eq!(policy.renewal_delay(nb, na, None, na, 0.0), Duration::ZERO);
        assert_eq!(
            policy.renewal_delay(nb, na, None, na + HOUR, 0.0),
            Duration::ZERO,
            "expired"
        );
        assert_eq!(
            policy.renewal_delay(nb, now + Duration::from_millis(10), Some(now), now, 0.0),
            Duration::from_secs(1)
        );
    }
}
