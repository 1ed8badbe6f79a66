#!/usr/bin/env bash
# Runs the fuzz targets under fuzz/ with cargo fuzz (libFuzzer, nightly Rust):
#   scripts/fuzz.sh [SECONDS [TARGET...]]
# each target for SECONDS (default 30, what CI runs), all targets unless
# named. The corpus lives in fuzz/corpus/<target> and grows as the fuzzer
# finds new paths; a crash stops the run and leaves its input in
# fuzz/artifacts/<target>. Installs nightly and cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
[ "$#" -gt 0 ] && shift
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(decode_manifests decode_apply_list api_request xds_request)
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

mkdir -p fuzz/logs
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  echo "fuzz.sh: $target for ${seconds}s"
  log="fuzz/logs/$target.log"
  status=0
  cargo +nightly fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|^Done' "$log" | sed 's/^/  /' || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log" >&2
    echo "fuzz.sh: $target failed (exit $status); the input is in fuzz/artifacts/$target" >&2
    exit "$status"
  fi
done
echo "fuzz.sh: every target ran ${seconds}s without a crash"
