"""Fused CPU kernels against the PyTorch eager compositions they replace: forward + backward time, and
the cross-entropy's peak memory against the eager fp32 path.

    python benchmarks/kernels.py [--tokens 2048] [--hidden 4096] [--repeats 9] [--only swiglu,...]

Shapes are DeepSeek-7B's: hidden 4096, FFN 11008, 32 heads of 128, vocabulary 102400. Eager and
fused runs alternate (eager, fused, eager, fused, ...; --repeats each after one warm-up of each),
so load from other jobs on a shared machine hits both alike; times are medians, speedup = median
eager / median fused (> 1: the kernel is faster), and "paired" is the median of the per-round
ratios. With ``--cpu-malloc keep`` (the default, as in the trainer's CPU runs) freed memory is
reused; ``--cpu-malloc default`` puts every large output on fresh pages, whose page faults then
weigh most on the side that allocates more (eager).
CE peak memory is measured in a fresh subprocess per variant: the growth of peak RSS (Linux
VmHWM, reset just before) during one forward + backward on logits that already exist.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ds.cpu_allocator import keep_freed_memory  # noqa: E402
from megatron_ds.kernels import fused, reference_kernels  # noqa: E402
from megatron_ds.kernels.rotary import rotary_cos_sin  # noqa: E402
from megatron_ds.kernels.cross_entropy import fused_vocab_parallel_cross_entropy  # noqa: E402
from megatron_ds.parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402


def time_fwd_bwd_interleaved(make_inputs, fns, repeats: int, accumulate: bool = False) -> list[list[float]]:
    """Seconds of fn(*args) forward + backward for each fn, ``repeats`` runs each, interleaved.

    The runs alternate (fn0, fn1, fn0, fn1, ...) after one warm-up round, so a change of load on a
    shared machine hits every variant alike. ``make_inputs() -> (args, leaves)`` rebuilds the
    inputs outside the timed region; the output gradients (ones) are made in the warm-up round
    and reused, so neither side is charged for allocating them.

    The timed backward returns d/d(leaves) with ``torch.autograd.grad``, as the gradient reaches
    the previous op's backward in the model. ``accumulate=True`` runs ``.backward()`` into leaf
    ``.grad`` instead, which adds AccumulateGrad's copy wherever the gradient tensor is still
    referenced (the fused cross-entropy's, written over the harness-held logits; the fused
    add_rms_norm's one dx for both x and residual): a harness cost the model never pays.
    """
    times = [[] for _ in fns]
    grads = [None for _ in fns]
    for i in range(repeats + 1):
        for k, fn in enumerate(fns):
            args, leaves = make_inputs()
            t0 = time.perf_counter()
            out = fn(*args)
            outs = out if isinstance(out, tuple) else (out,)
            if grads[k] is None:
                grads[k] = [torch.ones_like(o) for o in outs]
            if accumulate:
                torch.autograd.backward(outs, grads[k])
            else:
                torch.autograd.grad(outs, leaves, grads[k])
            if i:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
            del args, leaves, out, outs
    return times


def cases(tokens: int, hidden: int, ffn: int, heads: int, dtype: torch.dtype):
    """(name, make_inputs, eager, fused) for the elementwise kernels; make_inputs() -> (args, leaves)."""
    ref = reference_kernels()
    g = torch.Generator().manual_seed(0)
    d = hidden // heads

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).requires_grad_(True)

    x0, r0, w0 = leaf(tokens, hidden), leaf(tokens, hidden), leaf(hidden)
    gu0 = leaf(tokens, 2 * ffn)
    qkv0 = leaf(tokens, 1, 3 * hidden)
    cos, sin = rotary_cos_sin(torch.arange(tokens)[None], d, 10000.0, dtype)

    def fresh(*ts):
        return [t.detach().clone().requires_grad_(True) for t in ts]

    def leaves_then(*extra):
        def make():
            ts = fresh(*extra)
            return ts + [1e-6] if len(extra) > 1 else ts, ts
        return make

    def rotary_inputs():
        (qkv,) = fresh(qkv0)
        y = qkv.clone()  # a non-leaf like the QKV GEMM's output; its backward passes the grad through
        return (y, 2 * heads, d, cos, sin), [qkv]

    return [
        ("rms_norm", leaves_then(x0, w0), ref.rms_norm, fused.rms_norm),
        ("add_rms_norm", leaves_then(x0, r0, w0), ref.add_rms_norm, fused.add_rms_norm),
        ("rotary_qk", rotary_inputs, ref.apply_rotary_qk, fused.apply_rotary_qk),
        ("swiglu", leaves_then(gu0), ref.swiglu, fused.swiglu),
    ]


def ce_case(tokens: int, vocab: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    z0 = (4 * torch.randn(tokens, 1, vocab, generator=g)).to(dtype)
    target = torch.randint(0, vocab, (tokens, 1), generator=g)

    def inputs():
        z = z0.clone().requires_grad_(True)
        # z.clone(): a non-leaf like the LM head's output, which the fused path overwrites with its gradient.
        return (z.clone(), target, None, vocab), [z]

    return inputs


def ce_peak_child(impl: str, tokens: int, vocab: int, dtype: str) -> None:
    """Run in a subprocess: print the RSS growth (MB) of one CE forward + backward on existing logits.

    The logits come from a thin LM head (hidden 64) so that its backward allocates nothing
    logits-sized: what grows beyond the logits is the cross-entropy's own memory.
    """
    dt = getattr(torch, dtype)
    x = torch.empty(tokens, 1, 64, dtype=dt).normal_().requires_grad_(True)
    w = torch.empty(vocab, 64, dtype=dt).normal_(std=0.5).requires_grad_(True)
    target = torch.randint(0, vocab, (tokens, 1))
    fn = fused_vocab_parallel_cross_entropy if impl == "fused" else vocab_parallel_cross_entropy
    logits = torch.nn.functional.linear(x, w)  # [tokens, 1, vocab]
    base = _reset_peak_rss_kb()
    loss = fn(logits, target, None, vocab)
    loss.sum().backward()
    peak = _status_kb("VmHWM")
    print(json.dumps({"extra_mb": (peak - base) / 1024, "logits_mb": logits.numel() * logits.element_size() / 2**20}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss_kb() -> int:
    """Reset the peak-RSS mark (Linux: clear_refs 5) and return the current RSS, in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def ce_peak(impl: str, tokens: int, vocab: int, dtype: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--ce-peak-child", impl, str(tokens), str(vocab), dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=102400)
    p.add_argument("--ce-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--only", default="", help="comma-separated kernel names to run (default: all)")
    p.add_argument("--cpu-malloc", choices=("keep", "default"), default="keep",
                   help="keep: freed memory stays mapped for reuse, as in the trainer's CPU runs "
                        "(megatron_ds/cpu_allocator.py); default: glibc's, every large tensor on fresh pages")
    p.add_argument("--accumulate", action="store_true",
                   help="backward into leaf .grad (AccumulateGrad) instead of torch.autograd.grad")
    p.add_argument("--ce-peak-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ce_peak_child:
        impl, tokens, vocab, dtype = args.ce_peak_child
        return ce_peak_child(impl, int(tokens), int(vocab), dtype)
    assert fused.available(), f"build the extension first: {fused.unavailable_reason()}"
    kept = args.cpu_malloc == "keep" and keep_freed_memory()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; tokens {args.tokens}, hidden {args.hidden}, "
          f"ffn {args.ffn}, heads {args.heads}; CE {args.ce_tokens} tokens x vocab {args.vocab}; backward "
          f"{'into leaf .grad' if args.accumulate else 'by autograd.grad'}, {args.repeats} interleaved repeats; malloc "
          f"{'keeps freed memory' if kept else 'glibc default'}")
    print(f"{'kernel':<14}{'dtype':<10}{'eager ms':>10}{'fused ms':>10}{'speedup':>9}{'paired':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        rows = [(n, mk, ref, fus) for n, mk, ref, fus in cases(args.tokens, args.hidden, args.ffn, args.heads, dtype)]
        rows.append(("cross_entropy", ce_case(args.ce_tokens, args.vocab, dtype), vocab_parallel_cross_entropy,
                     fused_vocab_parallel_cross_entropy))
        for n, mk, ref, fus in rows:
            if args.only and n not in args.only.split(","):
                continue
            ts_ref, ts_fus = time_fwd_bwd_interleaved(mk, (ref, fus), args.repeats, args.accumulate)
            t_ref, t_fus = statistics.median(ts_ref), statistics.median(ts_fus)
            paired = statistics.median(a / b for a, b in zip(ts_ref, ts_fus))
            print(f"{n:<14}{name:<10}{t_ref * 1e3:>10.2f}{t_fus * 1e3:>10.2f}{t_ref / t_fus:>8.2f}x{paired:>8.2f}x",
                  flush=True)
    if args.only:
        return
    print("\ncross-entropy peak memory beyond the logits (fwd + bwd, fresh process):")
    for dtype in ("bfloat16", "float32"):
        for impl in ("eager", "fused"):
            r = ce_peak(impl, args.ce_tokens, args.vocab, dtype)
            print(f"  {impl:<6} {dtype:<9} +{r['extra_mb']:8.1f} MB   (logits {r['logits_mb']:.1f} MB; "
                  f"an fp32 copy would be {r['logits_mb'] * (2 if dtype == 'bfloat16' else 1):.1f} MB)")


if __name__ == "__main__":
    main()
