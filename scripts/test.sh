#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh machine, then runs
# formatting, lints and every test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use (none yet beyond the Rust toolchain; the xDS,
# agent and DNS milestones add envoy, iptables, iproute2 and etcd here).
if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
