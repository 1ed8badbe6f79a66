//! istioctl's `secret` table and `bootstrap -o short` summary, from an
//! Envoy config dump in Envoy's JSON: each secret's certificate (its chain's
//! first, or the trusted CA) parsed for its serial number and validity.

use std::time::SystemTime;

use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use serde_json::Value;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::tables::section;
use crate::output::align;

/// One secret as the table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRow {
    pub name: String,
    /// `Cert Chain` or `CA`; empty when there is no certificate.
    pub kind: String,
    /// ACTIVE, WARMING or UNINITIALIZED.
    pub state: String,
    pub valid: bool,
    /// The serial number in hex, zero-padded to 32 digits (istioctl's `%032x`).
    pub serial: String,
    pub not_after: String,
    pub not_before: String,
    /// From the certificate's SPIFFE URI, if any.
    pub trust_domain: String,
}

/// The secrets of `dump`: warming ones, then active ones.
pub fn secrets(dump: &Value, now: SystemTime) -> Vec<SecretRow> {
    let Some(section) = section(dump, "SecretsConfigDump") else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for (list, state) in [
        ("dynamic_warming_secrets", "WARMING"),
        ("dynamic_active_secrets", "ACTIVE"),
    ] {
        for secret in section[list].as_array().into_iter().flatten() {
            let state = if secret["version_info"] == "uninitialized" {
                "UNINITIALIZED"
            } else {
                state
            };
            rows.push(secret_row(secret, state, now));
        }
    }
    rows
}

fn secret_row(secret: &Value, state: &str, now: SystemTime) -> SecretRow {
    let body = &secret["secret"];
    let inline = |source: &Value| {
        source["inline_bytes"]
            .as_str()
            .and_then(|b| BASE64_STANDARD.decode(b).ok())
            .or_else(|| {
                source["inline_string"]
                    .as_str()
                    .map(|s| s.as_bytes().to_vec())
            })
    };
    let pem = inline(&body["tls_certificate"]["certificate_chain"])
        .or_else(|| inline(&body["validation_context"]["trusted_ca"]));
    let mut row = SecretRow {
        name: secret["name"].as_str().unwrap_or_default().to_string(),
        kind: String::new(),
        state: state.to_string(),
        valid: false,
        serial: String::new(),
        not_after: String::new(),
        not_before: String::new(),
        trust_domain: String::new(),
    };
    if let Some(certificate) = pem.as_deref().and_then(first_certificate) {
        fill(&mut row, &certificate, now);
    }
    row
}

/// The DER of the first PEM certificate in `pem`.
fn first_certificate(pem: &[u8]) -> Option<Vec<u8>> {
    ::pem::parse_many(pem)
        .ok()?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
}

fn fill(row: &mut SecretRow, der: &[u8], now: SystemTime) {
    let Ok((_, certificate)) = X509Certificate::from_der(der) else {
        return;
    };
    let validity = certificate.validity();
    let rfc3339 = |t: x509_parser::time::ASN1Time| {
        t.to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let seconds = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    row.kind = if certificate.is_ca() {
        "CA"
    } else {
        "Cert Chain"
    }
    .into();
    row.serial = serial_hex(certificate.raw_serial());
    row.not_after = rfc3339(validity.not_after);
    row.not_before = rfc3339(validity.not_before);
    row.valid =
        validity.not_before.timestamp() < seconds && seconds < validity.not_after.timestamp();
    if let Ok(Some(names)) = certificate.subject_alternative_name() {
        for name in &names.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && let Some(rest) = uri.strip_prefix("spiffe://")
            {
                row.trust_domain = rest.split('/').next().unwrap_or_default().to_string();
            }
        }
    }
}

/// A serial number as Go's `%032x` prints the integer: no leading zeros,
/// padded with zeros to 32 digits.
pub fn serial_hex(raw: &[u8]) -> String {
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let digits = hex.trim_start_matches('0');
    format!("{digits:0>32}")
}

/// RESOURCE NAME, TYPE, STATUS, VALID CERT, SERIAL NUMBER, NOT AFTER, NOT
/// BEFORE, and TRUST DOMAIN when every secret has one (istioctl's rule).
pub fn secret_table(rows: &[SecretRow]) -> String {
    if rows.is_empty() {
        return "No active or warming secrets found.\n".into();
    }
    let mut headers = vec![
        "RESOURCE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
    ];
    let with_domain = rows.iter().all(|r| !r.trust_domain.is_empty());
    if with_domain {
        headers.push("TRUST DOMAIN");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![
                r.name.clone(),
                r.kind.clone(),
                r.state.clone(),
                r.valid.to_string(),
                r.serial.clone(),
                r.not_after.clone(),
                r.not_before.clone(),
            ];
            if with_domain {
                cells.push(r.trust_domain.clone());
            }
            cells
        })
        .collect();
    align(&headers, &cells)
}

/// istioctl's `bootstrap -o short`: the Istio version the node claims and
/// the Envoy build it runs (`major.minor.patch[-label][/status][/type][/ssl]`).
pub fn bootstrap_summary(dump: &Value) -> String {
    let node = section(dump, "BootstrapConfigDump")
        .map(|b| &b["bootstrap"]["node"])
        .unwrap_or(&Value::Null);
    let mut lines: Vec<[String; 2]> = Vec::new();
    if let Some(version) = node["metadata"]["ISTIO_VERSION"].as_str() {
        lines.push(["Istio Version:".into(), version.into()]);
    }
    if let Some(sha) = node["metadata"]["ISTIO_PROXY_SHA"].as_str() {
        let sha = sha.split_once(':').map_or(sha, |(_, s)| s);
        lines.push(["Istio Proxy Version:".into(), sha.into()]);
    }
    let build = &node["user_agent_build_version"];
    let version = &build["version"];
    let mut envoy = format!(
        "{}.{}.{}",
        version["major_number"].as_u64().unwrap_or(0),
        version["minor_number"].as_u64().unwrap_or(0),
        version["patch"].as_u64().unwrap_or(0)
    );
    for (key, separator) in [
        ("build.label", "-"),
        ("revision.status", "/"),
        ("build.type", "/"),
        ("ssl.version", "/"),
    ] {
        if let Some(value) = build["metadata"][key].as_str() {
            envoy.push_str(separator);
            envoy.push_str(value);
        }
    }
    lines.push(["Envoy Version:".into(), envoy]);
    let width = lines.iter().map(|l| l[0].len()).max().unwrap_or(0);
    lines
        .iter()
        .map(|l| format!("{:<width$} {}\n", l[0], l[1]))
        .collect()
}
