//! Istio's standard metrics as Prometheus should see them. Envoy exports
//! the stats its stats access logger makes (see the xds crate's
//! `translate/telemetry.rs`) as `envoy_istio_<name>{labels="a=1|b=2"}`: one
//! tag holding every label (workloads' attributes encoded in its `source`
//! and `destination` pairs), which is what keeps them cheap in Envoy. The
//! agent's merged endpoint serves them as `istio_<name>{a="1",b="2"}`,
//! Istio's names and labels (`vmesh_api::peer::expand_labels`); every other
//! line passes through unchanged.
//!
//! This module rewrites text; it does not fetch or serve it (`status` does).

use vmesh_api::peer::{METRIC_LABELS_TAG, expand_labels};

const ENVOY_PREFIX: &str = "envoy_istio_";

/// Envoy's Prometheus text with Istio's metrics under Istio's names and labels.
pub fn rewrite(envoy: &str) -> String {
    let mut out = String::with_capacity(envoy.len());
    for line in envoy.lines() {
        match rewrite_line(line) {
            Some(rewritten) => out.push_str(&rewritten),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// One line rewritten, or `None` when it is not one of Istio's metrics.
fn rewrite_line(line: &str) -> Option<String> {
    for comment in ["# TYPE ", "# HELP "] {
        if let Some(rest) = line.strip_prefix(comment) {
            let name = rest.strip_prefix(ENVOY_PREFIX)?;
            return Some(format!("{comment}istio_{name}"));
        }
    }
    let rest = line.strip_prefix(ENVOY_PREFIX)?;
    let Some(open) = rest.find('{') else {
        return Some(format!("istio_{rest}"));
    };
    let name = &rest[..open];
    let (labels, value) = parse_labels(&rest[open + 1..])?;
    let mut expanded: Vec<(String, String)> = Vec::new();
    for (label, text) in labels {
        if label == METRIC_LABELS_TAG {
            expanded.extend(expand_labels(&text));
        } else {
            expanded.push((label, text));
        }
    }
    let labels: Vec<String> = expanded
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    Some(format!("istio_{name}{{{}}}{value}", labels.join(",")))
}

/// The labels of a sample line after its `{`, and what follows the `}`.
fn parse_labels(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = &after[end + 1..];
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

    #[test]
    fn istio_metrics_get_istio_names_and_their_labels() {
        let envoy = "# TYPE envoy_istio_requests_total counter\n\
            envoy_istio_requests_total{labels=\"reporter=source|destination_principal=spiffe://td/ns/a/sa/b|response_flags=-\"} 7\n\
            # TYPE envoy_istio_request_duration_milliseconds histogram\n\
            envoy_istio_request_duration_milliseconds_bucket{labels=\"reporter=destination|response_code=200\",le=\"0.5\"} 3\n\
            envoy_cluster_upstream_rq{envoy_cluster_name=\"x\"} 2\n";
        assert_eq!(
            rewrite(envoy),
            "# TYPE istio_requests_total counter\n\
             istio_requests_total{reporter=\"source\",destination_principal=\"spiffe://td/ns/a/sa/b\",response_flags=\"-\"} 7\n\
             # TYPE istio_request_duration_milliseconds histogram\n\
             istio_request_duration_milliseconds_bucket{reporter=\"destination\",response_code=\"200\",le=\"0.5\"} 3\n\
             envoy_cluster_upstream_rq{envoy_cluster_name=\"x\"} 2\n"
        );
    }

    #[test]
    fn encoded_workloads_become_istios_labels() {
        let line = "envoy_istio_requests_total{labels=\"reporter=source|source=web;shop;web;v1;web;v1;c|destination=unknown\"} 2";
        let rewritten = rewrite(line);
        assert!(rewritten.starts_with("istio_requests_total{reporter=\"source\",source_workload=\"web\",source_workload_namespace=\"shop\",source_canonical_service=\"web\",source_canonical_revision=\"v1\",source_app=\"web\",source_version=\"v1\",source_cluster=\"c\",destination_workload=\"unknown\","), "{rewritten}");
        assert!(
            rewritten.ends_with("destination_cluster=\"unknown\"} 2\n"),
            "{rewritten}"
        );
    }

    #[test]
    fn escapes_survive_and_broken_lines_pass_through() {
        let line = r#"envoy_istio_requests_total{labels="path=/a\"b|empty="} 1"#;
        assert_eq!(
            rewrite(line),
            "istio_requests_total{path=\"/a\\\"b\",empty=\"\"} 1\n"
        );
        let broken = "envoy_istio_requests_total{labels=\"unterminated} 1";
        assert_eq!(rewrite(broken), format!("{broken}\n"));
    }
}
