#!/usr/bin/env bash
# The fault suite in full (tests/faults.rs with WEIR_FAULTS=full): 20,000 events per
# case, five SIGKILLs, 30 s outages of ClickHouse, Redis and the broker, ... on a fresh stack per
# case; prints the lost/duplicated table at the end. The short version runs in
# scripts/test.sh (cargo test). Takes about 12 minutes on 2 cores (677 s of tests, seen on 2026-12-07).
# Usage: scripts/faults.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
scripts/stack.sh install
WEIR_FAULTS=full exec cargo test -p weir-tests --test faults -- --nocapture
