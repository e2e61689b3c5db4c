#!/usr/bin/env bash
# One prepared run on a machine with a CUDA GPU, under 5 minutes: bnlab on CUDA against
# torch's (cuDNN) batch norm.
#   1. the parity tests (module and functional, batch norm alone and with its activation)
#      and the edge-case table, CUDA variants;
#   2. `bnlab bench bn --device cuda` (each implementation interleaved with torch's kernel;
#      batch norm + activation at module level, without torch.compile);
#   3. a 2-epoch demo on the GPU (LeNet and BN-LeNet with bnlab's and torch's BN).
# Usage: scripts/gpu_check.sh [OUT]   (OUT defaults to runs/gpu-check; needs Fashion-MNIST,
# see README, or set BNLAB_DATA). Run from the repository root; PYTHON overrides the
# interpreter (default: .venv/bin/python, else python3).
set -euo pipefail

OUT=${1:-runs/gpu-check}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch " + torch.__version__)
print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__,
      "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
PY

echo "== 1/3 parity and edge-case tests on CUDA"
# -k cuda: the CUDA variants of the device-parametrized tests, plus the CUDA-only ones.
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/nn/test_batchnorm.py tests/nn/test_batchnorm_act.py tests/test_functional.py \
  tests/nn/test_edge_cases.py \
  -k "cuda" 2>&1 | tee "$OUT/tests.txt" | tail -n 25

echo "== 2/3 bnlab bench bn --device cuda"
timeout 90 "$PYTHON" -m bnlab.cli bench bn --device cuda --repeats 50 --no-compiled \
  | tee "$OUT/bench-bn.md"

echo "== 3/3 bnlab demo --epochs 2 on the GPU"
timeout 120 "$PYTHON" -m bnlab.cli demo --epochs 2 --device cuda --out "$OUT/demo" --fresh \
  --no-progress | tee "$OUT/demo.txt" | tail -n 20

echo "gpu_check: done; outputs in $OUT"
