"""Training on CUDA: the fused CUDA kernels follow the loss curve of the reference ops.

The CPU twin is tests/kernels/test_fused_training.py. Same model, data and seed; only
``--no-fused-kernels`` differs. In fp32 the two differ by summation order alone (a few 1e-7
relative per op on CPU); on the GPU cuBLAS and SDPA reduce in their own orders on both sides, so
1e-4 relative over 20 steps leaves a wide margin, while a wrong gradient moves the curve by more
than 1e-3 within two steps (measured on CPU). In bf16 every op rounds its output to 8 bits of
mantissa on both sides, at different points: 3e-2 relative (a few bf16 ulps of the loss).
"""

import functools

import pytest
import torch

from megatron_ds.config import config_from_args
from megatron_ds.parallel.topology import single_process_state
from megatron_ds.pretrain import build_model, run
from tests.kernels.test_fused_training import FLAGS, STEPS  # the CPU twin's model, data and schedule

CUDA = torch.device("cuda")
RTOL = {"fp32": 1e-4, "bf16": 3e-2}


@functools.lru_cache(maxsize=None)
def _losses(dtype: str, fused: bool) -> tuple:
    cfg = config_from_args(FLAGS + (["--bf16"] if dtype == "bf16" else []) + ([] if fused else ["--no-fused-kernels"]))
    return tuple(run(cfg, single_process_state(CUDA), log=False).losses)


def test_model_is_on_cuda_with_the_fused_kernels():
    model = build_model(config_from_args(FLAGS), single_process_state(CUDA))
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert model.kernels.name == "fused"  # select_kernels falls back to the references without CUDA kernels


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_kernels_follow_the_reference_curve(dtype):
    got, ref = _losses(dtype, True), _losses(dtype, False)
    assert len(got) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert a == pytest.approx(b, rel=RTOL[dtype]), f"step {step}: fused {a} vs reference {b}"
    assert got[-1] < got[0] - 0.25  # it trains: the CPU twin's loss falls by 0.50 over these 20 steps
