"""The C++ CPU kernels against their pure-PyTorch references: forward and backward, fp32 and bf16.

Awkward sizes on purpose: hidden sizes that are not a multiple of the vector width (8 floats for
AVX2; 37, 130) so the scalar tails run, one-token sequences, head dims below one vector, and the
102400 vocabulary.

Tolerances. fp32: both sides do fp32 math in a different order (vector lanes vs ATen's reductions),
a few 1e-7 relative per op, so 1e-5. bf16: both compute in fp32 and round once to bf16 (2^-8
relative); they may round a value that lies near a tie to neighbouring bf16 numbers, one ulp
apart, so 2^-7 relative plus 2^-7 of the tensor's largest magnitude for values near zero.

Gradcheck: the kernels are fp32/bf16 only (no float64 path), so float64 ``gradcheck`` runs on the
reference compositions, and the fused backward is held against float64 autograd of the reference.
"""

import warnings

import pytest
import torch

from megatron_ds.kernels import fused, reference_kernels, select_kernels
from megatron_ds.kernels.rmsnorm import add_rms_norm, rms_norm
from megatron_ds.kernels.rotary import apply_rotary_qk, rotary_cos_sin
from megatron_ds.kernels.swiglu import swiglu
from megatron_ds.kernels.cross_entropy import fused_vocab_parallel_cross_entropy
from megatron_ds.parallel.cross_entropy import cross_entropy_reference, vocab_parallel_cross_entropy

assert fused.available(), f"the CPU extension megatron_ds._C_kernels must be built for these tests: {fused.unavailable_reason()}"

DTYPES = [torch.float32, torch.bfloat16]


def assert_matches(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
    else:
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=2 ** -7 * scale)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 37), (5, 3, 130), (3, 2, 4096)], ids=["one-token-h37", "h130", "h4096"])
def test_rms_norm_forward_backward(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    (xf, wf), (xr, wr) = leaves(x, w), leaves(x, w)
    yf, yr = fused.rms_norm(xf, wf, 1e-6), rms_norm(xr, wr, 1e-6)
    assert_matches(yf, yr)
    yf.backward(dy)
    yr.backward(dy)
    assert_matches(xf.grad, xr.grad)
    assert_matches(wf.grad, wr.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 37), (7, 2, 130)], ids=["one-token-h37", "h130"])
def test_add_rms_norm_forward_backward(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy, dh = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    (xf, rf, wf), (xr, rr, wr) = leaves(x, res, w), leaves(x, res, w)
    yf, hf = fused.add_rms_norm(xf, rf, wf, 1e-6)
    yr, hr = add_rms_norm(xr, rr, wr, 1e-6)
    assert torch.equal(hf, hr)  # the sum is one rounding of the same two numbers
    assert_matches(yf, yr)
    torch.autograd.backward([yf, hf], [dy, dh])
    torch.autograd.backward([yr, hr], [dy, dh])
    for a, b in ((xf, xr), (rf, rr), (wf, wr)):
        assert_matches(a.grad, b.grad)


def _qkv(s, b, nq, nkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s, b, (nq + 2 * nkv) * d, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s,b,nq,nkv,d", [(1, 2, 4, 2, 128), (9, 2, 6, 2, 6), (5, 1, 4, 4, 34), (4, 3, 1, 1, 16)],
                         ids=["one-token-gqa-d128", "gqa-d6", "mha-d34", "replicated-kv-d16"])
def test_rotary_qk_in_place_on_fused_qkv(s, b, nq, nkv, d, dtype):
    # The fused QKV output [q heads | k heads | v heads]; arbitrary positions, different per sequence.
    position_ids = torch.randint(0, 4000, (b, s), generator=torch.Generator().manual_seed(3))
    cos, sin = rotary_cos_sin(position_ids, d, 10000.0, dtype)
    base = _qkv(s, b, nq, nkv, d, dtype, seed=4)
    dout = _qkv(s, b, nq, nkv, d, dtype, seed=5)
    outs, grads = [], []
    for fn in (fused.apply_rotary_qk, apply_rotary_qk):
        (qkv,) = leaves(base)
        y = qkv * 1  # a non-leaf, like the linear's output
        out = fn(y, nq + nkv, d, cos, sin)
        out.backward(dout)
        outs.append(out.detach())
        grads.append(qkv.grad)
    assert_matches(outs[0], outs[1])
    assert_matches(grads[0], grads[1])
    v = slice((nq + nkv) * d, None)
    assert torch.equal(outs[0][..., v], base[..., v]) and torch.equal(grads[0][..., v], dout[..., v])  # v untouched


def test_rotary_writes_in_place():
    cos, sin = rotary_cos_sin(torch.arange(3)[None], 8, 10000.0)
    qkv = torch.randn(3, 1, 4 * 8)
    assert fused.apply_rotary_qk(qkv, 3, 8, cos, sin).data_ptr() == qkv.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2 * 37), (4, 3, 2 * 130), (2, 1, 2 * 11008)], ids=["one-token-f37", "f130", "f11008"])
def test_swiglu_forward_backward(shape, dtype):
    g = torch.Generator().manual_seed(6)
    x = (2 * torch.randn(shape, generator=g)).to(dtype)
    dy = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(dtype)
    (xf,), (xr,) = leaves(x), leaves(x)
    yf, yr = fused.swiglu(xf), swiglu(xr)
    assert_matches(yf, yr)
    yf.backward(dy)
    yr.backward(dy)
    assert_matches(xf.grad, xr.grad)


def test_swiglu_saturates_like_silu_for_large_gates():
    # exp(-g) overflows float for g < -88.7 and underflows for g > 87.3: the kernel's fast exp clamps
    # there (a huge finite value, 0), so silu still goes to -0 and to g, and the gradient to 0 and 1.
    gate = torch.tensor([-1000.0, -120.0, -90.0, -88.0, -20.0, 0.0, 20.0, 88.0, 90.0, 120.0, 1000.0] * 3)
    x = torch.cat([gate, torch.full_like(gate, 0.5)]).view(1, -1)
    (xf,), (xr,) = leaves(x), leaves(x)
    yf, yr = fused.swiglu(xf), swiglu(xr)
    assert_matches(yf, yr)
    yf.sum().backward()
    yr.sum().backward()
    assert_matches(xf.grad, xr.grad)
    assert torch.isfinite(xf.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab,valid", [(1, 102400, 102400), (6, 102400, 102387), (5, 37, 30)],
                         ids=["one-token-v102400", "v102400-padded", "v37-padded"])
def test_cross_entropy_forward_backward_in_place(rows, vocab, valid, dtype):
    g = torch.Generator().manual_seed(7)
    logits = (4 * torch.randn(rows, 1, vocab, generator=g)).to(dtype)
    target = torch.randint(0, valid, (rows, 1), generator=g)
    target[0, 0] = valid - 1  # the last real column
    grad = torch.rand(rows, 1, generator=g)

    ref_logits = logits.clone().requires_grad_(True)
    ref_loss = vocab_parallel_cross_entropy(ref_logits, target, None, vocab_size=valid)
    ref_loss.backward(grad)

    z = logits.clone().requires_grad_(True)
    y = z * 1  # the LM head's output: a non-leaf the fused CE may overwrite
    loss = fused_vocab_parallel_cross_entropy(y, target, None, vocab_size=valid)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)  # fp32 math on both sides
    y.retain_grad()
    loss.backward(grad)
    # (retain_grad keeps its own copy, so compare values: the logits' storage now holds the gradient.)
    assert torch.equal(y.detach(), y.grad), "the gradient must be written over the logits"
    assert y.grad.dtype == dtype
    assert_matches(y.grad, ref_logits.grad)
    assert torch.all(y.grad[..., valid:] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_running_max_rises_in_every_chunk(dtype):
    # The forward finds max and sum-exp online, chunk by chunk (4096 logits in the kernel). Logits
    # that increase along the vocab raise the running max in every chunk, so the sum so far is
    # rescaled at each boundary; a decreasing row never rescales. The tail is not a whole vector.
    v = 3 * 4096 + 77
    ramp = torch.linspace(-40.0, 40.0, v)
    logits = torch.stack([ramp, ramp.flip(0)]).view(2, 1, v).to(dtype)
    target = torch.tensor([[v - 1], [5]])
    loss = fused_vocab_parallel_cross_entropy(logits.clone(), target, None)
    torch.testing.assert_close(loss, cross_entropy_reference(logits, target), rtol=1e-5, atol=1e-5)  # fp32 math both


def test_cross_entropy_nan_logit_gives_nan_loss():
    # A NaN must not vanish in the online max (NaN compares false) or in the fast exp: the step's
    # loss has to show it.
    logits = torch.randn(3, 1, 5000)
    logits[1, 0, 4500] = float("nan")
    loss = fused_vocab_parallel_cross_entropy(logits, torch.tensor([[0], [1], [2]]), None)
    assert torch.isnan(loss[1]).all() and torch.isfinite(loss[[0, 2]]).all()


def test_cross_entropy_equals_f_cross_entropy_in_fp32():
    g = torch.Generator().manual_seed(8)
    logits = 5 * torch.randn(4, 3, 1000, generator=g)
    target = torch.randint(0, 1000, (4, 3), generator=g)
    loss = fused_vocab_parallel_cross_entropy(logits.clone(), target, None)
    torch.testing.assert_close(loss, cross_entropy_reference(logits, target), rtol=1e-6, atol=1e-5)


# ---- float64: gradcheck of the references, and the fused backward against float64 autograd ----


def test_gradcheck_reference_compositions_in_float64():
    g = torch.Generator().manual_seed(9)
    d = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, res, w = d(3, 2, 7), d(3, 2, 7), d(7)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    assert torch.autograd.gradcheck(lambda a, r, b: add_rms_norm(a, r, b, 1e-6), (x, res, w))
    assert torch.autograd.gradcheck(swiglu, (d(3, 2, 10),))
    cos, sin = rotary_cos_sin(torch.tensor([[0, 5, 17]]), 6, 10000.0, torch.float64)
    assert torch.autograd.gradcheck(lambda qkv: apply_rotary_qk(qkv, 3, 6, cos, sin), (d(3, 1, 4 * 6),))
    # vocab_parallel_cross_entropy refuses a second backward (its softmax buffer is consumed), which
    # gradcheck needs; its unsharded definition is gradchecked instead, and the fused kernel is held
    # against float64 autograd of it below.
    target = torch.tensor([[1, 4, 0]])
    assert torch.autograd.gradcheck(lambda z: cross_entropy_reference(z, target, vocab_size=5), (d(1, 3, 6),))


def test_fused_backward_against_float64_autograd():
    g = torch.Generator().manual_seed(10)
    x64 = torch.randn(6, 67, generator=g, dtype=torch.float64, requires_grad=True)
    w64 = (1 + 0.1 * torch.randn(67, generator=g, dtype=torch.float64)).requires_grad_(True)
    dy = torch.randn(6, 67, generator=g, dtype=torch.float64)
    rms_norm(x64, w64, 1e-6).backward(dy)
    x32, w32 = x64.detach().float().requires_grad_(True), w64.detach().float().requires_grad_(True)
    fused.rms_norm(x32, w32, 1e-6).backward(dy.float())
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w32.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)

    z64 = (3 * torch.randn(5, 1, 300, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, 290, (5, 1), generator=g)
    cross_entropy_reference(z64, target, vocab_size=290).sum().backward()
    z32 = z64.detach().float().requires_grad_(True)
    y = z32 * 1
    y.retain_grad()
    fused_vocab_parallel_cross_entropy(y, target, None, vocab_size=290).sum().backward()
    torch.testing.assert_close(y.grad[..., :290].double(), z64.grad[..., :290], rtol=1e-5, atol=1e-6)

    gu64 = torch.randn(4, 2 * 19, generator=g, dtype=torch.float64, requires_grad=True)
    do = torch.randn(4, 19, generator=g, dtype=torch.float64)
    swiglu(gu64).backward(do)
    gu32 = gu64.detach().float().requires_grad_(True)
    fused.swiglu(gu32).backward(do.float())
    torch.testing.assert_close(gu32.grad.double(), gu64.grad, rtol=1e-5, atol=1e-5)


# ---- registration: meta tensors, torch.compile, the fallback ----


def test_ops_run_on_meta_tensors():
    ops = torch.ops.megatron_ds
    x = torch.empty(2, 3, 64, device="meta", dtype=torch.bfloat16)
    y, rstd = ops.rms_norm_fwd(x, torch.empty(64, device="meta"), 1e-6)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and rstd.shape == (2, 3) and rstd.dtype == torch.float32
    assert ops.swiglu_fwd(torch.empty(5, 2 * 11, device="meta")).shape == (5, 11)
    stats = ops.ce_fwd_stats(torch.empty(4, 2, 100, device="meta"), torch.empty(4, 2, dtype=torch.long, device="meta"), 90)
    assert [t.shape for t in stats] == [(8,)] * 3


def test_torch_compile_traces_fused_ops_and_their_backward():
    def block(x, w, gu):
        return fused.rms_norm(x, w, 1e-6).sum() + fused.swiglu(gu).sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x, w, gu = torch.randn(4, 19), torch.rand(19) + 0.5, torch.randn(4, 2 * 13)
    (xc, wc, gc), (xe, we, ge) = leaves(x, w, gu), leaves(x, w, gu)
    compiled(xc, wc, gc).backward()
    block(xe, we, ge).backward()
    for a, b in ((xc, xe), (wc, we), (gc, ge)):
        torch.testing.assert_close(a.grad, b.grad)


def test_missing_extension_warns_once_and_uses_references(monkeypatch):
    monkeypatch.setattr(fused, "_loaded", False)
    monkeypatch.setattr(fused, "_load_error", "No module named 'megatron_ds._C_kernels'")
    monkeypatch.setattr(fused, "_warned", False)
    with pytest.warns(UserWarning, match="fused kernels requested but"):
        k = select_kernels(fused=True)
    assert k.name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_kernels(fused=True).name == "reference"  # no second warning


def test_select_kernels():
    assert select_kernels(fused=True).name == "fused"
    assert select_kernels(fused=False) == reference_kernels()
