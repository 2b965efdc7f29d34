#!/usr/bin/env bash
# The whole test suite: formatting, lints, every crate's tests and the black-box CLI tests.
# Installs what it needs (on Debian) and fetches the default model into the cache first.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v cc >/dev/null || need_apt+=(build-essential)
if ((${#need_apt[@]})); then
  echo "installing ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "error: cargo not found; install Rust 1.95+ (rustup) first" >&2
  exit 1
fi

export CARGO_TERM_COLOR=never
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The CUDA backend builds everywhere (libraries are loaded at run time); its device checks run
# on a GPU machine with kernels/gpu/check.sh.
cargo clippy --workspace --all-targets --locked --features cuda -- -D warnings
# Fetch the default model once (tests that need it find it in the cache).
cargo run --quiet --locked -- pull >/dev/null
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
