//! A brake on guessing: failed join attempts, and failed credentials at
//! the CA and xDS, are counted per source address, and a source that failed too often lately is turned away at
//! once, without its guess being checked, until its failures age out. The
//! log says so once in a while, not once per guess.
//!
//! What counts as a failure is the caller's decision (`join.rs`, the CA
//! service and the xDS authenticator in `identity.rs`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Failures one source may have within [`WINDOW`] before it is turned away.
pub const MAX_FAILURES: u32 = 10;
/// How long a failure counts.
pub const WINDOW: Duration = Duration::from_secs(60);
/// At most this many sources are remembered; beyond, the oldest go.
const MAX_SOURCES: usize = 100_000;

#[derive(Debug, Default)]
pub struct FailureThrottle {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Per source: when its first counted failure was, and how many since.
    failures: HashMap<IpAddr, (Instant, u32)>,
    last_logged: Option<Instant>,
    turned_away_since_log: u64,
}

impl FailureThrottle {
    /// `Err(wait)` when `source` must wait that long before trying again.
    pub fn admit(&self, source: IpAddr, what: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut state = self.state.lock();
        let Some(&(since, count)) = state.failures.get(&source) else {
            return Ok(());
        };
        let age = now.duration_since(since);
        if age >= WINDOW {
            state.failures.remove(&source);
            return Ok(());
        }
        if count < MAX_FAILURES {
            return Ok(());
        }
        state.turned_away_since_log += 1;
        if state
            .last_logged
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            tracing::warn!(
                %source,
                "{what}: turning away sources with {MAX_FAILURES} failures in {WINDOW:?} \
                 ({} attempts turned away since the last such line)",
                state.turned_away_since_log
            );
            state.last_logged = Some(now);
            state.turned_away_since_log = 0;
        }
        Err(WINDOW - age)
    }

    /// Counts a failed attempt from `source`.
    pub fn failed(&self, source: IpAddr) {
        let now = Instant::now();
        let mut state = self.state.lock();
        if state.failures.len() >= MAX_SOURCES {
            state
                .failures
                .retain(|_, (since, _)| now.duration_since(*since) < WINDOW);
        }
        if state.failures.len() >= MAX_SOURCES {
            return;
        }
        let entry = state.failures.entry(source).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// The CA service's brake, under its own name in the log.
#[derive(Debug, Default)]
pub struct CredentialThrottle(pub FailureThrottle);

impl vmesh_ca::CallerThrottle for CredentialThrottle {
    fn admit(&self, source: IpAddr) -> Result<(), Duration> {
        self.0.admit(source, "credentials at 15012")
    }

    fn failed(&self, source: IpAddr) {
        self.0.failed(source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_source_that_keeps_failing_waits_and_others_do_not() {
        let throttle = FailureThrottle::default();
        let guesser: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(throttle.admit(guesser, "test").is_ok());
            throttle.failed(guesser);
        }
        let wait = throttle.admit(guesser, "test").unwrap_err();
        assert!(wait <= WINDOW && wait > WINDOW - Duration::from_secs(1));
        assert!(throttle.admit(other, "test").is_ok());
        tokio::time::advance(WINDOW).await;
        assert!(throttle.admit(guesser, "test").is_ok(), "failures age out");
    }
}
