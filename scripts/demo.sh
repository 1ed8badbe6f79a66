#!/usr/bin/env bash
# The main job: build vmesh and run `vmesh demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release -p vmesh
exec ./target/release/vmesh demo "$@"
