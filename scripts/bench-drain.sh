#!/usr/bin/env bash
# The drain benchmark (`scripts/bench.sh drain`): how fast weir empties a backlog.
#
# A fresh stack; weir-prefill fills a topic with N events (weir's record format, K
# events per record); then, for each round, weir starts with a new consumer group,
# database and Redis prefix (examples/bench/drain.toml or drain-full.toml) and the
# clock runs from its start until ClickHouse holds every event (rows in `events` plus
# dead letters). Printed per round and as the median: events/s, weir's CPU per event,
# the CPU of weir, ClickHouse and the broker over the drain, the machine's busy cores
# (/proc/stat), weir's peak RSS; the same rate and busy cores from the first row in
# ClickHouse on (the clock from the start includes joining the consumer group, about
# 3 s with Tansu for weir and Vector alike); then `count()` and `uniqExact(event_id)`
# of the table.
#
# With --vector PATH (a Vector binary, or the .xz it ships in) and --vector-config
# TEMPLATE (its pipeline, with @GROUP@ @BROKERS@ @TOPIC@ @CH_URL@ @CH_COMPRESSION@
# @DATA_DIR@ @FETCH_WAIT_MS@ placeholders), the same events are also written as plain
# JSON (one per record) to a second topic and Vector drains them into `peer.events`,
# alternating with weir round by round, on the same broker and ClickHouse.
#
# WEIR_BIN=PATH runs that weir binary instead of the one built here (to compare builds).
# Usage: scripts/bench-drain.sh [--smoke] [--events N] [--per-record K]
#            [--pipeline enrich|full] [--rounds R] [--vector PATH --vector-config FILE]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
STACK_DIR="${WEIR_STACK_DIR:-$ROOT/.stack}"
CH=http://127.0.0.1:8123

die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

SMOKE=0 EVENTS="" PER_RECORD=1 PIPELINE=enrich ROUNDS="" VECTOR="" VECTOR_CONFIG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --events) EVENTS="$2"; shift ;;
    --per-record) PER_RECORD="$2"; shift ;;
    --pipeline) PIPELINE="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --vector) VECTOR="$2"; shift ;;
    --vector-config) VECTOR_CONFIG="$2"; shift ;;
    *) die "unknown option $1 (see the header of scripts/bench-drain.sh)" ;;
  esac
  shift
done
EVENTS="${EVENTS:-$([ $SMOKE = 1 ] && echo 20000 || echo 1000000)}"
ROUNDS="${ROUNDS:-$([ $SMOKE = 1 ] && echo 1 || echo 3)}"
case "$PIPELINE" in
  enrich) TEMPLATE=examples/bench/drain.toml ;;
  full) TEMPLATE=examples/bench/drain-full.toml ;;
  *) die "--pipeline is enrich or full, not $PIPELINE" ;;
esac
if [ -n "$VECTOR" ] && [ -z "$VECTOR_CONFIG" ]; then die "--vector needs --vector-config"; fi
PROFILE="${WEIR_PROFILE:-$([ $SMOKE = 1 ] && echo dev || echo release)}"
profile_dir="$PROFILE"; [ "$PROFILE" = dev ] && profile_dir=debug

scripts/stack.sh install
scripts/stack.sh down
scripts/stack.sh up

say "Building weir ($PROFILE), weir-prefill and the plugins"
cargo build --profile "$PROFILE" -p weir -p weir-load
cargo build --profile plugin --target wasm32-wasip2 -p weir-plugin-enrich -p weir-plugin-route-engagement
mkdir -p examples/bench/plugins
cp "$CARGO_TARGET_DIR/wasm32-wasip2/plugin/weir_plugin_enrich.wasm" examples/bench/plugins/enrich.wasm
cp "$CARGO_TARGET_DIR/wasm32-wasip2/plugin/weir_plugin_route_engagement.wasm" examples/bench/plugins/route.wasm
WEIR="${WEIR_BIN:-$CARGO_TARGET_DIR/$profile_dir/weir}"
PREFILL="$CARGO_TARGET_DIR/$profile_dir/weir-prefill"

TOPIC="weir.drain"
say "Pre-filling $TOPIC: $EVENTS events, $PER_RECORD per record"
"$PREFILL" --topic "$TOPIC" --partitions 4 -n "$EVENTS" --format weir --per-record "$PER_RECORD"
if [ -n "$VECTOR" ]; then
  case "$VECTOR" in
    *.xz) xz -dc "$VECTOR" > "$STACK_DIR/vector"; chmod +x "$STACK_DIR/vector"; VECTOR="$STACK_DIR/vector" ;;
  esac
  "$VECTOR" --version
  say "Pre-filling peer.raw: the same events as plain JSON, one per record"
  "$PREFILL" --topic peer.raw --partitions 4 -n "$EVENTS" --format json
fi

ch() { curl -sS --fail-with-body "$CH/" --data-binary "$1"; }
# utime + stime of a process, in clock ticks.
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Busy and total jiffies of the machine.
machine() { awk '/^cpu / { idle = $5 + $6; total = 0; for (i = 2; i <= 9; i++) total += $i; print total - idle, total }' /proc/stat; }
HZ=$(getconf CLK_TCK)
CH_PID=$(cat "$STACK_DIR/clickhouse.pid")
TANSU_PID=$(cat "$STACK_DIR/tansu.pid")
REDIS_PID=$(cat "$STACK_DIR/redis.pid")

# Waits until the sum of the count queries ($@) reaches EVENTS (a query that fails,
# before weir made its tables, counts 0); fails after 900 s from START_NS. Sets
# FIRST_NS and FIRST_M (the machine's jiffies) when the first row shows up.
wait_for_all() {
  local n q
  FIRST_NS="" FIRST_M=""
  while true; do
    n=0
    for q in "$@"; do n=$(( n + $(curl -sf "$CH/" --data-binary "$q" 2>/dev/null || echo 0) )); done
    if [ -z "$FIRST_NS" ] && [ "$n" -gt 0 ]; then FIRST_NS=$(date +%s%N); FIRST_M=$(machine); fi
    [ "$n" -ge "$EVENTS" ] && break
    [ $(( $(date +%s%N) - START_NS )) -lt 900000000000 ] || die "only $n of $EVENTS events after 900 s"
    kill -0 "$PID" 2>/dev/null || die "the process under test exited (log: $LOG)"
    sleep 0.05
  done
}

RESULTS="$STACK_DIR/bench-drain.tsv"
printf 'system\tround\tseconds\tevents_per_s\tcpu_us_per_event\tcpu_cores\tclickhouse_cores\tbroker_cores\tmachine_cores\trss_mib\tredis_cores\tsteady_events_per_s\tsteady_machine_cores\n' > "$RESULTS"

# Measures one drain of the process $PID started at START_NS, until the count
# queries (the arguments after the first six) reach EVENTS.
measure() {
  local system="$1" round="$2" w0="$3" c0="$4" t0="$5" m0="$6" r0="$7"
  shift 7
  wait_for_all "$@"
  local end_ns w1 c1 t1 m1 r1 rss
  end_ns=$(date +%s%N)
  w1=$(ticks "$PID"); c1=$(ticks "$CH_PID"); t1=$(ticks "$TANSU_PID"); r1=$(ticks "$REDIS_PID"); m1=$(machine)
  rss=$(awk '/^VmHWM/ { print int($2 / 1024) }' "/proc/$PID/status")
  awk -v s="$system" -v r="$round" -v ns=$((end_ns - START_NS)) -v n="$EVENTS" -v hz="$HZ" \
      -v w=$((w1 - w0)) -v c=$((c1 - c0)) -v t=$((t1 - t0)) -v red=$((r1 - r0)) -v rss="$rss" -v cores="$(nproc)" \
      -v mb="$(( ${m1% *} - ${m0% *} ))" -v mt="$(( ${m1#* } - ${m0#* } ))" \
      -v sns=$((end_ns - FIRST_NS)) -v sb="$(( ${m1% *} - ${FIRST_M% *} ))" -v st="$(( ${m1#* } - ${FIRST_M#* } ))" 'BEGIN {
    secs = ns / 1e9; steady = sns > 0 ? sns / 1e9 : secs; if (st <= 0) { sb = mb; st = mt }
    printf "%s\t%d\t%.2f\t%.0f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%d\t%.2f\t%.0f\t%.2f\n", s, r, secs, n / secs,
      w / hz / n * 1e6, w / hz / secs, c / hz / secs, t / hz / secs, mb / mt * cores, rss, red / hz / secs,
      n / steady, sb / st * cores
  }' >> "$RESULTS"
  tail -n 1 "$RESULTS" | awk -F'\t' '{ printf "%s round %s: %s s, %s events/s, %s us CPU/event; cores busy: %s (%s), %s (ClickHouse), %s (broker), %s (Redis), %s (machine); peak RSS %s MiB; from the first row on: %s events/s, %s cores busy (machine)\n", $1, $2, $3, $4, $5, $6, $1, $7, $8, $11, $9, $10, $12, $13 }'
}

stop() {
  kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$PID" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$PID" 2>/dev/null || true
}
PID=""
trap '[ -z "$PID" ] || stop' EXIT

run_weir() {
  local round="$1" db="weir_drain_$1"
  local config="examples/bench/generated-drain-$round.toml"
  sed -e "s/@TOPIC@/$TOPIC/g" -e "s/@ROUND@/$round/g" "$TEMPLATE" > "$config"
  LOG="$STACK_DIR/bench-drain-weir-$round.log"
  local w0=0 c0 t0 m0 r0
  c0=$(ticks "$CH_PID"); t0=$(ticks "$TANSU_PID"); r0=$(ticks "$REDIS_PID"); m0=$(machine)
  START_NS=$(date +%s%N)
  setsid "$WEIR" serve --config "$config" >"$LOG" 2>&1 < /dev/null &
  PID=$!
  measure weir "$round" "$w0" "$c0" "$t0" "$m0" "$r0" "SELECT count() FROM $db.events" "SELECT count() FROM $db.dead_letters"
  stop; PID=""
  local rows distinct dead
  read -r rows distinct < <(ch "SELECT count(), uniqExact(event_id) FROM $db.events FORMAT TSV")
  dead=$(ch "SELECT count() FROM $db.dead_letters FORMAT TSV")
  echo "  events: $rows rows, $distinct distinct event ids; dead letters: $dead"
  [ "$rows" = "$distinct" ] && [ $((rows + dead)) = "$EVENTS" ] ||
    die "weir wrote $rows rows ($distinct distinct) and $dead dead letters for $EVENTS events"
  ch "DROP DATABASE IF EXISTS $db" >/dev/null
  # The round's deduplication keys and counters too: every round starts from the same
  # Redis (a million keys more per round made each later round's Redis slower).
  redis-cli -p "${REDIS_PORT:-6379}" FLUSHALL >/dev/null
}

run_vector() {
  local round="$1" data="$STACK_DIR/vector-data-$1"
  rm -rf "$data"; mkdir -p "$data"
  ch "CREATE DATABASE IF NOT EXISTS peer" >/dev/null
  ch "DROP TABLE IF EXISTS peer.events" >/dev/null
  ch "CREATE TABLE peer.events (event_id String, app String, name String, user_id String, timestamp DateTime, properties String, processed_by String) ENGINE = MergeTree ORDER BY (name, timestamp)" >/dev/null
  local config="$STACK_DIR/vector-$round.toml"
  sed -e "s|@GROUP@|vector-drain-$round|g" -e "s|@BROKERS@|127.0.0.1:9092|g" -e "s|@TOPIC@|peer.raw|g" \
      -e "s|@CH_URL@|$CH|g" -e "s|@CH_COMPRESSION@|none|g" -e "s|@DATA_DIR@|$data|g" \
      -e "s|@FETCH_WAIT_MS@|50|g" "$VECTOR_CONFIG" > "$config"
  LOG="$STACK_DIR/bench-drain-vector-$round.log"
  local c0 t0 m0 r0
  c0=$(ticks "$CH_PID"); t0=$(ticks "$TANSU_PID"); r0=$(ticks "$REDIS_PID"); m0=$(machine)
  START_NS=$(date +%s%N)
  setsid "$VECTOR" --config "$config" >"$LOG" 2>&1 < /dev/null &
  PID=$!
  measure vector "$round" 0 "$c0" "$t0" "$m0" "$r0" "SELECT count() FROM peer.events"
  stop; PID=""
  ch "SELECT count(), uniqExact(event_id) FROM peer.events FORMAT TSV" | awk '{ printf "  peer.events: %s rows, %s distinct event ids\n", $1, $2 }'
}

for round in $(seq 1 "$ROUNDS"); do
  say "Round $round of $ROUNDS"
  [ -z "$VECTOR" ] || run_vector "$round"
  run_weir "$round"
done

say "Drain of $EVENTS events ($PER_RECORD per record, $PIPELINE pipeline, $(nproc) cores): medians of $ROUNDS rounds"
for system in weir vector; do
  grep -q "^$system	" "$RESULTS" || continue
  awk -F'\t' -v s="$system" '$1 == s' "$RESULTS" | sort -t$'\t' -k4,4n | awk -F'\t' -v n="$ROUNDS" '
    { rows[NR] = $0; rate[NR] = $4 }
    END { split(rows[int((NR + 1) / 2)], m, "\t");
          printf "%-7s %s events/s (%s-%s), %s us CPU/event, cores busy %s (own) / %s (machine), ClickHouse %s, broker %s, Redis %s, peak RSS %s MiB; from the first row on: %s events/s, %s cores busy (machine)\n",
            m[1], m[4], rate[1], rate[NR], m[5], m[6], m[9], m[7], m[8], m[11], m[10], m[12], m[13] }'
done
echo "(per round: $RESULTS)"
