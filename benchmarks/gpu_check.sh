#!/usr/bin/env bash
# Run the CUDA tests natively and the GPU benchmarks, on a machine with an
# NVIDIA GPU (H100 / H200), from the repository root:
#
#     bash benchmarks/gpu_check.sh [repeat]
#
# Needs, in the active Python environment: normkit with its test extra and a
# numba-cuda that matches the driver, e.g.
#     pip install -e ".[test]" "numba-cuda[cu12]"
# and, for the torch ratio columns, a CUDA build of PyTorch.  Nothing is
# installed here (GPU machines are often offline).  Prints the device, the
# test results and the benchmark table (benchmarks/gpu_suites.py; the same
# suites run under asv with `asv run --python=same -b gpu_suites`).
set -euo pipefail
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python - <<'PY'
import numba, numpy
from numba import cuda
assert cuda.is_available(), "numba.cuda sees no GPU"
print("numba", numba.__version__, "numpy", numpy.__version__,
      "device", cuda.get_current_device().name)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except ImportError:
    print("torch not installed: no torch ratio columns")
PY

# Native run: the simulator must stay off (tests/conftest.py only turns it
# on where there is no NVIDIA driver).
export NUMBA_ENABLE_CUDASIM=0
python -m pytest -q tests/test_cuda.py tests/test_cuda_import.py tests/test_cuda_bench.py

python benchmarks/gpu_suites.py --repeat "${1:-20}"
