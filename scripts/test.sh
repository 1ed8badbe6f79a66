#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh machine, then runs
# formatting, lints and every test. CI runs exactly this (.ci/run).
#
# It fails, too, when the tests leave anything behind: a process they started
# (Envoy, a vmesh server, agent or demo application, dnsmasq, Prometheus,
# Zipkin) still running,
# or a network namespace that was not there before. Whatever is left is listed
# and then removed, so that one bad run does not spoil the next.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
scripts/install-deps.sh
# A clean build with its tests takes about 5 GB; say what there is, since a full
# disk otherwise shows up only as a compiler's I/O error.
df -h --output=avail,target . | sed 's/^/test.sh: disk /'

# The processes tests start, by command name, with their pids.
started_processes() {
  ps -eo pid=,comm= | awk '$2 == "envoy" || $2 == "vmesh" || $2 == "dnsmasq" || $2 == "prometheus" || $2 == "java" || $2 == "etcd" { print $1 }' | sort
}
network_namespaces() {
  { ip netns list 2>/dev/null | awk '{ print $1 }'; ls /etc/netns 2>/dev/null | sed 's|^|/etc/netns/|'; } | sort -u
}
processes_before=$(started_processes)
namespaces_before=$(network_namespaces)

status=0
cargo fmt --all -- --check || status=$?
if [ "$status" -eq 0 ]; then
  cargo clippy --workspace --all-targets -- -D warnings || status=$?
fi
if [ "$status" -eq 0 ]; then
  cargo test --workspace || status=$?
fi
# A bounded fuzzing run of every target (hours-long runs: scripts/fuzz.sh 3600).
if [ "$status" -eq 0 ]; then
  scripts/fuzz.sh 30 || status=$?
fi

# Anything the tests started gets a moment to finish exiting.
for _ in $(seq 1 50); do
  left=$(comm -13 <(echo "$processes_before") <(started_processes))
  [ -z "$left" ] && break
  sleep 0.1
done
if [ -n "$left" ]; then
  echo "test.sh: the tests left these processes running:" >&2
  # shellcheck disable=SC2086 # one pid per word
  ps -o pid=,ppid=,args= -p $(echo $left | tr ' ' ',') >&2 || true
  # shellcheck disable=SC2086
  kill -KILL $left 2>/dev/null || true
  status=1
fi
left_namespaces=$(comm -13 <(echo "$namespaces_before") <(network_namespaces))
if [ -n "$left_namespaces" ]; then
  echo "test.sh: the tests left these network namespaces:" $left_namespaces >&2
  for ns in $left_namespaces; do
    case "$ns" in
      /etc/netns/*) rm -rf "$ns" ;;
      *)
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL || true
        ip netns delete "$ns" || true
        ;;
    esac
  done
  status=1
fi
if [ "$status" -eq 0 ]; then
  echo "test.sh: all passed; nothing left running"
fi
exit "$status"
