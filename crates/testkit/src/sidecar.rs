//! A bare Envoy sidecar driven straight from `vmesh server`'s plaintext xDS
//! port, for the tests of what the server sends (no agent in between): its
//! bootstrap, its sync state as `vmesh proxy-status` shows it, and requests
//! through it to `vmesh demo-app` backends.

use std::path::Path;

use crate::netns::Namespace;

/// The sidecar's node id: the frontend VM at 127.0.0.9 in vm-workloads.
pub const SIDECAR_ID: &str =
    "sidecar~127.0.0.9~frontend.vm-workloads~vm-workloads.svc.cluster.local";

/// An Istio-style bootstrap: ADS of `api_type` (`GRPC` or `DELTA_GRPC`) from
/// 127.0.0.1:`xds_port`, admin on 127.0.0.1:15000, in us-west1/zone-a.
pub fn bootstrap(xds_port: u16, api_type: &str) -> String {
    format!(
        r#"{{
  "node": {{"id": "{SIDECAR_ID}", "cluster": "frontend.vm-workloads",
            "locality": {{"region": "us-west1", "zone": "zone-a"}},
            "metadata": {{"NAMESPACE": "vm-workloads", "SERVICE_ACCOUNT": "frontend-sa"}}}},
  "dynamic_resources": {{
    "ads_config": {{"api_type": "{api_type}", "transport_api_version": "V3", "grpc_services": [{{"envoy_grpc": {{"cluster_name": "xds-grpc"}}}}]}},
    "cds_config": {{"ads": {{}}, "resource_api_version": "V3"}},
    "lds_config": {{"ads": {{}}, "resource_api_version": "V3"}}
  }},
  "static_resources": {{"clusters": [{{
    "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
    "typed_extension_protocol_options": {{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {{
      "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
      "explicit_http_config": {{"http2_protocol_options": {{}}}}}}}},
    "load_assignment": {{"cluster_name": "xds-grpc", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {xds_port}}}}}}}}}]}}]}}
  }}]}},
  "admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 15000}}}}}}
}}"#
    )
}

/// `Some` when `vmesh proxy-status` (run inside `ns` with `vmesh`) shows the
/// sidecar SYNCED for CDS, LDS, EDS and RDS.
pub fn synced(ns: &Namespace, vmesh: &str) -> Option<()> {
    let table = ns.run(&[vmesh, "proxy-status"]);
    assert!(table.starts_with("NAME"), "{table}");
    let row = table.lines().find(|l| l.starts_with(SIDECAR_ID))?;
    (row.split_whitespace().skip(2).collect::<Vec<_>>() == ["SYNCED"; 4]).then_some(())
}

/// GET `url` from inside `ns` (with `header`, if any): the name of the
/// `vmesh demo-app` that answered, which says `name=N version=V path=P`.
pub fn demo_app_name(ns: &Namespace, url: &str, header: Option<&str>) -> Option<String> {
    let mut args = vec!["curl", "-s", "--max-time", "2"];
    if let Some(header) = header {
        args.extend(["-H", header]);
    }
    args.push(url);
    let output = ns.command(&args).output().ok()?;
    let body = String::from_utf8_lossy(&output.stdout).into_owned();
    let name = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("name="))?
        .to_string();
    output.status.success().then_some(name)
}

/// Starts the sidecar in `ns`: Envoy (found as the tests find it) with
/// [`bootstrap`] written to `dir`, its log beside it, `base_id` apart from
/// other Envoys of the run. It runs in `dir`, where the metrics log its
/// listeners name relatively is (a plain file here: no agent reads it).
pub fn start(ns: &Namespace, dir: &Path, xds_port: u16, api_type: &str, base_id: &str) {
    let envoy = crate::testing::envoy_binary();
    let config = dir.join("bootstrap.json");
    std::fs::write(&config, bootstrap(xds_port, api_type)).unwrap();
    let log = std::fs::File::create(dir.join("envoy.log")).unwrap();
    let child = ns
        .command(&[
            "setpriv",
            "--pdeathsig",
            "KILL",
            "--",
            envoy.to_str().unwrap(),
            "-c",
            config.to_str().unwrap(),
            "--base-id",
            base_id,
            "-l",
            "warning",
        ])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    ns.adopt(child);
}
