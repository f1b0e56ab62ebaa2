#!/usr/bin/env bash
# weir's benchmark scenarios, each one command. Restarts the local stack (the broker
# starts empty; the weir_bench database is dropped), starts weir with the scenario's
# configuration (examples/bench/), runs the load harness (weir-load) and stops weir. Figures are printed and written to .stack/bench-SCENARIO.json.
#
# Usage: scripts/bench.sh SCENARIO [--smoke] [weir-load options...]
#   ingest   HTTP -> Kafka only (processor off), at maximum rate
#   full     enrich + route plugins, events + profile_viewed tables, Redis counters, at
#            maximum rate, with freshness probes (ClickHouse and the counters API)
#   plugin   the plugin call path (criterion: batch sizes 1/64/256/1024)
#   hotswap  the full pipeline, from the control plane (weir apply), at a fixed rate
#            (10,000 events/s for 40 s), with a new pipeline version swapped in every
#            10 s: latency and freshness before, during and after the swaps
#   noisy    the noisy neighbour: app "quiet" at 1,000 events/s (with freshness probes)
#            alone, then beside app "noisy" offering 10x its quota (50,000 events/s
#            against 5,000), then beside the same flood with no quota: quiet's POST ->
#            row p99 in each phase (30 s each; --smoke: 4 s)
#   drain    how fast the processor empties a backlog: a topic pre-filled with N events
#            (weir-prefill), weir timed from its start until ClickHouse holds them all,
#            with the CPU of weir, ClickHouse and the broker and the machine's busy
#            cores; optionally beside Vector on the same events (scripts/bench-drain.sh
#            has the options: --events, --per-record, --pipeline, --rounds, --vector)
#   guard    the replay guard's lookups on an events table of 50,000,000 rows (--smoke:
#            1,000,000), weir's (coordinates views) against the old SQL (table scans),
#            warm and cold, and what the views cost an INSERT (on a scratch ClickHouse)
#   dedup-memory  Redis memory per deduplication claim: a million keys of the shape
#            weir writes (SET key claim NX GET EX 86400) on a scratch Redis
# --smoke: a few seconds, debug build, and weir's metrics checked against the harness
#          (what CI runs). Without it: 60 s on a release build.
# Extra options go to weir-load, e.g. `scripts/bench.sh full --rate 20000`.
# Environment: WEIR_BENCH_DEDUP=0 runs weir with deduplication off ([dedup] enabled =
# false), to measure what deduplication costs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
STACK_DIR="${WEIR_STACK_DIR:-$ROOT/.stack}"

die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

[ $# -ge 1 ] || die "usage: scripts/bench.sh ingest|full|hotswap|noisy|plugin|drain|guard|dedup-memory [--smoke] [weir-load options]"
SCENARIO="$1"; shift
if [ "$SCENARIO" = drain ]; then exec "$ROOT/scripts/bench-drain.sh" "$@"; fi
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
PROFILE="${WEIR_PROFILE:-$([ $SMOKE = 1 ] && echo dev || echo release)}"
profile_dir="$PROFILE"; [ "$PROFILE" = dev ] && profile_dir=debug

if [ "$SCENARIO" = dedup-memory ]; then
  # The key: {prefix}:d:{group}: and 16 bytes (weir: of SHA-256; here: of SHA-1 hex),
  # the value: 16 bytes (the claim's Kafka coordinates).
  KEYS=$([ $SMOKE = 1 ] && echo 10000 || echo 1000000)
  PORT=${WEIR_BENCH_REDIS_PORT:-6398}
  dir=$(mktemp -d)
  redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" --daemonize yes >/dev/null
  trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
  for _ in $(seq 1 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  used() { redis-cli -p "$PORT" info memory | awk -F: '/^used_memory:/ { print $2 }' | tr -d '\r'; }
  before=$(used)
  redis-cli -p "$PORT" eval "
    for i = 1, tonumber(ARGV[1]) do
      local key = 'weir:d:weir-processor:' .. string.sub(redis.sha1hex(tostring(i)), 1, 16)
      redis.call('SET', key, string.rep('c', 16), 'NX', 'GET', 'EX', 86400)
    end
    return redis.call('DBSIZE')" 0 "$KEYS" >/dev/null
  after=$(used)
  say "Deduplication claims in Redis $(redis-server --version | awk '{ print $3 }' | cut -d= -f2)"
  echo "keys               $KEYS"
  echo "memory             $(( (after - before) / KEYS )) bytes per claim, $(( (after - before) / 1048576 )) MiB in all"
  exit 0
fi

if [ "$SCENARIO" = guard ]; then
  scripts/stack.sh install
  if [ $SMOKE = 1 ]; then
    cargo bench -p weir-tests --bench replay_guard -- --smoke
  else
    cargo bench -p weir-tests --bench replay_guard
  fi
  exit 0
fi

if [ "$SCENARIO" = plugin ]; then
  if [ $SMOKE = 1 ]; then
    cargo bench -p weir-tests --bench plugin_call -- --quick --noplot
  else
    cargo bench -p weir-tests --bench plugin_call
  fi
  exit 0
fi

case "$SCENARIO" in
  ingest|full|noisy) CONFIG="$ROOT/examples/bench/$SCENARIO.toml" ;;
  hotswap) CONFIG="$ROOT/examples/bench/full.toml" ;;
  *) die "unknown scenario $SCENARIO (ingest, full, hotswap, noisy, plugin, drain, guard, dedup-memory)" ;;
esac
if [ "${WEIR_BENCH_DEDUP:-1}" = 0 ]; then
  # Beside the original: its relative paths (plugins/) stay valid.
  { cat "$CONFIG"; printf '\n[dedup]\nenabled = false\n'; } > "$ROOT/examples/bench/generated-no-dedup.toml"
  CONFIG="$ROOT/examples/bench/generated-no-dedup.toml"
fi

scripts/stack.sh install
# A fresh stack for every run: Tansu keeps everything in memory (a 60 s run at full
# speed leaves gigabytes), and the figures should not depend on earlier runs.
scripts/stack.sh down
scripts/stack.sh up
curl -sf http://127.0.0.1:8123/ --data-binary "DROP DATABASE IF EXISTS weir_bench" >/dev/null
rm -rf "$STACK_DIR/bench-control"

say "Building weir ($PROFILE), weir-load and the plugins"
cargo build --profile "$PROFILE" -p weir -p weir-load
cargo build --profile plugin --target wasm32-wasip2 -p weir-plugin-enrich -p weir-plugin-route-engagement
mkdir -p examples/bench/plugins
cp "$CARGO_TARGET_DIR/wasm32-wasip2/plugin/weir_plugin_enrich.wasm" examples/bench/plugins/enrich.wasm
cp "$CARGO_TARGET_DIR/wasm32-wasip2/plugin/weir_plugin_route_engagement.wasm" examples/bench/plugins/route.wasm
WEIR="$CARGO_TARGET_DIR/$profile_dir/weir"
LOAD="$CARGO_TARGET_DIR/$profile_dir/weir-load"

LOG="$STACK_DIR/bench-$SCENARIO.log"
mkdir -p "$STACK_DIR"
PID=
stop_weir() {
  [ -n "$PID" ] || return 0
  kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$PID" 2>/dev/null || { PID=; return 0; }; sleep 0.1; done
  kill -KILL "$PID" 2>/dev/null || true
  PID=
}
trap stop_weir EXIT
# Starts weir with config $1 and waits until it serves (and, unless this is the ingest
# scenario, until its processor owns partitions).
start_weir() {
  setsid "$WEIR" serve --config "$1" >>"$LOG" 2>&1 < /dev/null &
  PID=$!
  for _ in $(seq 1 300); do
    curl -sf http://127.0.0.1:8090/healthz >/dev/null 2>&1 && break
    kill -0 "$PID" 2>/dev/null || { tail -n 30 "$LOG"; die "weir exited at start (log: $LOG)"; }
    sleep 0.1
  done
  if [ "$SCENARIO" != ingest ]; then
    # The processor must own its partitions before the clock starts.
    owns() {
      local m
      m=$(curl -sf http://127.0.0.1:8090/metrics) || return 1
      grep -q '^weir_kafka_assigned_partitions [1-9]' <<<"$m"
    }
    for _ in $(seq 1 600); do owns && break; sleep 0.1; done
    owns || { tail -n 30 "$LOG"; die "the processor did not join its group (log: $LOG)"; }
  fi
}
: >"$LOG"

if [ "$SCENARIO" = noisy ]; then
  # App "quiet" posts at its usual rate with freshness probes (every 50 ms), alone, then
  # beside app "noisy" offering 10x its quota; then, for contrast, the same flood with
  # the quota taken away. The figure is quiet's POST -> row p99 in each phase.
  if [ $SMOKE = 1 ]; then SECS=4; QUIET_RATE=500; NOISY_RATE=20000
  else SECS=30; QUIET_RATE=1000; NOISY_RATE=50000; fi
  quiet() {  # $1: phase name; more weir-load options after it
    local phase=$1; shift
    "$LOAD" --url http://127.0.0.1:8090 --write-key wk_bench_000000000000000 --app bench \
      --clickhouse http://127.0.0.1:8123 --database weir_bench --scenario "noisy-$phase-quiet" \
      --rate "$QUIET_RATE" --clients 8 --batch 10 --duration "$SECS" --probe-every-ms 50 \
      --drain-timeout 120 --pid "$PID" --json "$STACK_DIR/bench-noisy-$phase-quiet.json" "$@"
  }
  noisy() {  # $1: phase name
    "$LOAD" --url http://127.0.0.1:8090 --write-key wk_noisy_00000000000000 --app noisy \
      --scenario "noisy-$1-noisy" --rate "$NOISY_RATE" --clients 32 --batch 100 \
      --duration "$SECS" --probe-every-ms 0 --json "$STACK_DIR/bench-noisy-$1-noisy.json"
  }
  p99() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["freshness_clickhouse"]["p99_ms"])' "$1"; }
  start_weir "$CONFIG"
  say "Phase 1: quiet alone ($QUIET_RATE events/s)"
  # Alone, weir's metrics count quiet's traffic only: the smoke run checks them.
  if [ $SMOKE = 1 ]; then quiet alone --verify; else quiet alone; fi
  say "Phase 2: quiet beside noisy at $NOISY_RATE events/s offered, $((NOISY_RATE / 5000))x its quota of 5,000"
  noisy quota > "$STACK_DIR/bench-noisy-quota-noisy.txt" &
  NOISY_PID=$!
  quiet quota
  wait "$NOISY_PID" || die "the noisy client failed"
  cat "$STACK_DIR/bench-noisy-quota-noisy.txt"
  stop_weir
  say "Phase 3: the same flood without the quota (for contrast)"
  grep -v '^events_per_sec' "$CONFIG" | sed 's/^\[app.quota\]$/# (quota removed)/' > "$ROOT/examples/bench/generated-noisy-no-quota.toml"
  start_weir "$ROOT/examples/bench/generated-noisy-no-quota.toml"
  noisy unlimited > "$STACK_DIR/bench-noisy-unlimited-noisy.txt" &
  NOISY_PID=$!
  quiet unlimited
  wait "$NOISY_PID" || die "the noisy client failed"
  cat "$STACK_DIR/bench-noisy-unlimited-noisy.txt"
  say "Quiet app's POST -> row p99 (ms)"
  alone=$(p99 "$STACK_DIR/bench-noisy-alone-quiet.json")
  with=$(p99 "$STACK_DIR/bench-noisy-quota-quiet.json")
  without=$(p99 "$STACK_DIR/bench-noisy-unlimited-quiet.json")
  echo "alone                       $alone"
  echo "beside a flood over quota   $with ($(python3 -c "print(f'{$with / $alone:.2f}')")x alone)"
  echo "beside the flood, no quota  $without ($(python3 -c "print(f'{$without / $alone:.2f}')")x alone)"
  exit 0
fi

start_weir "$CONFIG"

ADMIN=http://127.0.0.1:8091
ADMIN_TOKEN=at_bench_00000000000000
if [ "$SCENARIO" = hotswap ]; then
  say "Putting the pipeline in the control plane"
  WEIR_ADMIN_URL=$ADMIN WEIR_ADMIN_TOKEN=$ADMIN_TOKEN "$WEIR" apply -f examples/bench/control.toml
  for _ in $(seq 1 100); do
    WEIR_ADMIN_URL=$ADMIN WEIR_ADMIN_TOKEN=$ADMIN_TOKEN "$WEIR" status | grep -q "plugins \[enrich@1, route@1\]" && break
    sleep 0.1
  done
  WEIR_ADMIN_URL=$ADMIN WEIR_ADMIN_TOKEN=$ADMIN_TOKEN "$WEIR" status
fi

args=(--url http://127.0.0.1:8090 --write-key wk_bench_000000000000000 --scenario "$SCENARIO"
      --pid "$PID" --json "$STACK_DIR/bench-$SCENARIO.json")
if [ "$SCENARIO" != ingest ]; then
  args+=(--clickhouse http://127.0.0.1:8123 --database weir_bench --read-key rk_bench_000000000000000)
fi
if [ "$SCENARIO" = hotswap ]; then
  args+=(--admin-url "$ADMIN" --admin-token "$ADMIN_TOKEN" --pipeline bench)
  if [ $SMOKE = 1 ]; then
    args+=(--duration 6 --rate 2000 --clients 4 --swap-every 2 --drain-timeout 60 --verify)
  else
    args+=(--duration 40 --rate 10000 --swap-every 10)
  fi
elif [ $SMOKE = 1 ]; then
  args+=(--duration 3 --rate 2000 --clients 4 --drain-timeout 60 --verify)
else
  args+=(--duration 60)
fi
# Options given on the command line come last and win (e.g. --rate instead of --max).
if [ $SMOKE = 0 ] && [ "$SCENARIO" != hotswap ] && ! printf '%s\n' "$@" | grep -qx -- '--rate'; then args+=(--max); fi

say "Running $SCENARIO"
"$LOAD" "${args[@]}" "$@"
