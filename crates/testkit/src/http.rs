//! One HTTP request with curl from inside a namespace, where the
//! namespace's capture rules, routes and resolver apply.

use std::time::Duration;

use crate::netns::Namespace;

/// The status of one `method` request to `url` from `ns`, giving up after
/// `max_time`; `None` when there was no HTTP answer (refused, reset, timed
/// out).
pub fn status(ns: &Namespace, method: &str, url: &str, max_time: Duration) -> Option<u16> {
    let max_time = format!("{:.3}", max_time.as_secs_f64());
    let output = ns
        .command(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            method,
            "--max-time",
            &max_time,
            url,
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .parse()
        .ok()
        .filter(|code| *code != 0)
}
