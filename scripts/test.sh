#!/usr/bin/env bash
# Runs every check and test of weir, installing what is missing first:
#   formatting, clippy, unit tests, integration and end-to-end tests against real
#   servers (each test starts its own Tansu/ClickHouse on free loopback ports), and
#   the demo (scripts/demo.sh) on the default ports, and every benchmark scenario of
#   scripts/bench.sh in smoke mode.
# Usage: scripts/test.sh
# Environment: CARGO_TARGET_DIR (default ~/.cache/weir/target: reused between runs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

step() { printf '\n==> %s\n' "$*"; }
started=$(date +%s)

step "Installing what is missing (apt packages, Tansu, wasm32-wasip2)"
scripts/stack.sh install

# The cached target directory grows with every build: each test binary of each build is
# kept (hundreds of MB with debug info). Test and bench executables untouched for two
# days go (cargo relinks one if it is needed again), and the incremental cache when it
# passes 15 GiB. A full disk made the linker die with a bus error.
step "Pruning stale build outputs in $CARGO_TARGET_DIR"
mkdir -p "$CARGO_TARGET_DIR"
for dir in "$CARGO_TARGET_DIR"/{debug,release}/deps; do
  [ -d "$dir" ] && find "$dir" -maxdepth 1 -type f -executable ! -name '*.so' -mtime +2 -delete
done
if [ -d "$CARGO_TARGET_DIR/debug/incremental" ] &&
  [ "$(du -sm "$CARGO_TARGET_DIR/debug/incremental" | cut -f1)" -gt 15360 ]; then
  rm -rf "$CARGO_TARGET_DIR/debug/incremental"
fi
df -h "$CARGO_TARGET_DIR" | tail -n 1

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# Two tests are run apart, below, to show what they print.
step "cargo test (unit, integration and end-to-end tests)"
cargo test --workspace -- --skip a_replica_killed_for_30_s --skip every_statement_weir_emits

step "Replicated ClickHouse under a replica's crash, and weir's SQL on a current ClickHouse (with what they print)"
cargo test -p weir-tests --test replicated --test chdb -- --show-output a_replica_killed_for_30_s every_statement_weir_emits

step "The demo (scripts/demo.sh), then stop it"
trap 'scripts/demo.sh stop >/dev/null 2>&1 || true' EXIT
scripts/demo.sh

step "Benchmark scenarios in smoke mode (a few seconds each; weir's metrics checked against the harness)"
scripts/bench.sh ingest --smoke
scripts/bench.sh ingest --smoke --api segment
scripts/bench.sh full --smoke
scripts/bench.sh hotswap --smoke
scripts/bench.sh noisy --smoke
scripts/bench.sh plugin --smoke
scripts/bench.sh drain --smoke
scripts/bench.sh guard --smoke
scripts/bench.sh dedup-memory --smoke

scripts/demo.sh stop
trap - EXIT

step "All checks passed in $(( $(date +%s) - started )) s"
