//! Istio's standard metrics as Prometheus should see them. Envoy exports
//! the stats its stats access logger makes (see the xds crate's
//! `translate/telemetry.rs`) as `envoy_istio_<name>{labels="…"}`: one
//! compact tag holding every label, which is what keeps them cheap in
//! Envoy. The agent's merged endpoint serves them as
//! `istio_<name>{a="1",b="2"}`, Istio's names and labels
//! (`vmesh_api::peer::expand_labels`, with the proxy's own workload filled
//! in), each family once, after everything else; the duration histogram
//! that also counts requests (`peer::COUNTING_DURATION_STAT`) gives
//! `istio_requests_total` its counts. Every other line passes through
//! unchanged.
//!
//! This module rewrites text; it does not fetch or serve it (`status` does).

use std::collections::BTreeMap;

use vmesh_api::peer::{COUNTING_DURATION_STAT, METRIC_LABELS_TAG, OwnWorkload, expand_labels};

const ENVOY_PREFIX: &str = "envoy_istio_";
const REQUESTS_TOTAL: &str = "istio_requests_total";

/// One of Istio's metric families: its type and sample lines.
#[derive(Default)]
struct Family {
    kind: String,
    samples: Vec<String>,
}

/// Envoy's Prometheus text with Istio's metrics under Istio's names and
/// labels, `own` filled in where Envoy leaves the proxy's own workload.
pub fn rewrite(envoy: &str, own: &OwnWorkload) -> String {
    let mut out = String::with_capacity(envoy.len());
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    // The Envoy family (without its prefix) the lines belong to, while
    // they are Istio's.
    let mut current: Option<&str> = None;
    for line in envoy.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            current = name.strip_prefix(ENVOY_PREFIX);
            match current {
                Some(family) => families.entry(istio_name(family)).or_default().kind = kind.into(),
                None => push_line(&mut out, line),
            }
            continue;
        }
        if line.starts_with('#') {
            if current.is_none() {
                push_line(&mut out, line);
            }
            continue;
        }
        let Some(sample) = rewrite_sample(line, current, own) else {
            current = None;
            push_line(&mut out, line);
            continue;
        };
        if let Some(count) = &sample.requests_total {
            let family = families.entry(REQUESTS_TOTAL.into()).or_default();
            family.kind = "counter".into();
            family.samples.push(count.clone());
        }
        families
            .entry(sample.family)
            .or_default()
            .samples
            .push(sample.line);
    }
    for (name, family) in families {
        let kind = if family.kind.is_empty() {
            "untyped"
        } else {
            &family.kind
        };
        push_line(&mut out, &format!("# TYPE {name} {kind}"));
        for sample in family.samples {
            push_line(&mut out, &sample);
        }
    }
    out
}

fn push_line(out: &mut String, line: &str) {
    out.push_str(line);
    out.push('\n');
}

/// Istio's name of the family of Envoy's `envoy_istio_<family>`.
fn istio_name(family: &str) -> String {
    let family = if family == COUNTING_DURATION_STAT {
        "request_duration_milliseconds"
    } else {
        family
    };
    format!("istio_{family}")
}

/// A sample of Istio's, rewritten.
struct Sample {
    family: String,
    line: String,
    /// The same count as `istio_requests_total`, for the counting histogram.
    requests_total: Option<String>,
}

/// One sample line rewritten, or `None` when it is not one of Istio's
/// metrics (or cannot be read).
fn rewrite_sample(line: &str, current: Option<&str>, own: &OwnWorkload) -> Option<Sample> {
    let rest = line.strip_prefix(ENVOY_PREFIX)?;
    let open = rest.find(['{', ' ']).unwrap_or(rest.len());
    let name = &rest[..open];
    // `_bucket`, `_sum`, `_count` of a histogram; nothing for a counter.
    let (family, suffix) = match current {
        Some(family) if name.starts_with(family) => (family, &name[family.len()..]),
        _ => (name, ""),
    };
    let (labels, value) = match rest[open..].strip_prefix('{') {
        Some(labels) => parse_labels(labels)?,
        None => (Vec::new(), &rest[open..]),
    };
    let mut expanded: Vec<(String, String)> = Vec::new();
    for (label, text) in labels {
        if label == METRIC_LABELS_TAG {
            expanded.extend(expand_labels(&text, own));
        } else {
            expanded.push((label, text));
        }
    }
    let labels: Vec<String> = expanded
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", labels.join(","))
    };
    let family = istio_name(family);
    let requests_total = (name == format!("{COUNTING_DURATION_STAT}_count"))
        .then(|| format!("{REQUESTS_TOTAL}{labels}{value}"));
    Some(Sample {
        line: format!("{family}{suffix}{labels}{value}"),
        family,
        requests_total,
    })
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

    fn own() -> OwnWorkload {
        OwnWorkload {
            attributes: "pay;vm;pay;v1;pay;v1;".into(),
            principal: "spiffe://td/ns/vm/sa/pay".into(),
        }
    }

    const TAG: &str = "destination|web;shop;web;v1;web;v1;c|spiffe://td/ns/shop/sa/web|@|@|pay.vm.svc.cluster.local;pay;vm|http|200|-|-|mutual_tls";

    #[test]
    fn the_counting_histogram_gives_requests_total_and_families_come_last() {
        let envoy = format!(
            "# TYPE envoy_cluster_upstream_rq counter\n\
             envoy_cluster_upstream_rq{{envoy_cluster_name=\"x\"}} 2\n\
             # TYPE envoy_istio_request_bytes histogram\n\
             envoy_istio_request_bytes_count{{labels=\"{TAG}\"}} 3\n\
             # TYPE envoy_istio_{COUNTING_DURATION_STAT} histogram\n\
             envoy_istio_{COUNTING_DURATION_STAT}_bucket{{labels=\"{TAG}\",le=\"0.5\"}} 1\n\
             envoy_istio_{COUNTING_DURATION_STAT}_count{{labels=\"{TAG}\"}} 3\n\
             # TYPE envoy_server_live gauge\n\
             envoy_server_live 1\n"
        );
        let text = rewrite(&envoy, &own());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "# TYPE envoy_cluster_upstream_rq counter");
        assert_eq!(lines[2], "# TYPE envoy_server_live gauge");
        assert_eq!(lines[3], "envoy_server_live 1");
        assert_eq!(lines[4], "# TYPE istio_request_bytes histogram", "{text}");
        assert!(lines[5].starts_with(
            "istio_request_bytes_count{reporter=\"destination\",source_workload=\"web\","
        ));
        assert_eq!(
            lines[6],
            "# TYPE istio_request_duration_milliseconds histogram"
        );
        assert!(
            lines[7].starts_with(
                "istio_request_duration_milliseconds_bucket{reporter=\"destination\","
            )
        );
        assert!(lines[7].ends_with(",le=\"0.5\"} 1"), "{}", lines[7]);
        assert!(lines[8].starts_with("istio_request_duration_milliseconds_count{"));
        assert_eq!(lines[9], "# TYPE istio_requests_total counter");
        assert!(lines[10].starts_with("istio_requests_total{reporter=\"destination\","));
        assert!(
            lines[10].contains("destination_workload=\"pay\""),
            "{}",
            lines[10]
        );
        assert!(lines[10].contains("destination_principal=\"spiffe://td/ns/vm/sa/pay\""));
        assert!(lines[10].contains("destination_service_name=\"pay\""));
        assert!(lines[10].ends_with("} 3"));
        assert_eq!(lines.len(), 11);
    }

    #[test]
    fn a_plain_counter_and_the_counting_histogram_make_one_family() {
        let envoy = format!(
            "# TYPE envoy_istio_requests_total counter\n\
             envoy_istio_requests_total{{labels=\"{TAG}\"}} 7\n\
             # TYPE envoy_istio_{COUNTING_DURATION_STAT} histogram\n\
             envoy_istio_{COUNTING_DURATION_STAT}_count{{labels=\"{}\"}} 2\n",
            TAG.replacen("destination", "source", 1)
        );
        let text = rewrite(&envoy, &own());
        assert_eq!(
            text.matches("# TYPE istio_requests_total counter").count(),
            1,
            "{text}"
        );
        assert_eq!(text.matches("\nistio_requests_total{").count(), 2, "{text}");
    }

    #[test]
    fn escapes_survive_and_broken_lines_pass_through() {
        let line = r#"envoy_istio_requests_total{labels="source|@|@|||||||||path=/a\"b|empty="} 1"#;
        let text = rewrite(line, &own());
        assert!(text.contains("path=\"/a\\\"b\",empty=\"\"} 1\n"), "{text}");
        assert!(
            text.contains("source_principal=\"spiffe://td/ns/vm/sa/pay\""),
            "{text}"
        );
        let broken = "envoy_istio_requests_total{labels=\"unterminated} 1";
        assert_eq!(rewrite(broken, &own()), format!("{broken}\n"));
    }
}
