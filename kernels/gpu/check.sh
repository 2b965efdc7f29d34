#!/usr/bin/env bash
# Tessera's device check, in one go (< 8 minutes) on a GPU machine with CUDA 13, Python, PyTorch
# and transformers, but no Rust: run from anywhere, with the prebuilt binary at .gpu-bin/tessera
# (override: TESSERA_BIN=path). Logs and JSON go to $OUT if set, else ./gpu-out.
#
#   bash kernels/gpu/check.sh
#
# Environment: OUT (output folder), TESSERA_BIN, PYTHON (default python3), CHECK_TOTAL_S (budget,
# default 470), CHECK_INIT (random-weight recipe of check.py: stable | hf), PROFILE=1 (then ncu
# times each kernel of batch-1 decode: profile.log; PROFILE_LIMIT_S bounds it). See README.md.
#
# Steps, each tee'd to $OUT/<step>.log and bounded by `timeout`:
#   setup         GPU, driver, CUDA libraries found (ldconfig + pip nvidia wheels), versions
#   test_kernels  every kernels/cuda/*.cu against PyTorch (CuPy, NVRTC)   -> test_kernels.json
#   check         check.py: ceilings, tessera self-checks, correctness, speed -> check.json
# Exit status: 0 only when every step passed.
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2  # the repository root
OUT_DIR="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT_DIR"
BIN="${TESSERA_BIN:-.gpu-bin/tessera}"
PY="${PYTHON:-python3}"
TOTAL_S="${CHECK_TOTAL_S:-470}"  # whole-script budget, seconds
export PYTHONUNBUFFERED=1
status=0

setup() {
    echo "date: $(date -u +%FT%TZ)"
    echo "--- nvidia-smi"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi failed"
    echo "--- ldconfig"
    ldconfig -p 2>/dev/null | grep -E 'libcuda|libnvrtc|libcublas|libnccl' || echo "(no CUDA libraries in ldconfig's cache)"
    echo "--- python: $(command -v "$PY")"
    timeout 60 "$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" || echo "python import failed"
    echo "--- pip nvidia library folders"
    printf '%s\n' "${LIB_DIRS[@]:-}"
    echo "--- binary: $BIN"
    if [ -x "$BIN" ]; then ls -l "$BIN"; else echo "MISSING or not executable: $BIN"; fi
}

# The pip CUDA wheels' library folders (CUDA 13 wheels: nvidia/cu13/lib; NCCL: nvidia/nccl/lib).
mapfile -t LIB_DIRS < <(timeout 60 "$PY" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
seen = []
for root in roots:
    for d in sorted(glob.glob(os.path.join(root, "*", "lib"))):
        if glob.glob(os.path.join(d, "*.so*")) and d not in seen:
            seen.append(d)
print("\n".join(seen))
EOF
)
CUDA_ARGS=()
for d in "${LIB_DIRS[@]}"; do
    [ -n "$d" ] || continue
    CUDA_ARGS+=(--cuda-lib-dir "$d")
    export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done

# step NAME LIMIT_S CMD...: runs CMD under `timeout`, output tee'd to $OUT_DIR/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s, at ${SECONDS} s) ==="
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)') ==="
    [ "$rc" = 0 ] || status=1
}

step setup 120 bash -c "$(declare -f setup); $(declare -p LIB_DIRS BIN PY); setup"
step test_kernels 150 "$PY" kernels/gpu/test_kernels.py --backend cupy --bench --out "$OUT_DIR/test_kernels.json"
left=$((TOTAL_S - SECONDS - 15))
[ "$left" -gt 60 ] || left=60
WORK=/tmp/tessera-check-work
rm -rf "$WORK"
step check $((left + 30)) "$PY" kernels/gpu/check.py --bin "$BIN" --out "$OUT_DIR" --budget-s "$left" \
    --init "${CHECK_INIT:-stable}" --work "$WORK" \
    --test-kernels-json "$OUT_DIR/test_kernels.json" ${CUDA_ARGS[@]+"${CUDA_ARGS[@]}"}
# Optional (PROFILE=1): per-kernel time of batch-1 decode on the 8B checkpoint, with ncu.
if [ "${PROFILE:-0}" = 1 ] && [ -d "$WORK/mistral-8b" ]; then
    profile_status=$status
    step profile "${PROFILE_LIMIT_S:-150}" "$PY" kernels/gpu/ncu_profile.py --bin "$BIN" --model "$WORK/mistral-8b" \
        --device cuda --cache-dir "$WORK/cache" ${CUDA_ARGS[@]+"${CUDA_ARGS[@]}"}
    status=$profile_status  # informative only
fi
rm -rf "$WORK"

echo "check.sh: $([ "$status" = 0 ] && echo PASSED || echo FAILED) in ${SECONDS} s; logs and JSON in $OUT_DIR"
exit "$status"
