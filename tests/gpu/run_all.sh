#!/usr/bin/env bash
# On one CUDA GPU (sm_80 / sm_90), in about 5 minutes: build the extensions, check every CUDA kernel
# against its reference, train a small model a few steps in TE FP8 beside BF16 (when Transformer
# Engine is installed), and print kernel time vs PyTorch eager and vs the memory-bandwidth bound.
set -euo pipefail
cd "$(dirname "$0")/../.."
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

echo "== build (C++ and CUDA extensions, at install)"
pip install --no-build-isolation -e ".[test]" 2>&1 | tail -n 3
python - <<'PY'
import torch
from megatron_ds.kernels import fused
assert torch.cuda.is_available(), "no CUDA device"
assert fused.available(), fused.unavailable_reason()
assert fused.has_device_kernels("cuda"), "megatron_ds._C_kernels_cuda was not built (torch without CUDA, or no nvcc?)"
print("extensions loaded:", torch.cuda.get_device_name())
PY

echo "== CUDA kernels against their references; TE FP8 / BF16 training (skips without TE)"
python -m pytest tests/gpu -q -rs

echo "== kernel times"
python tests/gpu/bench_cuda.py
