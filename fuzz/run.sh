#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation on stable
# Rust (the flags cargo-fuzz uses, minus the nightly-only sanitizer) and runs
# each for $1 seconds (default 20). Corpora are kept in fuzz/corpus/.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-20}"
# Instrumented builds get their own target directory, whatever the caller set.
export CARGO_TARGET_DIR="$PWD/target"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the instrumentation out of build scripts and
# proc macros, as cargo-fuzz does.
triple="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --release --bins --target "$triple"
for target in key_parser path_check; do
  mkdir -p "corpus/$target"
  cp seeds/"$target"/* "corpus/$target/"
  ./target/"$triple"/release/"$target" "corpus/$target" -max_total_time="$seconds" -print_final_stats=1 2>&1 | tail -n 4
done
