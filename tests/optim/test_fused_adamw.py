"""The fused AdamW kernel (csrc/kernels/cpu/adamw.cpp) against torch.optim.AdamW.

Tolerance 1e-6 absolute on params of order 1 over 10 steps: the kernel does torch's arithmetic in
torch's order, in fp32; what differs is contraction into FMAs and vector sqrt/div rounding, a few
ulps (~1e-7) per step.
"""

import pytest
import torch

from megatron_ds.optim import fused_adamw
from megatron_ds.optim.fused_adamw import adamw_reference_, fused_adamw_

HP = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8)


def _torch_adamw(p0, grads, weight_decay, foreach):
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=weight_decay, foreach=foreach)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]


def _ours(p0, grads, weight_decay, use_kernel):
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        fused_adamw_(p, g, m, v, weight_decay=weight_decay, step=step, use_kernel=use_kernel, **HP)
    return p, m, v


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    n = 100_003  # not a multiple of the vector width: the scalar tail runs too
    return torch.randn(n, generator=gen), [torch.randn(n, generator=gen) for _ in range(10)]


def test_compiled_kernel_is_registered():
    # The install always builds the C++ extension: its absence is a failure, not a skip.
    import megatron_ds._C_kernels  # noqa: F401
    assert fused_adamw.has_kernel(torch.device("cpu"))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_fused_matches_torch_adamw_over_10_steps(problem, weight_decay, foreach):
    p0, grads = problem
    ref = _torch_adamw(p0, grads, weight_decay, foreach)
    got = _ours(p0, grads, weight_decay, use_kernel=True)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_reference_matches_torch_adamw(problem):
    p0, grads = problem
    torch.testing.assert_close(_ours(p0, grads, 0.1, use_kernel=False)[0], _torch_adamw(p0, grads, 0.1, False)[0],
                               atol=1e-6, rtol=0)


def test_kernel_rejects_mismatched_sizes():
    assert fused_adamw.has_kernel(torch.device("cpu")), "pip install --no-build-isolation -e . builds it"
    p = torch.zeros(8)
    with pytest.raises(RuntimeError, match="grad has 4 elements"):
        torch.ops.megatron_ds.fused_adamw_(p, torch.zeros(4), torch.zeros(8), torch.zeros(8), 1e-3, 0.9, 0.95,
                                           1e-8, 0.0, 1)


def test_missing_extension_falls_back_with_one_warning(monkeypatch, problem):
    monkeypatch.setattr(fused_adamw, "has_kernel", lambda device: False)
    monkeypatch.setitem(fused_adamw._state, "warned", False)
    p0, grads = problem
    with pytest.warns(UserWarning, match="fused AdamW") as record:
        got = _ours(p0[:64], [g[:64] for g in grads], 0.1, use_kernel=True)
    assert len(record) == 1
    p, m, v = p0[:64].clone(), torch.zeros(64), torch.zeros(64)
    for step, g in enumerate(grads, start=1):
        adamw_reference_(p, g[:64], m, v, weight_decay=0.1, step=step, **HP)
    torch.testing.assert_close(got[0], p, atol=0, rtol=0)
