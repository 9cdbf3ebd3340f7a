"""CUDA kernel times against PyTorch eager and against the memory-bandwidth bound; prints one table.

    python tests/gpu/bench_cuda.py

Each row is forward + backward at DeepSeek-7B shapes (4096 tokens, hidden 4096, FFN 11008, 32 heads
of 128; cross-entropy 4096 tokens x 102400 vocabulary), in bf16. The AdamW row times one
optimizer step over 256M fp32 parameters (one flat buffer, as ZeRO-1 holds it) against
torch.optim.AdamW's foreach path (eager) and, for reference, torch's own fused CUDA AdamW.
"bound" is the time to move the
bytes the op must move at least (read inputs, write outputs, forward and backward) at the
bandwidth of a large device-to-device copy measured in the same run; "% of bound" = bound / fused.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_ds.kernels import fused, reference_kernels  # noqa: E402
from megatron_ds.kernels.rotary import rotary_cos_sin  # noqa: E402
from megatron_ds.kernels.cross_entropy import fused_vocab_parallel_cross_entropy  # noqa: E402
from megatron_ds.parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402

DEV = "cuda"


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    a = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) / 1e3)


def time_ms(make, fn, iters: int = 20) -> float:
    """Median ms of forward + backward; inputs rebuilt outside the timed region."""
    times = []
    for i in range(iters + 3):
        args, grads = make()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grads(outs))
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_step_ms(step, iters: int = 10) -> float:
    """Median ms of ``step()`` (no autograd)."""
    times = []
    for i in range(iters + 3):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def adamw_row(bw: float) -> str:
    """Our fused AdamW vs torch.optim.AdamW (foreach, and torch's fused) on one flat fp32 buffer."""
    from megatron_ds.optim.fused_adamw import fused_adamw_

    n = 256 * 2**20
    hp = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    p, g = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ours = time_step_ms(lambda: fused_adamw_(p, g, m, v, step=10, **hp))
    torch_ms = {}
    for name, kw in (("foreach", {"foreach": True}), ("torch fused", {"fused": True})):
        q = p.clone().requires_grad_(True)
        q.grad = g.clone()
        opt = torch.optim.AdamW([q], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                                weight_decay=hp["weight_decay"], **kw)
        torch_ms[name] = time_step_ms(opt.step)
        del opt, q
    bound = 7 * 4 * n / bw * 1e3  # read p, g, m, v; write p, m, v
    return (f"{'adamw':<15}{torch_ms['foreach']:>10.3f}{ours:>10.3f}{torch_ms['foreach'] / ours:>8.2f}x"
            f"{bound:>10.3f}{bound / ours:>11.0%}   (torch's fused AdamW: {torch_ms['torch fused']:.3f} ms)")


def main() -> None:
    assert fused.available() and fused.has_device_kernels(DEV), "megatron_ds._C_kernels_cuda is not built"
    dt, e = torch.bfloat16, 2
    T, H, F, NH, D, V, TCE = 4096, 4096, 11008, 32, 128, 102400, 4096
    ref = reference_kernels()
    bw = copy_bandwidth()

    def leaf(*shape):
        return torch.randn(*shape, device=DEV).to(dt).requires_grad_(True)

    x0, r0, w0, gu0 = leaf(T, H), leaf(T, H), leaf(H), leaf(T, 2 * F)
    qkv0 = leaf(T, 1, 3 * H)
    cos, sin = rotary_cos_sin(torch.arange(T, device=DEV)[None], D, 10000.0, dt)
    z0 = (4 * torch.randn(TCE, 1, V, device=DEV)).to(dt)
    tgt = torch.randint(0, V, (TCE, 1), device=DEV)

    def fresh(*ts):
        return [t.detach().clone().requires_grad_(True) for t in ts]

    def ones(outs):
        return [torch.ones_like(o) for o in outs]

    def rot():
        (qkv,) = fresh(qkv0)
        return (qkv.clone(), 2 * NH, D, cos, sin), ones

    def ce():
        z = z0.clone().requires_grad_(True)
        return (z.clone(), tgt, None, V), ones

    rows = [  # name, make, eager, fused, minimal bytes moved (fwd + bwd)
        ("rms_norm", lambda: (fresh(x0, w0) + [1e-6], ones), ref.rms_norm, fused.rms_norm, 5 * T * H * e),
        ("add_rms_norm", lambda: (fresh(x0, r0, w0) + [1e-6], ones), ref.add_rms_norm, fused.add_rms_norm,
         8 * T * H * e),
        ("rotary_qk", rot, ref.apply_rotary_qk, fused.apply_rotary_qk, 4 * 2 * T * H * e),
        ("swiglu", lambda: (fresh(gu0), ones), ref.swiglu, fused.swiglu, 8 * T * F * e),
        ("cross_entropy", ce, vocab_parallel_cross_entropy, fused_vocab_parallel_cross_entropy, 3 * TCE * V * e),
    ]
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s; bf16, fwd + bwd")
    print(f"{'kernel':<15}{'eager ms':>10}{'fused ms':>10}{'speedup':>9}{'bound ms':>10}{'% of bound':>12}")
    for name, make, eager_fn, fused_fn, nbytes in rows:
        t_e, t_f = time_ms(make, eager_fn), time_ms(make, fused_fn)
        bound = nbytes / bw * 1e3
        print(f"{name:<15}{t_e:>10.3f}{t_f:>10.3f}{t_e / t_f:>8.2f}x{bound:>10.3f}{bound / t_f:>11.0%}")
    print(adamw_row(bw))


if __name__ == "__main__":
    main()
