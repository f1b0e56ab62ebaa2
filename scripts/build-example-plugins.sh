#!/usr/bin/env bash
# Builds the JavaScript, Python and C example plugins into WebAssembly components of
# weir's `plugin` world, installing what is missing first:
#   OUT_DIR/js_enrich.wasm      from examples/plugins/js      (npm componentize-qjs, QuickJS)
#   OUT_DIR/python_enrich.wasm  from examples/plugins/python  (PyPI componentize-py)
#   OUT_DIR/c_enrich.wasm       from examples/plugins/c       (Debian clang-14 + wasi-libc,
#                                                              crates.io wit-bindgen-cli)
# A component whose inputs (sources, wit/, pinned tool versions) are unchanged since its
# last build is not rebuilt.
#
# Usage: scripts/build-example-plugins.sh OUT_DIR
# Environment:
#   WEIR_CACHE  where the Python venv with componentize-py lives (default ~/.cache/weir;
#               the venv is $WEIR_CACHE/venv) and wit-bindgen ($WEIR_CACHE/tools/bin)
#   FORCE=1     rebuild even when nothing changed
# Needs node >= 18 with npm, python3 with venv, clang-14, lld-14, wasi-libc (installed
# with apt-get when missing), cargo, and rustup's wasm32-wasip2 target (wasm-component-ld).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JS_DIR="$ROOT/examples/plugins/js"
PY_DIR="$ROOT/examples/plugins/python"
C_DIR="$ROOT/examples/plugins/c"
WIT_BINDGEN_VERSION=0.61.1
WEIR_CACHE="${WEIR_CACHE:-$HOME/.cache/weir}"
VENV="$WEIR_CACHE/venv"
FORCE="${FORCE:-0}"

log() { printf '[build-example-plugins] %s\n' "$*" >&2; }
die() {
  printf '[build-example-plugins] error: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -eq 1 && $1 != -* ]] || usage
mkdir -p "$1" || die "cannot create the output directory $1"
OUT_DIR="$(cd "$1" && pwd)"

as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    return 1
  fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  log "installing with apt-get: $*"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# The sha256 of every file given (directories: their files), by path, then of the list.
inputs_hash() {
  find "$@" -type f -not -path '*/__pycache__/*' -not -path '*/node_modules/*' -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sed "s|  $ROOT/|  |" | sha256sum | cut -d' ' -f1
}

# up_to_date OUTPUT HASH: the output exists and was built from inputs with this hash.
up_to_date() {
  [[ $FORCE != 1 && -s $1 && -f $1.inputs && $(cat "$1.inputs") == "$2" ]]
}

# build NAME OUTPUT HASH COMMAND...: runs COMMAND, which writes the component to
# $BUILD_OUT (a temporary file), then moves it to OUTPUT with the hash of its inputs.
build() {
  local name=$1 output=$2 hash=$3
  shift 3
  local tmp="$output.tmp.$$" started
  started="$(date +%s%N)"
  log "$name: building $output"
  BUILD_OUT="$tmp"
  if ! "$@"; then
    rm -f "$tmp"
    die "$name: the build failed (see above)"
  fi
  [[ -s $tmp ]] || die "$name: the build wrote no component"
  mv -f "$tmp" "$output"
  printf '%s\n' "$hash" >"$output.inputs"
  log "$name: $output: $(stat -c %s "$output") bytes, built in $(elapsed "$started") s"
}

elapsed() {
  local ms=$((($(date +%s%N) - $1) / 1000000))
  printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

# --- JavaScript --------------------------------------------------------------------

ensure_node() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm || die "node and npm are needed: install them (Debian: apt-get install nodejs npm)"
  fi
  local major
  major="$(node -p 'process.versions.node.split(".")[0]')"
  ((major >= 18)) || die "node >= 18 is needed (componentize-qjs), found $(node --version)"
}

ensure_js_deps() {
  local lock_hash stamp="$JS_DIR/node_modules/.weir-lock-hash"
  lock_hash="$(sha256sum "$JS_DIR/package-lock.json" | cut -d' ' -f1)"
  if [[ -f $stamp && $(cat "$stamp") == "$lock_hash" && -d $JS_DIR/node_modules/componentize-qjs ]]; then
    return
  fi
  log "js: npm ci (componentize-qjs, from package-lock.json)"
  (cd "$JS_DIR" && npm ci --no-audit --no-fund >&2) || die "js: npm ci failed in $JS_DIR"
  printf '%s\n' "$lock_hash" >"$stamp"
}

build_js() {
  local output="$OUT_DIR/js_enrich.wasm" hash
  hash="$(inputs_hash "$ROOT/wit" "$JS_DIR/src" "$JS_DIR/build.mjs" "$JS_DIR/package-lock.json")"
  if up_to_date "$output" "$hash"; then
    log "js: $output is up to date"
    return
  fi
  ensure_node
  ensure_js_deps
  build js "$output" "$hash" compile_js
}

compile_js() {
  (cd "$JS_DIR" && node build.mjs "$BUILD_OUT" >&2)
}

# --- Python ------------------------------------------------------------------------

ensure_venv() {
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv ||
    die "python3 is needed (Debian: apt-get install python3 python3-venv)"
  if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "python: creating the venv $VENV"
    rm -rf "$VENV"
    mkdir -p "$WEIR_CACHE"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
      rm -rf "$VENV"
      apt_install python3-venv || die "python3 -m venv failed: install python3-venv (Debian: apt-get install python3-venv)"
      python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
    fi
  fi
  local requirements="$PY_DIR/build-requirements.txt" stamp="$VENV/.weir-example-plugins"
  if [[ -f $stamp ]] && cmp -s "$requirements" "$stamp" && [[ -x $VENV/bin/componentize-py ]]; then
    return
  fi
  log "python: pip install -r $(basename "$requirements") into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2 ||
    die "python: pip install of $requirements failed"
  cp "$requirements" "$stamp"
}

build_python() {
  local output="$OUT_DIR/python_enrich.wasm" hash
  hash="$(inputs_hash "$ROOT/wit" "$PY_DIR/src" "$PY_DIR/build-requirements.txt")"
  if up_to_date "$output" "$hash"; then
    log "python: $output is up to date"
    return
  fi
  ensure_venv
  # componentize-py generates the bindings (the `wit_world` package) into the component.
  # It builds from a copy of src/: its embedded CPython writes __pycache__ where it reads.
  # VIRTUAL_ENV is unset: componentize-py would put that venv's packages on the path.
  STAGE="$(mktemp -d)"
  trap 'rm -rf "$STAGE"' EXIT
  cp "$PY_DIR"/src/*.py "$STAGE/"
  build python "$output" "$hash" compile_python
}

compile_python() {
  env -u VIRTUAL_ENV RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0 "$VENV/bin/componentize-py" -d "$ROOT/wit" -w plugin \
    componentize app -p "$STAGE" -o "$BUILD_OUT" >&2
}

# --- C -------------------------------------------------------------------------------

ensure_c_tools() {
  local missing=()
  command -v clang-14 >/dev/null 2>&1 || command -v clang >/dev/null 2>&1 || missing+=(clang-14)
  command -v wasm-ld-14 >/dev/null 2>&1 || command -v wasm-ld >/dev/null 2>&1 || missing+=(lld-14)
  [[ -f /usr/include/wasm32-wasi/stdlib.h ]] || missing+=(wasi-libc)
  compgen -G '/usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a' >/dev/null ||
    missing+=(libclang-rt-14-dev-wasm32)
  command -v cc >/dev/null 2>&1 || missing+=(gcc)
  if ((${#missing[@]})); then
    apt_install "${missing[@]}" || die "c: install ${missing[*]} (Debian: apt-get install ${missing[*]})"
  fi
  local tools="$WEIR_CACHE/tools"
  WIT_BINDGEN="$tools/bin/wit-bindgen"
  if ! [[ -x $WIT_BINDGEN && $("$WIT_BINDGEN" --version 2>/dev/null) == *"$WIT_BINDGEN_VERSION"* ]]; then
    log "c: cargo install wit-bindgen-cli $WIT_BINDGEN_VERSION (C bindings only) into $tools"
    # Its own target directory: this may run inside `cargo test`, which holds the lock
    # of the workspace's.
    env -u CARGO_TARGET_DIR cargo install --quiet --locked wit-bindgen-cli --version "$WIT_BINDGEN_VERSION" \
      --no-default-features --features c --root "$tools" --target-dir "$tools/build" >&2 ||
      die "c: cargo install wit-bindgen-cli failed"
    rm -rf "$tools/build"
  fi
  export WIT_BINDGEN
}

build_c() {
  local output="$OUT_DIR/c_enrich.wasm" hash
  hash="$(inputs_hash "$ROOT/wit" "$C_DIR/src" "$C_DIR/build.sh") wit-bindgen $WIT_BINDGEN_VERSION"
  if up_to_date "$output" "$hash"; then
    log "c: $output is up to date"
    return
  fi
  ensure_c_tools
  build c "$output" "$hash" compile_c
}

compile_c() {
  "$C_DIR/build.sh" "$BUILD_OUT" >&2
}

build_js
build_python
build_c
log "done: $OUT_DIR/js_enrich.wasm $OUT_DIR/python_enrich.wasm $OUT_DIR/c_enrich.wasm"
