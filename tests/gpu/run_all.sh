#!/usr/bin/env bash
# On one CUDA GPU (sm_80 / sm_90), in about 5 minutes: build the extensions, check every CUDA kernel
# against its reference, train a small model on CUDA with the fused kernels beside the references,
# train a few steps in TE FP8 beside BF16 and resume FP8 from a checkpoint (when Transformer Engine
# is installed; those tests skip, saying so, without it), and print kernel time vs PyTorch eager
# and vs the memory-bandwidth bound.
#
# Works offline: the install takes nothing from a package index (--no-deps); the machine's Python
# must already hold torch with CUDA, numpy, pybind11, setuptools, pytest (and TE for the FP8 part).
# PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# Build the CUDA kernels for this GPU's architecture only (setup.py's default is sm_80 + sm_90).
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)}"
export TORCH_CUDA_ARCH_LIST

echo "== build (C++ and CUDA extensions, at install)"
"$PY" -m pip install --no-build-isolation --no-deps -e . >/tmp/megatron_ds_build.log 2>&1 ||
  { tail -n 40 /tmp/megatron_ds_build.log; exit 1; }
tail -n 1 /tmp/megatron_ds_build.log
"$PY" - <<'PY'
import importlib.util
import torch
from megatron_ds.kernels import fused
assert torch.cuda.is_available(), "no CUDA device"
assert fused.available(), fused.unavailable_reason()
assert fused.has_device_kernels("cuda"), "megatron_ds._C_kernels_cuda was not built (torch without CUDA, or no nvcc?)"
te = importlib.util.find_spec("transformer_engine") is not None
print(f"extensions loaded: {torch.cuda.get_device_name()}, torch {torch.__version__}; "
      f"Transformer Engine {'installed' if te else 'NOT installed: its tests will skip'}")
PY

echo "== CUDA kernels against their references; training on CUDA; TE FP8 / BF16 and FP8 resume"
"$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider

echo "== kernel times"
"$PY" tests/gpu/bench_cuda.py
