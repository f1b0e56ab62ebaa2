#!/usr/bin/env bash
# weir's demo: brings up the local stack (Tansu, ClickHouse, Redis), builds weir and the
# example plugins, starts `weir serve`, sends sample traffic and shows the ClickHouse rows
# (events, dead letters, the routed profile_viewed table) and a Redis counter.
# weir keeps running afterwards; `scripts/demo.sh stop` stops it and the stack.
#
# Usage: scripts/demo.sh [stop]
# Environment: CARGO_TARGET_DIR (default ~/.cache/weir/target), WEIR_PROFILE (dev | release,
# default dev: it shares the test build), WEIR_DEMO_EVENTS (generated events, default 2000).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
STACK_DIR="${WEIR_STACK_DIR:-$ROOT/.stack}"
PROFILE="${WEIR_PROFILE:-dev}"
EVENTS="${WEIR_DEMO_EVENTS:-2000}"
CONFIG="$ROOT/examples/demo/weir.toml"
INGEST="http://127.0.0.1:8080"
CLICKHOUSE="http://127.0.0.1:8123"
WRITE_KEY="wk_dev_0000000000000000"
READ_KEY="rk_dev_0000000000000000"
ADMIN_TOKEN="at_dev_0000000000000000"
PIDFILE="$STACK_DIR/weir.pid"
LOG="$STACK_DIR/weir.log"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

weir_running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

stop_weir() {
  if weir_running; then
    local pid; pid="$(cat "$PIDFILE")"
    kill -TERM "$pid"
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "weir stopped"
  fi
  rm -f "$PIDFILE"
}

if [ "${1:-}" = "stop" ]; then
  stop_weir
  scripts/stack.sh down
  exit 0
fi

say "Installing what is missing and starting the stack"
scripts/stack.sh install
scripts/stack.sh up

say "Building weir ($PROFILE) and the example plugins (wasm32-wasip2)"
cargo build --profile "$PROFILE" -p weir
cargo build --profile plugin --target wasm32-wasip2 -p weir-plugin-enrich -p weir-plugin-route-engagement
mkdir -p examples/demo/plugins
cp "$CARGO_TARGET_DIR/wasm32-wasip2/plugin/weir_plugin_enrich.wasm" examples/demo/plugins/enrich.wasm
cp "$CARGO_TARGET_DIR/wasm32-wasip2/plugin/weir_plugin_route_engagement.wasm" examples/demo/plugins/route.wasm
profile_dir="$PROFILE"; [ "$PROFILE" = dev ] && profile_dir=debug
WEIR="$CARGO_TARGET_DIR/$profile_dir/weir"

say "Starting weir"
stop_weir
mkdir -p "$STACK_DIR"
setsid "$WEIR" serve --config "$CONFIG" >"$LOG" 2>&1 < /dev/null &
echo $! >"$PIDFILE"
for _ in $(seq 1 300); do
  curl -sf "$INGEST/healthz" >/dev/null 2>&1 && break
  weir_running || { tail -n 30 "$LOG"; die "weir exited at start (log: $LOG)"; }
  sleep 0.1
done
curl -sf "$INGEST/healthz" >/dev/null || { tail -n 30 "$LOG"; die "weir does not answer on $INGEST"; }
echo "weir is running (pid $(cat "$PIDFILE"), log $LOG)"
echo "  ingest:    $INGEST/v1/events"
echo "  write key: $WRITE_KEY   (development only)"
echo "  read key:  $READ_KEY   (counters API; development only)"
echo "  admin:     http://127.0.0.1:8081 with token $ADMIN_TOKEN   (development only)"

post() { # content-type body
  curl -sS -X POST "$INGEST/v1/events" -H "Authorization: Bearer $WRITE_KEY" \
    -H "Content-Type: $1" --data-binary "$2"
  echo
}

say "Sending sample traffic"
started=$(date +%s)
echo "-- one event:"
post application/json '{"name":"profile_viewed","user_id":"alice","properties":{"profile_id":"bob"}}'
echo "-- a batch (the second is rejected by the plugin, the third dropped as test traffic):"
post application/json '[{"name":"post_liked","user_id":"bob","properties":{"post_id":"p1"}},
  {"name":"post_liked","properties":{"post_id":"p2"}},
  {"name":"app_opened","properties":{"is_test":true}}]'
echo "-- the same event sent twice, as a client resends a request whose answer it lost (stored once):"
retry_id="demo-retry-$started"
for _ in 1 2; do
  post application/json '{"name":"signup_step_completed","event_id":"'"$retry_id"'","user_id":"dave","properties":{"step":1}}'
done
echo "-- a bad request (unknown field), refused with a JSON error:"
post application/json '{"name":"app_opened","colour":"red"}'
echo "-- $EVENTS generated events as NDJSON, in batches of 500:"
python3 - "$EVENTS" >"$STACK_DIR/demo-events.ndjson" <<'PY'
import json, random, sys
random.seed(7)
names = ["profile_viewed", "post_liked", "signup_step_completed", "app_opened"]
for i in range(int(sys.argv[1])):
    name = names[i % 4]
    user = f"user{random.randrange(200)}"
    props = {"profile_id": f"user{random.randrange(200)}"} if name == "profile_viewed" else {"step": i % 5}
    print(json.dumps({"name": name, "user_id": user, "properties": props}))
PY
split -l 500 "$STACK_DIR/demo-events.ndjson" "$STACK_DIR/demo-batch-"
accepted=0
for f in "$STACK_DIR"/demo-batch-*; do
  n=$(curl -sS -X POST "$INGEST/v1/events" -H "Authorization: Bearer $WRITE_KEY" \
      -H "Content-Type: application/x-ndjson" --data-binary "@$f" | python3 -c 'import json,sys; print(json.load(sys.stdin)["accepted"])')
  accepted=$((accepted + n))
  rm -f "$f"
done
echo "accepted $accepted generated events"

say "Waiting for the rows in ClickHouse"
want=$((EVENTS + 3))
for _ in $(seq 1 600); do
  have=$(curl -sf "$CLICKHOUSE/" --data-binary "SELECT count() FROM weir.events WHERE received_at >= $started" || echo 0)
  [ "${have:-0}" -ge "$want" ] && break
  sleep 0.1
done
[ "${have:-0}" -ge "$want" ] || { tail -n 30 "$LOG"; die "only ${have:-0} of $want events reached ClickHouse (log: $LOG)"; }

q() { curl -sS "$CLICKHOUSE/" --data-binary "$1 FORMAT PrettyCompactMonoBlock"; }
copies=$(curl -sf "$CLICKHOUSE/" --data-binary "SELECT count() FROM weir.events WHERE event_id = '$retry_id'")
[ "$copies" = 1 ] || die "the event sent twice is stored $copies times"
echo "the event sent twice ($retry_id) is stored once; weir_dedup_duplicates_total:"
curl -sf "$INGEST/metrics" | grep '^weir_dedup_duplicates_total' || true
say "weir.events by name"
q "SELECT name, count() AS events, uniqExact(user_id) AS users FROM weir.events GROUP BY name ORDER BY name"
say "The newest rows (the plugin added enriched_by and self_view)"
q "SELECT event_id, name, user_id, timestamp, properties, plugins FROM weir.events ORDER BY received_at DESC, kafka_offset DESC LIMIT 5"
say "weir.dead_letters"
q "SELECT name, stage, plugin, reason, raw FROM weir.dead_letters ORDER BY failed_at DESC LIMIT 5"
say "weir.profile_viewed (a typed table the route plugin writes): most viewed profiles"
q "SELECT profile_id, count() AS views, countIf(self_view = 1) AS self_views, uniqExact(viewer_id) AS viewers FROM weir.profile_viewed GROUP BY profile_id ORDER BY views DESC, profile_id LIMIT 5"
top=$(curl -sf "$CLICKHOUSE/" --data-binary "SELECT profile_id FROM weir.profile_viewed WHERE self_view = 0 GROUP BY profile_id ORDER BY count() DESC, profile_id LIMIT 1")
say "The same profile's view counter in Redis, as an app reads it"
echo "GET $INGEST/v1/counters/profile_views/$top?days=2"
for _ in $(seq 1 50); do
  counter=$(curl -sS "$INGEST/v1/counters/profile_views/$top?days=2" -H "Authorization: Bearer $READ_KEY")
  case "$counter" in *'"value":0,'*|'') sleep 0.1 ;; *) break ;; esac
done
echo "$counter"

say "Hot swap: the same pipeline from the control plane (weir apply -f examples/demo/control.toml)"
export WEIR_ADMIN_TOKEN="$ADMIN_TOKEN"
"$WEIR" apply -f examples/demo/control.toml
version=$("$WEIR" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["control_version"])')
for _ in $(seq 1 100); do
  "$WEIR" status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["instances"] and all(i["control_version"] >= '"$version"' for i in s["instances"]) else 1)' && break
  sleep 0.1
done
"$WEIR" status
echo "-- a view sent now is processed by the uploaded versions:"
post application/json '{"name":"profile_viewed","user_id":"carol","properties":{"profile_id":"bob","source":"search"}}'
for _ in $(seq 1 100); do
  n=$(curl -sf "$CLICKHOUSE/" --data-binary "SELECT count() FROM weir.events WHERE user_id = 'carol' AND control_version >= $version" || echo 0)
  [ "${n:-0}" -ge 1 ] && break
  sleep 0.1
done
[ "${n:-0}" -ge 1 ] || { tail -n 30 "$LOG"; die "the view sent after weir apply did not reach ClickHouse"; }
q "SELECT name, user_id, plugins, control_version FROM weir.events WHERE user_id = 'carol' ORDER BY received_at DESC LIMIT 1"

cat <<EOT

weir is still running. Try:
  curl -X POST $INGEST/v1/events -H 'Authorization: Bearer $WRITE_KEY' \\
       -H 'Content-Type: application/json' -d '{"name":"post_liked","user_id":"me"}'
  clickhouse-client --query 'SELECT count() FROM weir.events'
  curl $INGEST/v1/counters/post_likes/p1 -H 'Authorization: Bearer $READ_KEY'
  WEIR_ADMIN_TOKEN=$ADMIN_TOKEN $WEIR status
Stop everything with: scripts/demo.sh stop
EOT
