#!/usr/bin/env bash
# Issue 12's GPU check, one command on a fresh CUDA machine that brings its own torch and
# Triton and may have no package registry:
#
#     bash benchmarks/gpu_check.sh            # about 8 minutes at most
#
# 1. installs this checkout without dependencies (no registry needed),
# 2. runs the CUDA tests of tests/test_triton.py (against the float64 reference in fp32,
#    fp16 and bf16; the tanh's accuracy; the fast tanh; causal skipping),
# 3. prints the benchmark table (benchmarks/gpu_check.py) and the fast tanh's error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
"cuda", torch.cuda.is_available())'
"$PY" -m pip install --no-deps --no-build-isolation -q -e .

if "$PY" -c 'import pytest' 2>/dev/null; then
    timeout 240 "$PY" -m pytest tests/test_triton.py -q -p no:cacheprovider -rs \
        -k "gpu or import or without" || echo "gpu_check: CUDA tests FAILED (see above)"
else
    echo "gpu_check: pytest is not installed here; tests skipped"
fi

timeout 420 "$PY" benchmarks/gpu_check.py "$@"
