#!/usr/bin/env bash
# Builds the C example plugin into a WebAssembly component of weir's `plugin` world,
# or runs its unit tests natively.
#
# Usage: build.sh OUTPUT     the component (e.g. build.sh dist/c_enrich.wasm)
#        build.sh --test     the unit tests, natively (cc with AddressSanitizer/UBSan)
#
# Tools (Debian: apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32;
# cargo install wit-bindgen-cli; rustup target add wasm32-wasip2), found on PATH or set:
#   CLANG          a clang that targets wasm32-wasi (default: clang-14, then clang)
#   WASI_SYSROOT   wasi-libc's sysroot (default: /usr, where Debian's wasi-libc lives)
#   WASM_LD        wasm-ld (default: the one beside CLANG, then wasm-ld-14, wasm-ld)
#   WIT_BINDGEN    the wit-bindgen CLI (default: wit-bindgen on PATH)
#   COMPONENT_LD   wasm-component-ld, which links and turns the module into a component
#                  (default: the one rustup installs with the wasm32-wasip2 target)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WIT="$HERE/../../../wit"
CFLAGS=(-std=c11 -O2 -Wall -Wextra -Werror)

die() {
  printf 'c/build.sh: error: %s\n' "$*" >&2
  exit 1
}

[[ $# -eq 1 ]] || die "usage: build.sh OUTPUT | build.sh --test"

if [[ $1 == --test ]]; then
  CC="${CC:-cc}"
  command -v "$CC" >/dev/null 2>&1 || die "no C compiler ($CC) for the native tests: apt-get install gcc"
  bin="$(mktemp -d)/test_enrich"
  "$CC" "${CFLAGS[@]}" -g -fsanitize=address,undefined -fno-sanitize-recover=all \
    "$HERE/test/test_enrich.c" "$HERE/src/enrich.c" "$HERE/src/json.c" -o "$bin"
  "$bin"
  rm -rf "$(dirname "$bin")"
  exit 0
fi

OUTPUT="$1"

find_tool() { # find_tool VAR candidates...: the first candidate that runs
  local var=$1
  shift
  if [[ -n ${!var:-} ]]; then
    command -v "${!var}" >/dev/null 2>&1 || die "$var=${!var} is not an executable"
    command -v "${!var}"
    return
  fi
  for candidate in "$@"; do
    if [[ -n $candidate ]] && command -v "$candidate" >/dev/null 2>&1; then
      command -v "$candidate"
      return
    fi
  done
  return 1
}

CLANG="$(find_tool CLANG clang-14 clang)" ||
  die "clang not found: apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32"
WASI_SYSROOT="${WASI_SYSROOT:-/usr}"
[[ -f $WASI_SYSROOT/include/wasm32-wasi/stdlib.h || -f $WASI_SYSROOT/include/stdlib.h ]] ||
  die "wasi-libc not found in $WASI_SYSROOT: apt-get install wasi-libc (or set WASI_SYSROOT)"
clang_dir="$(dirname "$(readlink -f "$CLANG")")"
WASM_LD="$(find_tool WASM_LD "$clang_dir/wasm-ld" wasm-ld-14 wasm-ld)" || die "wasm-ld not found: apt-get install lld-14"
WIT_BINDGEN="$(find_tool WIT_BINDGEN wit-bindgen)" ||
  die "wit-bindgen not found: cargo install wit-bindgen-cli --version 0.61.1 --no-default-features --features c"
default_component_ld=""
if command -v rustc >/dev/null 2>&1; then
  default_component_ld="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/wasm-component-ld"
fi
COMPONENT_LD="$(find_tool COMPONENT_LD "$default_component_ld" wasm-component-ld)" ||
  die "wasm-component-ld not found: rustup target add wasm32-wasip2 (or cargo install wasm-component-ld)"

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT

# plugin.h / plugin.c: the types, the host imports and the `process` export's glue;
# plugin_component_type.o: the world, which the linker needs to make the component.
"$WIT_BINDGEN" c "$WIT" --world plugin --out-dir "$build/bindings" >"$build/wit-bindgen.log" 2>&1 ||
  { cat "$build/wit-bindgen.log" >&2; die "wit-bindgen failed"; }

# A reactor (no main): weir calls `process` on a long-lived instance. The module uses
# no WASI function (no stdio), so no WASI adapter goes into the component.
mkdir -p "$(dirname "$OUTPUT")"
"$CLANG" --target=wasm32-wasi --sysroot="$WASI_SYSROOT" -mexec-model=reactor "${CFLAGS[@]}" \
  -I"$build/bindings" -I"$HERE/src" \
  "$HERE/src/plugin.c" "$HERE/src/enrich.c" "$HERE/src/json.c" \
  "$build/bindings/plugin.c" "$build/bindings/plugin_component_type.o" \
  -fuse-ld="$COMPONENT_LD" -Wl,--wasm-ld-path="$WASM_LD" -Wl,--wasi-adapter=none -Wl,--strip-all \
  -o "$OUTPUT"
echo "$OUTPUT: $(stat -c %s "$OUTPUT") bytes"
