#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU tests and the sparse-KL benchmark, logs under $OUT.
#
# Why it exists: GPU time comes in short leases, so everything that needs a device runs from
# this one script, offline (nothing is installed from the network: the machine is expected
# to have torch, transformers, cupy-cuda13x, pyarrow and pytest), and the result is a short
# summary printed last plus at most 8 files under $OUT (default ./gpu-out).
#
#   bash tools/gpu_check.sh                 # tests + full benchmark grid
#   QUICK=1 bash tools/gpu_check.sh         # tests + kernel-only benchmark at N=4096
#
# Knobs: OUT, PYTHON (default python), QUICK=1, TEST_TIMEOUT (s, default 300),
# BENCH_TIMEOUT (s, default 360).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"

# 1. The project, importable as longkd.* without touching the network. An editable install
#    with --no-deps follows pyproject's folder mapping; if it fails (no setuptools, read-only
#    site-packages), fall back to a PYTHONPATH shim that links the folders into place.
if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    shim="$(mktemp -d)/longkd-shim"
    mkdir -p "$shim/longkd"
    for f in longkd/*; do ln -s "$PWD/$f" "$shim/longkd/"; done
    for d in cache trainer kernels tools; do ln -s "$PWD/$d" "$shim/longkd/$d"; done
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "editable install failed; using PYTHONPATH shim $shim" | tee -a "$OUT/install.log"
fi

# 2. What machine this is.
{
    nvidia-smi 2>&1 || echo "nvidia-smi not found"
    "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import cupy
    print("cupy", cupy.__version__, "cuda runtime", cupy.cuda.runtime.runtimeGetVersion())
except Exception as exc:
    print("cupy import failed:", exc)
from longkd.kernels import cupy_kl
print("cupy_kl.is_available:", cupy_kl.is_available(), cupy_kl.unavailable_reason())
EOF
} >"$OUT/env.txt" 2>&1

# 3. GPU tests (all folders), verbose, with a JUnit file for the per-test record.
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -m gpu -v -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml" >"$OUT/pytest-gpu.log" 2>&1
test_rc=$?

# 4. Benchmark: markdown on stdout, JSON beside it.
bench_args=(--json "$OUT/bench.json")
[ "${QUICK:-0}" = "1" ] && bench_args+=(--quick)
timeout "${BENCH_TIMEOUT:-360}" "$PY" -m longkd.tools.bench_kl "${bench_args[@]}" \
    >"$OUT/bench.md" 2>"$OUT/bench.err"
bench_rc=$?

# 5. Summary, last.
{
    echo "## gpu_check summary"
    echo
    echo "| step | exit | result |"
    echo "|---|---|---|"
    echo "| pytest -m gpu | $test_rc | $(tail -n 1 "$OUT/pytest-gpu.log" | tr -d '=|' | sed 's/^ *//') |"
    echo "| bench_kl | $bench_rc | $(grep -m1 '^device:' "$OUT/bench.md" || tail -n 1 "$OUT/bench.err") |"
    echo
    grep -E "^(FAILED|ERROR)" "$OUT/pytest-gpu.log" | head -n 20
    echo
    cat "$OUT/bench.md"
} | tee "$OUT/summary.md"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
