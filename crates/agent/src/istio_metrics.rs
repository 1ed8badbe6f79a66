//! Istio's standard metrics, counted by the agent from Envoy's metrics log
//! (`vmesh_api::peer::METRICS_LOG_FILE`): a pipe in the socket directory
//! into which the file loggers of every listener (the xds crate's
//! `translate/telemetry.rs`) write one line per request or TCP connection
//! event and side, with the values measured and each distinct label set
//! once. Each label set becomes one series per metric counted under it;
//! the merged endpoint serves them after Envoy's own stats as
//! `istio_<name>{…}` with Istio's labels (`vmesh_api::peer::expand_labels`,
//! the proxy's own workload filled in).
//!
//! Counting here rather than in Envoy's stats is what keeps the metrics
//! cheap: Envoy formats one short line per request instead of finding and
//! updating a tagged stat per metric. Lines reach the agent within Envoy's
//! file flush interval (a second).
//!
//! This module owns the pipe, the counts and their text; `status` serves it.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::watch;
use vmesh_api::peer::{
    METRICS_LOG_SEPARATOR, Measure, OwnWorkload, STANDARD_METRICS, expand_labels,
};

/// Envoy's default histogram buckets, which Istio's metrics use.
const BUCKETS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    30_000.0,
    60_000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];

/// Label sets counted at most: lines naming a new one beyond are dropped
/// (and counted), so that a label with unbounded values (a path in a
/// Telemetry override) cannot take the VM's memory.
const MAX_LABEL_SETS: usize = 10_000;

/// The longest line read: a longer one is dropped.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetricsLogError {
    #[error("making the metrics log pipe {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the metrics log pipe {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The counts of Istio's metrics, shared by the reader and the status port.
#[derive(Debug, Default)]
pub struct IstioMetrics {
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Per label set, each standard metric's sample (by its index in
    /// `STANDARD_METRICS`), once counted.
    label_sets: HashMap<String, [Option<Sample>; STANDARD_METRICS.len()]>,
    malformed: u64,
    over_limit: u64,
}

#[derive(Debug, Clone)]
enum Sample {
    Counter(u64),
    Histogram(Histogram),
}

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); over the last, only in `count`.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn record(&mut self, value: f64) {
        if let Some(bucket) = BUCKETS.iter().position(|b| value <= *b) {
            self.buckets[bucket] += 1;
        }
        self.count += 1;
        self.sum += value;
    }
}

/// Makes the metrics log pipe at `path` (0600; one left by an earlier run
/// is replaced) and opens it for reading. It is opened for writing too, so
/// that it never reads end-of-file while Envoy restarts, and Envoy's own
/// opening never waits for a reader.
pub fn open_log(path: &Path) -> Result<pipe::Receiver, MetricsLogError> {
    let create = |source| MetricsLogError::Create {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_fifo() => std::fs::remove_file(path).map_err(create)?,
        Ok(_) => {
            return Err(create(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it exists and is not a pipe",
            )));
        }
        Err(_) => {}
    }
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        path,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
    )
    .map_err(|e| create(e.into()))?;
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map_err(|source| MetricsLogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

impl IstioMetrics {
    /// Counts the lines of `pipe` until shutdown, then removes `path` (the pipe's).
    pub async fn follow(
        self: Arc<Self>,
        mut pipe: pipe::Receiver,
        path: PathBuf,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut pending: Vec<u8> = Vec::with_capacity(MAX_LINE);
        let mut chunk = vec![0u8; MAX_LINE];
        loop {
            let read = tokio::select! {
                read = pipe.read(&mut chunk) => read,
                () = crate::stopped(&mut shutdown) => break,
            };
            let n = match read {
                // Never while this end holds the pipe open for writing too.
                Ok(0) => {
                    tracing::error!("the metrics log ended; Istio's metrics stop");
                    break;
                }
                Ok(n) => n,
                Err(e) => {
                    tracing::error!("reading the metrics log: {e}; Istio's metrics stop");
                    break;
                }
            };
            pending.extend_from_slice(&chunk[..n]);
            let Some(end) = pending.iter().rposition(|b| *b == b'\n') else {
                if pending.len() > MAX_LINE {
                    pending.clear();
                    self.counts.lock().malformed += 1;
                }
                continue;
            };
            self.record_lines(&pending[..end]);
            pending.drain(..=end);
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Counts complete lines (without their final newline).
    fn record_lines(&self, lines: &[u8]) {
        let mut counts = self.counts.lock();
        for line in lines.split(|b| *b == b'\n') {
            match std::str::from_utf8(line) {
                Ok(line) => counts.record(line),
                Err(_) => counts.malformed += 1,
            }
        }
    }

    /// Istio's metric families in Prometheus' text format.
    pub fn render(&self, own: &OwnWorkload) -> String {
        let counts = self.counts.lock();
        let mut sets: Vec<(&String, &[Option<Sample>; STANDARD_METRICS.len()])> =
            counts.label_sets.iter().collect();
        sets.sort_by(|a, b| a.0.cmp(b.0));
        // Each label set's labels, expanded once for every metric.
        let labels: Vec<String> = sets
            .iter()
            .map(|(set, _)| {
                expand_labels(set, own)
                    .iter()
                    .map(|(name, value)| format!("{name}=\"{}\"", escape(value)))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        let mut out = String::new();
        for (index, metric) in STANDARD_METRICS.iter().enumerate() {
            let mut samples = sets
                .iter()
                .zip(&labels)
                .filter_map(|((_, samples), labels)| Some((samples[index].as_ref()?, labels)))
                .peekable();
            if samples.peek().is_none() {
                continue;
            }
            let name = metric.name;
            let kind = match metric.measure {
                Measure::Histogram(_) => "histogram",
                Measure::Count | Measure::Sum(_) => "counter",
            };
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            for (sample, labels) in samples {
                match sample {
                    Sample::Counter(value) => {
                        out.push_str(&format!("{name}{{{labels}}} {value}\n"))
                    }
                    Sample::Histogram(h) => {
                        let mut cumulative = 0;
                        for (bound, count) in BUCKETS.iter().zip(h.buckets) {
                            cumulative += count;
                            out.push_str(&format!(
                                "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}\n"
                            ));
                        }
                        out.push_str(&format!(
                            "{name}_bucket{{{labels},le=\"+Inf\"}} {}\n{name}_sum{{{labels}}} {}\n{name}_count{{{labels}}} {}\n",
                            h.count, h.sum, h.count
                        ));
                    }
                }
            }
        }
        out.push_str(&format!(
            "# TYPE vmesh_agent_metrics_log_dropped_total counter\n\
             vmesh_agent_metrics_log_dropped_total{{reason=\"malformed\"}} {}\n\
             vmesh_agent_metrics_log_dropped_total{{reason=\"too_many_label_sets\"}} {}\n",
            counts.malformed, counts.over_limit
        ));
        out
    }
}

impl Counts {
    /// Counts one line: `duration␟received␟sent` then `codes=labels` sets.
    /// A line with a broken set counts nothing.
    fn record(&mut self, line: &str) {
        if line.is_empty() {
            return;
        }
        let mut fields = line.split(METRICS_LOG_SEPARATOR);
        // Envoy leaves out a value it does not have; nothing but a
        // measurement (finite, not negative) is counted.
        let values: [Option<f64>; 3] = std::array::from_fn(|_| {
            fields
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        });
        let sets = fields;
        if sets.clone().next().is_none() || !sets.clone().all(|set| set.contains('=')) {
            self.malformed += 1;
            return;
        }
        for (codes, labels) in sets.filter_map(|set| set.split_once('=')) {
            if !self.label_sets.contains_key(labels) {
                if self.label_sets.len() >= MAX_LABEL_SETS {
                    self.over_limit += 1;
                    continue;
                }
                self.label_sets
                    .insert(labels.to_string(), Default::default());
            }
            let Some(samples) = self.label_sets.get_mut(labels) else {
                continue;
            };
            for code in codes.chars() {
                let Some(index) = STANDARD_METRICS.iter().position(|m| m.code == code) else {
                    continue;
                };
                let sample = &mut samples[index];
                match STANDARD_METRICS[index].measure {
                    Measure::Count => add(sample, 1),
                    Measure::Sum(value) => {
                        if let Some(v) = values[value as usize] {
                            add(sample, v as u64);
                        }
                    }
                    Measure::Histogram(value) => {
                        if let Some(v) = values[value as usize]
                            && let Sample::Histogram(h) = sample
                                .get_or_insert_with(|| Sample::Histogram(Histogram::default()))
                        {
                            h.record(v);
                        }
                    }
                }
            }
        }
    }
}

fn add(sample: &mut Option<Sample>, value: u64) {
    if let Sample::Counter(total) = sample.get_or_insert(Sample::Counter(0)) {
        *total += value;
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> OwnWorkload {
        OwnWorkload {
            attributes: "pay;vm;pay;v1;pay;v1;c1".into(),
            principal: "spiffe://td/ns/vm/sa/pay".into(),
        }
    }

    const SEP: char = METRICS_LOG_SEPARATOR;

    fn line(values: &str, sets: &[&str]) -> String {
        let mut line = values.replace(',', &SEP.to_string());
        for set in sets {
            line.push(SEP);
            line.push_str(set);
        }
        line
    }

    /// The value of the first sample in `text` whose line starts with
    /// `prefix` and contains `part`.
    fn value_of(text: &str, prefix: &str, part: &str) -> String {
        text.lines()
            .find(|l| l.starts_with(prefix) && l.contains(part))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("a {prefix}…{part} sample in {text}"))
            .to_string()
    }

    const CLIENT: &str = "source|@|@|fe;frontend;fe;v7;fe;v7;|spiffe://td/ns/frontend/sa/fe|payment.vm.svc.cluster.local;payment;vm|http|200|0|-|unknown";

    #[test]
    fn one_line_counts_every_metric_of_its_label_sets() {
        let metrics = IstioMetrics::default();
        let request = line("12,100,2500", &[&format!("rdqs={CLIENT}")]);
        metrics.record_lines(format!("{request}\n{request}").as_bytes());
        let text = metrics.render(&own());
        assert!(
            text.contains("# TYPE istio_requests_total counter\n"),
            "{text}"
        );
        let requests = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .unwrap();
        assert!(requests.ends_with("} 2"), "{requests}");
        for label in [
            "reporter=\"source\"",
            "source_workload=\"pay\"",
            "source_principal=\"spiffe://td/ns/vm/sa/pay\"",
            "destination_workload=\"fe\"",
            "destination_service_name=\"payment\"",
            "response_code=\"200\"",
        ] {
            assert!(requests.contains(label), "{label} in {requests}");
        }
        // Durations of 12 ms: in the 25 ms bucket, not the 10 ms one.
        let bucket = |le: &str| {
            value_of(
                &text,
                "istio_request_duration_milliseconds_bucket{",
                &format!("le=\"{le}\""),
            )
        };
        assert_eq!(bucket("10"), "0");
        assert_eq!(bucket("25"), "2");
        assert_eq!(bucket("+Inf"), "2");
        assert!(text.contains("istio_request_duration_milliseconds_sum{"));
        assert_eq!(value_of(&text, "istio_response_bytes_sum{", ""), "5000");
    }

    #[test]
    fn label_sets_shared_by_lines_of_different_shapes_are_one_series() {
        let metrics = IstioMetrics::default();
        // Before a Telemetry change every metric shares one label set;
        // after it, the count has its own: the same labels still make one series.
        metrics.record_lines(line("1,1,1", &[&format!("rdqs={CLIENT}")]).as_bytes());
        metrics.record_lines(line("1,1,1", &[&format!("r={CLIENT}"), "dqs=other|@|@"]).as_bytes());
        let text = metrics.render(&own());
        let counts: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(counts.len(), 1, "{text}");
        assert!(counts[0].ends_with("} 2"));
    }

    #[test]
    fn tcp_counters_sum_their_values() {
        let metrics = IstioMetrics::default();
        let labels = "source|@|@|db;vm;db;v1;db;v1;|spiffe://td/ns/vm/sa/db|db.vm.svc.cluster.local;db;vm|tcp|||-|unknown|removed=response_code,grpc_response_status";
        metrics.record_lines(
            format!(
                "{}\n{}\n{}",
                line(",,", &[&format!("o={labels}")]),
                line(",40,1000", &[&format!("ctv={labels}")]),
                line(",2,3", &[&format!("ctv={labels}")]),
            )
            .as_bytes(),
        );
        let text = metrics.render(&own());
        let value = |name: &str| value_of(&text, &format!("{name}{{"), "");
        assert_eq!(value("istio_tcp_connections_opened_total"), "1");
        assert_eq!(value("istio_tcp_connections_closed_total"), "2");
        assert_eq!(value("istio_tcp_sent_bytes_total"), "1003");
        assert_eq!(value("istio_tcp_received_bytes_total"), "42");
        assert!(!text.contains("response_code="), "{text}");
        assert!(!text.contains("istio_requests_total"), "{text}");
    }

    #[test]
    fn broken_lines_are_counted_and_escapes_survive() {
        let metrics = IstioMetrics::default();
        metrics.record_lines(b"garbage\n\xff\xfe\n");
        // A broken set spoils its line: the good set before it is not counted.
        metrics.record_lines(line("1,1,1", &["r=counted|not", "broken"]).as_bytes());
        // A value that is no measurement is not one.
        metrics.record_lines(line("NaN,-4,1", &["dq=measured|@|@"]).as_bytes());
        metrics
            .record_lines(line("1,1,1", &["r=source|@|@|||||||||path=/a\"b\\c|empty="]).as_bytes());
        let text = metrics.render(&own());
        assert!(
            text.contains("vmesh_agent_metrics_log_dropped_total{reason=\"malformed\"} 3"),
            "{text}"
        );
        assert!(!text.contains("counted"), "{text}");
        assert!(!text.contains("NaN"), "{text}");
        assert!(
            !text.contains("reporter=\"measured\""),
            "no histogram observes what is no measurement: {text}"
        );
        assert!(
            text.contains("path=\"/a\\\"b\\\\c\",empty=\"\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn label_sets_beyond_the_limit_are_dropped_and_counted() {
        let metrics = IstioMetrics::default();
        let lines: Vec<String> = (0..MAX_LABEL_SETS + 5)
            .map(|i| line("1,1,1", &[&format!("r=source|@|@|||||||||n={i}")]))
            .collect();
        metrics.record_lines(lines.join("\n").as_bytes());
        let text = metrics.render(&own());
        assert!(
            text.contains(
                "vmesh_agent_metrics_log_dropped_total{reason=\"too_many_label_sets\"} 5"
            ),
            "dropped"
        );
        assert!(
            text.contains("vmesh_agent_metrics_log_dropped_total{reason=\"malformed\"} 0"),
            "dropped for the cap, not as malformed: {text}"
        );
    }

    #[tokio::test]
    async fn lines_written_to_the_pipe_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(vmesh_api::peer::METRICS_LOG_FILE);
        let pipe = open_log(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let metrics = Arc::new(IstioMetrics::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(metrics.clone().follow(pipe, path.clone(), stopped));
        // As Envoy does: open for appending, write in pieces.
        let mut writer = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let request = line("3,10,20", &[&format!("rdqs={CLIENT}")]);
        let text = format!("{request}\n{request}\n");
        let (first, second) = text.split_at(text.len() / 3);
        use std::io::Write;
        writer.write_all(first.as_bytes()).unwrap();
        writer.flush().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        writer.write_all(second.as_bytes()).unwrap();
        drop(writer);
        let mut counted = String::new();
        for _ in 0..100 {
            counted = metrics.render(&own());
            if counted.contains("} 2\n") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            counted
                .lines()
                .any(|l| l.starts_with("istio_requests_total{") && l.ends_with("} 2")),
            "{counted}"
        );
        stop.send_replace(true);
        task.await.unwrap();
        assert!(!path.exists(), "the pipe is removed at shutdown");
    }
}
