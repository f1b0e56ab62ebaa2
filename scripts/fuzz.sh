#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz: libFuzzer) of what ingest reads from the
# internet, one target after the other (fuzz/fuzz_targets/):
#   envelope  weir's /v1/events bodies, JSON and NDJSON
#   sdk       Segment's (and RudderStack's) tracking API and PostHog's capture API
#   gunzip    gzip request bodies, inflated under a limit
# Each must answer every input with events or a refusal carrying a documented code,
# never a panic; what it accepts must be a valid weir event. The short, property-based
# version of the same checks runs in CI (tests/fuzz.rs).
#
# Needs a nightly Rust toolchain (coverage instrumentation); installs cargo-fuzz from
# crates.io when it is missing. The corpus grows in fuzz/corpus/TARGET (seeded from
# fuzz/seeds/TARGET), and an input that fails is written to fuzz/artifacts/TARGET/,
# replayed with `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...`.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 600, every target)
# Environment: WEIR_FUZZ_JOBS (parallel fuzzing processes per target, default 1),
#   CARGO_TARGET_DIR (default ~/.cache/weir/fuzz-target).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
seconds="${1:-600}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(envelope sdk gunzip)
jobs="${WEIR_FUZZ_JOBS:-1}"
parallel=()
[ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh needs a nightly Rust toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz from crates.io"
  cargo install --locked cargo-fuzz
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/fuzz-target}"

cd "$ROOT/fuzz"
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  echo "==> fuzzing $target for ${seconds} s"
  # No sanitizer: weir is safe Rust; what is looked for is a panic or a broken rule,
  # and without ASan's overhead libFuzzer runs several times more inputs.
  cargo +nightly fuzz run --sanitizer none --release "$target" \
    "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=4096 \
    "${parallel[@]}" -print_final_stats=1 \
    -artifact_prefix="artifacts/$target/"
done
