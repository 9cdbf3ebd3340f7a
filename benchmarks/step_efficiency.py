"""Share of the machine's matrix-multiply ceiling that a full training step reaches on CPU.

    python benchmarks/step_efficiency.py [--layers 1] [--tokens 2048] [--dtypes float32,bfloat16]

A stack of DeepSeek-7B-shaped decoder layers (hidden 4096, FFN 11008, 32 heads of 128, this
package's TransformerLayer with the fused kernels), ``--tokens`` tokens per step as one sequence,
trained for a step: forward, backward, AdamW (torch.optim.AdamW, foreach). Its model FLOPs

    per layer: 6 * tokens * (4 h^2 + 3 h f)           (the GEMMs: fwd 2, bwd 4 FLOPs per MAC)
             + 3 * 2 * tokens^2 * h                    (causal attention scores and values, fwd + bwd)

divided by the step time give its achieved rate, reported as a share of the rate of one large
``torch.mm`` of the same dtype (the ceiling the GEMMs can reach here), measured right before each
of ``--steps`` timed steps: the share is the median over those pairs, so load from other jobs on
a shared machine moves step and ceiling alike. A per-op profile of one more step shows where the
time goes.

``--cpu-malloc keep`` (the default, as the trainer's CPU runs) keeps freed memory mapped
(megatron_ds/cpu_allocator.py): without it every step re-faults its activations' pages, about
220k page faults per bf16 step at 1024 tokens. ``--cpu-malloc default`` leaves glibc as is. The
step's minor page faults are printed either way.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ds.config import ModelConfig, model_preset  # noqa: E402
from megatron_ds.cpu_allocator import keep_freed_memory  # noqa: E402
from megatron_ds.kernels import select_kernels  # noqa: E402
from megatron_ds.model.transformer_layer import TransformerLayer  # noqa: E402
from megatron_ds.kernels.rotary import rotary_cos_sin  # noqa: E402


def mm_rate(dtype: torch.dtype, n: int = 4096, repeats: int = 3, warm: bool = True) -> float:
    """Best FLOP/s of an n x n x n torch.mm."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    if warm:
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def step_flops(cfg: ModelConfig, layers: int, tokens: int) -> float:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    gemm = 6 * tokens * (4 * h * h + 3 * h * f)
    attention = 3 * 2 * tokens * tokens * h
    return layers * (gemm + attention)


def run(dtype: torch.dtype, layers: int, tokens: int, top: int, steps: int) -> dict:
    cfg = model_preset("deepseek-7b")
    kernels = select_kernels(fused=True)
    stack = torch.nn.ModuleList([TransformerLayer(cfg, i, params_dtype=dtype, kernels=kernels) for i in range(layers)])
    opt = torch.optim.AdamW(stack.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    x0 = torch.randn(tokens, 1, cfg.hidden_size).to(dtype)
    cos, sin = rotary_cos_sin(torch.arange(tokens)[None], cfg.head_dim, cfg.rotary_base, dtype)

    def step():
        x = x0.clone().requires_grad_(True)
        h = x
        for layer in stack:
            h = layer(h, cos, sin)
        h.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: Adam state, then a step whose allocations find the heap as every later one will
        step()
    # Timed steps, each right after a ceiling measurement: a change of load on a shared machine
    # then moves both, and the share is taken per pair (a ceiling measured once, in a quiet moment,
    # against a step that ran under load would understate the share).
    seconds, ceilings, faults = [], [], []
    for _ in range(steps):
        ceilings.append(mm_rate(dtype, repeats=2, warm=False))
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm_names = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_mkldnn", "mkldnn", "aten::linear")
    gemm = sum(e.self_cpu_time_total for e in events if any(e.key.startswith(n) for n in gemm_names))
    attn = sum(e.self_cpu_time_total for e in events if "flash_attention" in e.key or "scaled_dot" in e.key)
    fused_ops = sum(e.self_cpu_time_total for e in events if e.key.startswith("megatron_ds::"))
    flops = step_flops(cfg, layers, tokens)
    return dict(seconds=statistics.median(seconds), ceiling=statistics.median(ceilings),
                share=statistics.median(flops / t / c for t, c in zip(seconds, ceilings)),
                faults=int(statistics.median(faults)), flops=flops, table=table,
                shares=dict(gemm=gemm / total, attention=attn / total, fused_kernels=fused_ops / total,
                            other=1 - (gemm + attn + fused_ops) / total))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--steps", type=int, default=3, help="timed steps, each paired with a ceiling measurement")
    p.add_argument("--top", type=int, default=15, help="rows of the per-op profile")
    p.add_argument("--cpu-malloc", choices=("keep", "default"), default="keep",
                   help="keep: freed memory stays mapped for reuse (megatron_ds/cpu_allocator.py); default: glibc's")
    args = p.parse_args()
    kept = args.cpu_malloc == "keep" and keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.layers} x 7B layer(s), {args.tokens} tokens per step; "
          f"malloc {'keeps freed memory' if kept else 'glibc default'}")
    summary = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        r = run(dtype, args.layers, args.tokens, args.top, args.steps)
        achieved, ceiling = r["flops"] / r["seconds"], r["ceiling"]
        summary.append((name, r["seconds"], achieved, ceiling, r["share"]))
        print(f"\n== {name}: step {r['seconds']:.2f} s, {achieved / 1e9:.1f} GFLOP/s achieved, "
              f"torch.mm {ceiling / 1e9:.1f} GFLOP/s -> {r['share']:.0%} of the ceiling; "
              f"{r['faults']} page faults")
        print("time shares (profiled step): " + ", ".join(f"{k} {v:.0%}" for k, v in r["shares"].items()))
        print(r["table"])
    print("\nsummary")
    print(f"{'dtype':<10}{'step s':>8}{'GFLOP/s':>10}{'mm GFLOP/s':>12}{'share':>8}")
    for name, sec, ach, ceil, share in summary:
        print(f"{name:<10}{sec:>8.2f}{ach / 1e9:>10.1f}{ceil / 1e9:>12.1f}{share:>8.0%}")


if __name__ == "__main__":
    main()
