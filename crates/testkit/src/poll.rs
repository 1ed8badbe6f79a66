//! Waiting for a condition: a check polled every 100 ms.

use std::time::Duration;

use tokio::time::Instant;

/// How long between two checks.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// Polls `check` until it gives a value or `limit` has passed (it is
/// checked at least once).
pub fn wait_for<T>(limit: Duration, check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    poll(|_| Instant::now() < deadline, check)
}

/// Polls `check` up to `attempts` times; the time the checks themselves
/// take does not count against them.
pub fn attempts<T>(attempts: usize, check: impl FnMut() -> Option<T>) -> Option<T> {
    poll(|done| done < attempts, check)
}

/// As [`wait_for`], an error naming `what` when it does not come.
pub fn until<T>(
    what: &str,
    limit: Duration,
    check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    wait_for(limit, check)
        .ok_or_else(|| anyhow::anyhow!("timed out after {limit:?} waiting for {what}"))
}

fn poll<T>(mut more: impl FnMut(usize) -> bool, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let mut done = 0;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        done += 1;
        if !more(done) {
            return None;
        }
        std::thread::sleep(INTERVAL);
    }
}
