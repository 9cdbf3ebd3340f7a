"""Each CUDA kernel against its pure-PyTorch reference on the GPU: forward and backward, fp32 and bf16.

Tolerances as in tests/kernels/test_fused_cpu.py: fp32 math on both sides in a different order
(1e-5), or one bf16 rounding of fp32 values on each side (2^-7 relative, and of the max magnitude).
"""

import pytest
import torch

from megatron_ds.kernels import fused
from megatron_ds.kernels.rmsnorm import add_rms_norm, rms_norm
from megatron_ds.kernels.rotary import apply_rotary_qk, rotary_cos_sin
from megatron_ds.kernels.swiglu import swiglu
from megatron_ds.kernels.cross_entropy import fused_vocab_parallel_cross_entropy
from megatron_ds.parallel.cross_entropy import vocab_parallel_cross_entropy

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16]


def setup_module():
    assert fused.available() and fused.has_device_kernels(DEV), "megatron_ds._C_kernels_cuda is not built"


def assert_matches(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.device.type == DEV
    scale = max(1.0, ref.float().abs().max().item())
    if ref.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)
    else:
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=2 ** -7 * scale)


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def randn(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, device=DEV)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 37), (9, 3, 130), (512, 2, 4096), (64, 1, 8192)])
def test_rms_norm(shape, dtype):
    x, dy = randn(*shape, dtype=dtype, scale=3, seed=1), randn(*shape, dtype=dtype, seed=2)
    w = 1 + 0.2 * randn(shape[-1], dtype=torch.float32, seed=3).to(dtype)
    (xf, wf), (xr, wr) = leaves(x, w), leaves(x, w)
    yf, yr = fused.rms_norm(xf, wf, 1e-6), rms_norm(xr, wr, 1e-6)
    assert_matches(yf, yr)
    yf.backward(dy)
    yr.backward(dy)
    assert_matches(xf.grad, xr.grad)
    assert_matches(wf.grad, wr.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 37), (256, 2, 4096)])
def test_add_rms_norm(shape, dtype):
    x, res = randn(*shape, dtype=dtype, seed=4), randn(*shape, dtype=dtype, seed=5)
    dy, dh = randn(*shape, dtype=dtype, seed=6), randn(*shape, dtype=dtype, seed=7)
    w = 1 + 0.2 * randn(shape[-1], dtype=torch.float32, seed=8).to(dtype)
    (xf, rf, wf), (xr, rr, wr) = leaves(x, res, w), leaves(x, res, w)
    yf, hf = fused.add_rms_norm(xf, rf, wf, 1e-6)
    yr, hr = add_rms_norm(xr, rr, wr, 1e-6)
    assert torch.equal(hf, hr)
    assert_matches(yf, yr)
    torch.autograd.backward([yf, hf], [dy, dh])
    torch.autograd.backward([yr, hr], [dy, dh])
    for a, b in ((xf, xr), (rf, rr), (wf, wr)):
        assert_matches(a.grad, b.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s,b,nq,nkv,d", [(1, 2, 4, 2, 128), (33, 2, 6, 2, 6), (1024, 1, 32, 8, 128)])
def test_rotary(s, b, nq, nkv, d, dtype):
    pos = torch.randint(0, 4000, (b, s), device=DEV)
    cos, sin = rotary_cos_sin(pos, d, 10000.0, dtype)
    base = randn(s, b, (nq + 2 * nkv) * d, dtype=dtype, seed=9)
    dout = randn(s, b, (nq + 2 * nkv) * d, dtype=dtype, seed=10)
    outs, grads = [], []
    for fn in (fused.apply_rotary_qk, apply_rotary_qk):
        (qkv,) = leaves(base)
        out = fn(qkv * 1, nq + nkv, d, cos, sin)
        out.backward(dout)
        outs.append(out.detach())
        grads.append(qkv.grad)
    assert_matches(outs[0], outs[1])
    assert_matches(grads[0], grads[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 74), (2048, 1, 2 * 11008)])
def test_swiglu(shape, dtype):
    x = randn(*shape, dtype=dtype, scale=2, seed=11)
    dy = randn(*shape[:-1], shape[-1] // 2, dtype=dtype, seed=12)
    (xf,), (xr,) = leaves(x), leaves(x)
    yf, yr = fused.swiglu(xf), swiglu(xr)
    assert_matches(yf, yr)
    yf.backward(dy)
    yr.backward(dy)
    assert_matches(xf.grad, xr.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab,valid", [(1, 102400, 102400), (257, 102400, 102387), (5, 37, 30)])
def test_cross_entropy(rows, vocab, valid, dtype):
    logits = randn(rows, 1, vocab, dtype=dtype, scale=4, seed=13)
    target = torch.randint(0, valid, (rows, 1), device=DEV)
    grad = torch.rand(rows, 1, device=DEV)
    ref = logits.clone().requires_grad_(True)
    loss_ref = vocab_parallel_cross_entropy(ref, target, None, vocab_size=valid)
    loss_ref.backward(grad)
    z = logits.clone().requires_grad_(True)
    y = z * 1
    loss = fused_vocab_parallel_cross_entropy(y, target, None, vocab_size=valid)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    loss.backward(grad)
    assert_matches(y.detach(), ref.grad)  # the gradient was written over the logits
    assert torch.all(y.detach()[..., valid:] == 0)


def test_cross_entropy_allocates_no_logits_sized_buffer():
    rows, vocab = 2048, 102400
    x = torch.randn(rows, 1, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, vocab, (rows, 1), device=DEV)
    logits = torch.nn.functional.linear(x, w)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_vocab_parallel_cross_entropy(logits, target, None, vocab).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < logits.numel() * logits.element_size() / 4, f"{extra / 2**20:.1f} MB beyond the logits"


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_adamw_matches_torch_adamw_over_10_steps(weight_decay):
    """csrc/kernels/cuda/adamw.cu against torch.optim.AdamW on the GPU; 1e-6 absolute on params of order 1,
    as the CPU test (tests/optim/test_fused_adamw.py): torch's arithmetic in torch's order, FMAs aside."""
    from megatron_ds.optim import fused_adamw

    assert fused_adamw.has_kernel(torch.device(DEV))
    n = 1_000_003
    p0 = randn(n, dtype=torch.float32, seed=20)
    grads = [randn(n, dtype=torch.float32, seed=21 + i) for i in range(10)]
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8)
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=weight_decay, foreach=False)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        ref.grad = g.clone()
        opt.step()
        fused_adamw.fused_adamw_(p, g, m, v, weight_decay=weight_decay, step=step, **hp)
    state = opt.state[ref]
    for name, a, b in (("param", p, ref.detach()), ("exp_avg", m, state["exp_avg"]),
                       ("exp_avg_sq", v, state["exp_avg_sq"])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
