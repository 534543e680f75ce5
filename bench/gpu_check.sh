#!/usr/bin/env bash
# GPU checks for the Triton kernels, in one go, under 8 minutes on an H100/H200-class machine:
#   1. the gpu-marked tests (bf16, autotuned tiles, long sequences),
#   2. bench/kernels.py (prefill TFLOP/s and decode latency vs SDPA flash), table into $OUT/bench.md,
#   3. every non-slow kernel test compiled for CUDA (fixed tiles: one compile per shape, not eight).
# Runs from the source tree, no install and no network: the GPU machine has its own Python, torch and triton
# (3.6 there, 3.9 here). Usage: bash bench/gpu_check.sh [extra bench/kernels.py args, e.g. --quick]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET
status=0

"$PY" - <<'PYEOF' | tee "$OUT/machine.txt"
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE"
print(f"{gpu}; torch {torch.__version__}; triton {tv}; python {platform.python_version()}")
PYEOF
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || echo "warning: no CUDA device: the tests below run in Triton's interpreter and the gpu cases skip"

# Order by value: gpu-marked tests, then the benchmark table, then the CPU-tested cases compiled for CUDA.
# Budget (480 s): about 100 compiles of 1-2 s each dominate the first and last steps.
if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== gpu-marked tests (bf16, autotuned)"
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels -m gpu 2>&1 | tail -25 \
    | tee "$OUT/tests_gpu.txt" || status=1
else
  echo "pytest is not importable by $PY: tests not run (set PYTHON to an interpreter that has it)"
  status=1
fi

echo "== benchmark"
timeout 190 "$PY" bench/kernels.py "$@" 2>&1 | tee "$OUT/bench.md" || status=1

if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== kernel tests on CUDA (fixed tiles: one compile per shape)"
  INSTRUCTLM_TRITON_AUTOTUNE=0 timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels \
    -m "not slow and not gpu" 2>&1 | tail -25 | tee "$OUT/tests.txt" || status=1
fi
echo "gpu_check: exit $status; outputs in $OUT/"
exit $status
