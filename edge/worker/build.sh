#!/usr/bin/env bash
# Builds the Cloudflare Worker bundle of this crate with worker-build:
#   <crate>/build/index.js  (+ index_bg.wasm)  -> `main = "edge/worker/build/index.js"`
#
# Idempotent: installs only what is missing, so a second run takes seconds.
#   - Rust wasm32 toolchain: the installed wasm32-unknown-unknown target when the `rustc` on
#     PATH has one (normal rustup machine). Otherwise (e.g. an offline Debian 12 box whose
#     rustup cannot download targets) Debian's rustc-web + rust-web-src: std for wasm32 is
#     built once into a private sysroot and a `rustc` wrapper points at it.
#   - worker-build / wasm-bindgen-cli via `cargo install` (versions pinned, ~5-10 min each
#     the first time), wasm-opt (npm binaryen), esbuild and wrangler/miniflare (npm).
#     worker-build is given WASM_BINDGEN_BIN / WASM_OPT_BIN / ESBUILD_BIN so it never
#     downloads anything itself.
#
# Usage: edge/worker/build.sh [--tools-only] [extra worker-build / cargo args...]
# Env:
#   WORKER_TOOLS_DIR    cache for tools, sysroot, node_modules (default ~/.cache/claude-runner-worker)
#   WORKER_CRATE_DIR    crate to build (default: this script's directory)
#   WORKER_TARGET_DIR   cargo target dir for the wasm build (default: <repo>/target/worker)
#   WORKER_TOOLCHAIN    auto (default) | native | debian   - force the toolchain route
#   WASM_BINDGEN_VERSION  override the wasm-bindgen CLI version (default: the one in Cargo.lock)
#   CARGO_PROFILE_RELEASE_{DEBUG,LTO,CODEGEN_UNITS}  default 0 / true / 1 for the wasm build only
#     (the workspace's release profile keeps debug info, which wasm-bindgen drops anyway)
set -Eeuo pipefail

WORKER_BUILD_VERSION=0.8.7
BINARYEN_VERSION=132.0.0
ESBUILD_VERSION=0.28.2
WRANGLER_VERSION=4.86.0
DEBIAN_PACKAGES=(rustc-web cargo-web rust-web-src rust-web-llvm lld-22)
WASM_TARGET=wasm32-unknown-unknown
DEFAULT_WASM_BINDGEN_VERSION=0.2.130  # only for --tools-only without a crate

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
CRATE_DIR=${WORKER_CRATE_DIR:-$SCRIPT_DIR}
TOOLS=${WORKER_TOOLS_DIR:-${HOME:?HOME is not set}/.cache/claude-runner-worker}
TARGET_DIR=${WORKER_TARGET_DIR:-$REPO/target/worker}
TOOLCHAIN_MODE=${WORKER_TOOLCHAIN:-auto}
START_TS=$(date +%s)

say() { printf '[build.sh] %s\n' "$*"; }
die() {
  printf '[build.sh] ERROR: %s\n' "$1" >&2
  shift || true
  for line in "$@"; do printf '[build.sh]   %s\n' "$line" >&2; done
  exit 1
}
trap 'rc=$?; printf "[build.sh] ERROR: command failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2; exit $rc' ERR

# Runs a long step with its output in a log file; shows the tail on failure.
run_logged() {
  local name=$1; shift
  local log="$TOOLS/logs/$name.log"
  if ! "$@" >"$log" 2>&1; then
    tail -n 40 "$log" >&2 || true
    die "$name failed (full log: $log)"
  fi
}

TOOLS_ONLY=0
PASSTHRU=()
for arg in "$@"; do
  case "$arg" in
    --tools-only) TOOLS_ONLY=1 ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) PASSTHRU+=("$arg") ;;
  esac
done

HAVE_CRATE=1
if [[ ! -f "$CRATE_DIR/Cargo.toml" ]]; then
  ((TOOLS_ONLY)) || die "no Cargo.toml in crate dir $CRATE_DIR" "set WORKER_CRATE_DIR to the worker crate"
  HAVE_CRATE=0
else
  CRATE_DIR=$(cd "$CRATE_DIR" && pwd -P)
fi
mkdir -p "$TOOLS/logs" "$TOOLS/bin"
TOOLS=$(cd "$TOOLS" && pwd)

# One run at a time per tools dir (installs and the sysroot are shared).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$TOOLS/.lock"
  if ! flock -n 9; then
    say "waiting for another build.sh using $TOOLS ..."
    flock 9
  fi
fi

# ---------------------------------------------------------------- node / npm
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
  || die "node and npm are required (Node.js >= 20)" "Debian: apt-get install nodejs npm (or NodeSource node 20+)"
NODE_MAJOR=$(node -p 'process.versions.node.split(".")[0]')
(( NODE_MAJOR >= 18 )) || die "Node.js $(node --version) is too old; need >= 20 (wrangler $WRANGLER_VERSION / miniflare)"
(( NODE_MAJOR >= 20 )) || say "warning: Node.js $(node --version) < 20: the Miniflare host (wrangler $WRANGLER_VERSION) needs Node 20"

# The cargo used for `cargo install` of the host tools: whatever is on PATH (rustup's or
# Debian's); never the wasm wrapper toolchain set up below.
HOST_CARGO=$(command -v cargo || true)
[[ -n "$HOST_CARGO" ]] || HOST_CARGO=/usr/bin/cargo

# ---------------------------------------------------------------- wasm32 toolchain
native_has_wasm32() {
  if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx "$WASM_TARGET"; then
    return 0
  fi
  command -v rustc >/dev/null 2>&1 || return 1
  local libdir
  libdir=$(rustc --target "$WASM_TARGET" --print target-libdir 2>/dev/null) || return 1
  [[ -n "$libdir" && -d "$libdir" ]] && compgen -G "$libdir/libstd-*.rlib" >/dev/null
}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}

ensure_debian_packages() {
  local missing=() p
  for p in "${DEBIAN_PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) == "install ok installed" ]] || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  say "installing Debian packages: ${missing[*]}"
  local updated=0
  if ! apt-cache show rustc-web >/dev/null 2>&1; then
    say "apt-get update (package lists lack rustc-web)"
    run_logged apt-update as_root apt-get update
    updated=1
  fi
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$TOOLS/logs/apt-install.log" 2>&1; then
    if ((updated == 0)); then
      say "apt-get install failed; running apt-get update once and retrying"
      run_logged apt-update as_root apt-get update
      run_logged apt-install as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    else
      tail -n 30 "$TOOLS/logs/apt-install.log" >&2
      die "apt-get install ${missing[*]} failed (log: $TOOLS/logs/apt-install.log)" \
        "these come from Debian 12 bookworm-security; check /etc/apt/sources.list"
    fi
  fi
}

# Builds std for wasm32 from rust-web-src into a private sysroot (once per rustc version).
ensure_debian_sysroot() {
  local vv hash
  vv=$(/usr/bin/rustc -vV) || die "/usr/bin/rustc does not run"
  hash=$(printf '%s' "$vv" | sha256sum | cut -c1-12)
  local ver; ver=$(/usr/bin/rustc --version | awk '{print $2}')
  SYSROOT="$TOOLS/sysroot/rustc-$ver-$hash"
  local libdir="$SYSROOT/lib/rustlib/$WASM_TARGET/lib"
  if [[ -f "$SYSROOT/.complete" ]] && compgen -G "$libdir/libstd-*.rlib" >/dev/null; then
    return 0
  fi
  [[ -d /usr/lib/rustlib/src/rust/library/std ]] \
    || die "std sources missing at /usr/lib/rustlib/src/rust/library (package rust-web-src)"
  say "building std for $WASM_TARGET with rustc $ver (-Zbuild-std, once; ~1 min)"
  local sb="$TOOLS/std-build"
  rm -rf "$sb"
  mkdir -p "$sb/src"
  cat >"$sb/Cargo.toml" <<'EOF'
[package]
name = "wasm-std-build"
version = "0.0.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]
path = "src/lib.rs"

[workspace]
EOF
  : >"$sb/src/lib.rs"
  run_logged build-std env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET_DIR -u RUSTC_WRAPPER \
    RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTFLAGS=-Cembed-bitcode=yes \
    /usr/bin/cargo build --release --target "$WASM_TARGET" -Zbuild-std=std,panic_abort \
    --manifest-path "$sb/Cargo.toml" --target-dir "$sb/target"
  local tmp="$SYSROOT.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp/lib/rustlib/$WASM_TARGET/lib"
  cp "$sb/target/$WASM_TARGET/release/deps/"*.rlib "$tmp/lib/rustlib/$WASM_TARGET/lib/"
  local d
  for d in x86_64-unknown-linux-gnu src etc; do
    [[ -e /usr/lib/rustlib/$d ]] && ln -s "/usr/lib/rustlib/$d" "$tmp/lib/rustlib/$d"
  done
  printf '%s\n' "$vv" >"$tmp/.complete"
  rm -rf "$SYSROOT"
  mv "$tmp" "$SYSROOT"
  rm -rf "$sb"
  # drop sysroots of older rustc-web versions
  local old
  for old in "$TOOLS"/sysroot/rustc-*; do
    [[ "$old" == "$SYSROOT" || ! -d "$old" ]] || rm -rf "$old"
  done
}

setup_debian_toolchain() {
  command -v apt-get >/dev/null 2>&1 \
    || die "no wasm32 Rust toolchain and no apt-get" "install it: rustup target add $WASM_TARGET"
  ensure_debian_packages
  command -v rust-lld >/dev/null 2>&1 || [[ -x /usr/bin/rust-lld ]] || die "rust-lld missing (package rust-web-llvm)"
  ensure_debian_sysroot
  local tb="$TOOLS/toolchain/bin"
  mkdir -p "$tb"
  cat >"$tb/rustc.tmp" <<EOF
#!/bin/sh
# Debian rustc-web with a private sysroot that holds std for $WASM_TARGET (made by build.sh).
exec /usr/bin/rustc --sysroot "$SYSROOT" "\$@"
EOF
  chmod +x "$tb/rustc.tmp"
  mv "$tb/rustc.tmp" "$tb/rustc"
  ln -sfn /usr/bin/cargo "$tb/cargo"
  # worker-build runs `rustc` and `cargo` from PATH; cargo uses RUSTC.
  export PATH="$tb:$PATH"
  export RUSTC="$tb/rustc"
  export CARGO="$tb/cargo"
  unset RUSTC_WRAPPER RUSTUP_TOOLCHAIN
}

case "$TOOLCHAIN_MODE" in
  auto)
    if native_has_wasm32; then TOOLCHAIN_MODE=native
    elif command -v apt-get >/dev/null 2>&1; then TOOLCHAIN_MODE=debian
    elif command -v rustup >/dev/null 2>&1; then
      say "adding the $WASM_TARGET target with rustup"
      rustup target add "$WASM_TARGET" || die "rustup target add $WASM_TARGET failed"
      TOOLCHAIN_MODE=native
    else die "no Rust toolchain with $WASM_TARGET found" "install rustup and run: rustup target add $WASM_TARGET"
    fi ;;
  native|debian) ;;
  *) die "WORKER_TOOLCHAIN must be auto, native or debian (got '$TOOLCHAIN_MODE')" ;;
esac
if [[ $TOOLCHAIN_MODE == debian ]]; then
  setup_debian_toolchain
  say "toolchain: Debian $(/usr/bin/rustc --version | awk '{print $1, $2}') + private wasm32 sysroot $SYSROOT"
else
  native_has_wasm32 || die "WORKER_TOOLCHAIN=native but rustc has no $WASM_TARGET std" "run: rustup target add $WASM_TARGET"
  export CARGO; CARGO=$(command -v cargo) || die "cargo not on PATH"
  say "toolchain: $(rustc --version | awk '{print $1, $2}') with installed $WASM_TARGET target"
fi

# ---------------------------------------------------------------- cargo-installed tools
# prints the path of an executable `name` whose `--version` contains `version`, if any
find_tool() {
  local name=$1 version=$2 cand
  for cand in "$TOOLS/cargo/$3-$version/bin/$name" "$(command -v "$name" 2>/dev/null || true)"; do
    [[ -n "$cand" && -x "$cand" ]] || continue
    if "$cand" --version 2>/dev/null | grep -Eq "(^| )v?${version//./\\.}( |$)"; then
      printf '%s\n' "$cand"; return 0
    fi
  done
  return 1
}

cargo_install() { # crate version bin [--locked]
  local crate=$1 version=$2 bin=$3; shift 3
  local root="$TOOLS/cargo/$crate-$version"
  say "installing $crate $version with cargo install (first time only, ~5-10 min; log: $TOOLS/logs/install-$crate.log)"
  local t0; t0=$(date +%s)
  run_logged "install-$crate" env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET_DIR -u RUSTC -u RUSTC_WRAPPER -u RUSTFLAGS -u CARGO \
    "$HOST_CARGO" install "$crate" --version "$version" --root "$root" --force "$@"
  say "installed $crate $version in $(( $(date +%s) - t0 )) s"
  [[ -x "$root/bin/$bin" ]] || die "cargo install $crate did not produce $root/bin/$bin"
}

WORKER_BUILD_BIN=$(find_tool worker-build "$WORKER_BUILD_VERSION" worker-build) || {
  cargo_install worker-build "$WORKER_BUILD_VERSION" worker-build --locked
  WORKER_BUILD_BIN="$TOOLS/cargo/worker-build-$WORKER_BUILD_VERSION/bin/worker-build"
}

# The wasm-bindgen CLI must equal the wasm-bindgen crate in Cargo.lock.
lock_wasm_bindgen_version() {
  local meta
  meta=$(cd "$CRATE_DIR" && cargo metadata --format-version 1 --manifest-path "$CRATE_DIR/Cargo.toml" 2>"$TOOLS/logs/cargo-metadata.log") \
    || { tail -n 20 "$TOOLS/logs/cargo-metadata.log" >&2; die "cargo metadata failed for $CRATE_DIR"; }
  printf '%s' "$meta" | node -e '
    let s = ""; process.stdin.on("data", d => s += d).on("end", () => {
      const m = JSON.parse(s);
      const byId = new Map(m.packages.map(p => [p.id, p]));
      const dir = process.argv[1];
      const root = m.packages.find(p => p.manifest_path === dir + "/Cargo.toml");
      const node = root && m.resolve && m.resolve.nodes.find(n => n.id === root.id);
      const direct = node && node.deps.map(d => byId.get(d.pkg)).find(p => p && p.name === "wasm-bindgen");
      const any = m.packages.find(p => p.name === "wasm-bindgen");
      const p = direct || any;
      if (p) console.log(p.version);
    });' "$CRATE_DIR"
}
if [[ -n "${WASM_BINDGEN_VERSION:-}" ]]; then
  WB_VERSION=$WASM_BINDGEN_VERSION
elif ((HAVE_CRATE == 0)); then
  WB_VERSION=$DEFAULT_WASM_BINDGEN_VERSION
else
  WB_VERSION=$(lock_wasm_bindgen_version)
  [[ -n "$WB_VERSION" ]] || die "the crate does not depend on wasm-bindgen" \
    "add to $CRATE_DIR/Cargo.toml: wasm-bindgen = \"=0.2.130\" (pin it: the CLI must match)"
fi
WASM_BINDGEN_BIN=$(find_tool wasm-bindgen "$WB_VERSION" wasm-bindgen-cli) || {
  # no --locked: the CLI's lock file pins crates the index may lack
  cargo_install wasm-bindgen-cli "$WB_VERSION" wasm-bindgen
  WASM_BINDGEN_BIN="$TOOLS/cargo/wasm-bindgen-cli-$WB_VERSION/bin/wasm-bindgen"
}

# ---------------------------------------------------------------- npm tools
NODE_DIR="$TOOLS/node"
mkdir -p "$NODE_DIR"
PKG_JSON=$(cat <<EOF
{
  "name": "claude-runner-worker-tools",
  "private": true,
  "description": "tools for edge/worker/build.sh and miniflare-host.mjs",
  "dependencies": {
    "binaryen": "$BINARYEN_VERSION",
    "esbuild": "$ESBUILD_VERSION",
    "wrangler": "$WRANGLER_VERSION"
  }
}
EOF
)
[[ -f "$NODE_DIR/package.json" && "$(cat "$NODE_DIR/package.json")" == "$PKG_JSON" ]] \
  || printf '%s\n' "$PKG_JSON" >"$NODE_DIR/package.json"
npm_ok() {
  node -e '
    const [dir, ...want] = process.argv.slice(1);
    for (const w of want) {
      const [name, v] = w.split("@");
      try { if (require(`${dir}/node_modules/${name}/package.json`).version !== v) process.exit(1); }
      catch { process.exit(1); }
    }' "$NODE_DIR" "binaryen@$BINARYEN_VERSION" "esbuild@$ESBUILD_VERSION" "wrangler@$WRANGLER_VERSION" \
  && [[ -x "$NODE_DIR/node_modules/.bin/esbuild" && -x "$NODE_DIR/node_modules/.bin/wasm-opt" \
        && -d "$NODE_DIR/node_modules/miniflare" ]]
}
if ! npm_ok; then
  say "installing npm binaryen@$BINARYEN_VERSION esbuild@$ESBUILD_VERSION wrangler@$WRANGLER_VERSION into $NODE_DIR"
  run_logged npm-install npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error
  npm_ok || die "npm install into $NODE_DIR did not give the expected versions (log: $TOOLS/logs/npm-install.log)"
fi
export WASM_BINDGEN_BIN
export WASM_OPT_BIN="$NODE_DIR/node_modules/.bin/wasm-opt"
export ESBUILD_BIN="$NODE_DIR/node_modules/.bin/esbuild"
"$ESBUILD_BIN" --version >/dev/null 2>&1 || die "esbuild at $ESBUILD_BIN does not run" "remove $NODE_DIR/node_modules and rerun"
say "tools: worker-build $WORKER_BUILD_VERSION ($WORKER_BUILD_BIN), wasm-bindgen $WB_VERSION, wasm-opt (binaryen $BINARYEN_VERSION), esbuild $ESBUILD_VERSION, wrangler $WRANGLER_VERSION"

if ((TOOLS_ONLY)); then
  say "tools ready in $(( $(date +%s) - START_TS )) s (--tools-only: not building)"
  exit 0
fi

# ---------------------------------------------------------------- build
export CARGO_TARGET_DIR="$TARGET_DIR"
unset CARGO_BUILD_TARGET_DIR
export CARGO_PROFILE_RELEASE_DEBUG=${CARGO_PROFILE_RELEASE_DEBUG:-0}
export CARGO_PROFILE_RELEASE_LTO=${CARGO_PROFILE_RELEASE_LTO:-true}
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-1}
export WRANGLER_SEND_METRICS=false
OUT_DIR="$CRATE_DIR/build"
say "building $CRATE_DIR -> $OUT_DIR (cargo target dir $CARGO_TARGET_DIR)"
BUILD_T0=$(date +%s)
BUILD_LOG="$TOOLS/logs/worker-build.log"
# (RUST_LIB_BACKTRACE=0: no anyhow backtrace under a build error)
if ! (cd "$CRATE_DIR" && RUST_LIB_BACKTRACE=0 "$WORKER_BUILD_BIN" --release "${PASSTHRU[@]}") >"$BUILD_LOG" 2>&1; then
  grep -v '^\s*Compiling ' "$BUILD_LOG" | tail -n 60 >&2
  die "worker-build failed (full log: $BUILD_LOG)"
fi
WARNINGS=$(grep -c '^warning' "$BUILD_LOG" || true)
((WARNINGS == 0)) || say "$WARNINGS compiler warning line(s); see $BUILD_LOG"

[[ -s "$OUT_DIR/index.js" ]] || die "worker-build finished but $OUT_DIR/index.js is missing (log: $BUILD_LOG)"
WASM_FILE=$(ls "$OUT_DIR"/*.wasm 2>/dev/null | head -n 1)
[[ -n "$WASM_FILE" ]] || die "worker-build finished but no .wasm in $OUT_DIR (log: $BUILD_LOG)"
EXPORTS=$(node -e '
  const s = require("fs").readFileSync(process.argv[1], "utf8");
  const all = [...s.matchAll(/export\s*\{([^}]*)\}/g)].flatMap(m => m[1].split(","))
    .map(x => x.trim().split(/\s+as\s+/).pop()).filter(Boolean);
  console.log(all.join(" "));' "$OUT_DIR/index.js" 2>/dev/null || true)
size_of() { wc -c <"$1" | tr -d ' '; }
gz_of() { gzip -9c "$1" | wc -c | tr -d ' '; }
say "wasm built in $(( $(date +%s) - BUILD_T0 )) s"
say "  $OUT_DIR/index.js  $(size_of "$OUT_DIR/index.js") B (gzip $(gz_of "$OUT_DIR/index.js") B)"
say "  $WASM_FILE  $(size_of "$WASM_FILE") B (gzip $(gz_of "$WASM_FILE") B)"
[[ -n "$EXPORTS" ]] && say "  exports: $EXPORTS"
say "done in $(( $(date +%s) - START_TS )) s; run it: MINIFLARE_PATH=$NODE_DIR/node_modules/miniflare node $SCRIPT_DIR/miniflare-host.mjs --script $OUT_DIR/index.js --port 8787"
