"""Optimizer benchmarks on CPU.

1. One AdamW step over N parameters (default 100M, fp32): the fused kernel on one flat tensor
   (csrc/kernels/cpu/adamw.cpp) against torch.optim.AdamW with foreach=True and with the for-loop,
   the params split into tensors of a transformer's sizes.
2. A training step of the ``small`` model at DP=4 (gloo, 4 processes) with the plain-DP optimizer
   and with ZeRO-1: step time, optimizer state per rank and peak resident memory per rank. ZeRO-1
   runs twice: with the parameter all-gather completed inside the step (the baseline) and with it
   overlapping the next forward (``--overlap-param-gather``).

    python benchmarks/bench_optimizer.py [--numel 100000000] [--steps 5] [--skip-dp] [--dp 4]
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


def _time(fn, steps: int) -> float:
    fn()  # warm-up (allocates the state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_adamw(numel: int, steps: int) -> None:
    from megatron_ds.optim.fused_adamw import fused_adamw_, has_kernel

    # Tensors of a d=1024 transformer layer (4 attention matrices, 3 FFN, 2 norms), repeated.
    sizes, layer = [], [1024 * 1024] * 4 + [1024 * 2816] * 3 + [1024] * 2
    for n in layer * (numel // sum(layer) + 1):
        take = min(n, numel - sum(sizes))
        if take <= 0:
            break
        sizes.append(take)
    gen = torch.Generator().manual_seed(0)
    flat_p = torch.randn(numel, generator=gen)
    flat_g = torch.randn(numel, generator=gen) * 1e-3
    m, v = torch.zeros(numel), torch.zeros(numel)
    step = [0]

    def fused():
        step[0] += 1
        fused_adamw_(flat_p, flat_g, m, v, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step[0])

    results = {"fused (csrc, one flat tensor)": _time(fused, steps)}
    del m, v
    for foreach in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in flat_p.split(sizes)]
        for p, g in zip(params, flat_g.split(sizes)):
            p.grad = g.clone()
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=foreach)
        results[f"torch.optim.AdamW foreach={foreach}"] = _time(opt.step, steps)
        del params, opt
    print(f"AdamW step over {numel / 1e6:.0f}M fp32 params ({len(sizes)} tensors for torch), "
          f"{torch.get_num_threads()} threads, compiled kernel: {has_kernel(torch.device('cpu'))}")
    base = results["fused (csrc, one flat tensor)"]
    for name, t in results.items():
        print(f"  {name:34s} {t * 1e3:8.1f} ms   {t / base:5.2f}x fused")


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike ru_maxrss, not inherited from the
    parent that forked the spawn helper)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dp_worker(rank: int, world: int, port: int, distributed: bool, overlap: bool, steps: int, queue) -> None:
    import torch.distributed as dist

    from megatron_ds.config import model_preset
    from megatron_ds.model.deepseek import DeepSeekModel
    from megatron_ds.optim.distributed_optimizer import MegatronOptimizer
    from megatron_ds.parallel.topology import build_parallel_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    state = build_parallel_state()
    cfg = model_preset("small")
    model = DeepSeekModel(cfg, seed=1234)
    opt = MegatronOptimizer(model, state, lr=1e-3, bucket_size=2_000_000, distributed=distributed,
                            overlap_param_gather=overlap)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), generator=gen)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        opt.grad_buffers[0].is_last_microbatch = True
        model(input_ids=ids, labels=ids).mean().backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    state_bytes = sum(4 * n for n in opt.state_numel().values())
    peak_rss = _peak_rss()
    queue.put((rank, statistics.median(times[1:]), state_bytes, peak_rss))
    dist.barrier()
    dist.destroy_process_group()


def bench_dp(steps: int, world: int = 4) -> None:
    import socket

    import torch.multiprocessing as mp

    print(f"small model ({'8x256'}), DP={world}, micro-batch 2 x 256 tokens, gloo, 1 thread per rank")
    times = {}
    for name, distributed, overlap in (("plain DP", False, False), ("ZeRO-1, all-gather in the step", True, False),
                                       ("ZeRO-1, all-gather overlapping the forward", True, True)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_dp_worker, args=(r, world, port, distributed, overlap, steps, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        out = sorted(q.get() for _ in range(world))
        for p in procs:
            p.join()
        t = max(o[1] for o in out)
        state = out[0][2]
        rss = max(o[3] for o in out)
        times[name] = t
        print(f"  {name:44s} step {t * 1e3:7.1f} ms   optimizer state/rank {state / 2**20:7.1f} MiB   "
              f"peak RSS/rank {rss / 2**20:7.1f} MiB")
    print(f"  ZeRO-1 all-gather overlap: {times['ZeRO-1, all-gather in the step'] / times[name]:.3f}x the step "
          f"with the all-gather inside it")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=100_000_000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-dp", action="store_true", help="only the AdamW kernel comparison")
    ap.add_argument("--dp", type=int, default=4, help="data-parallel ranks of the training-step comparison")
    args = ap.parse_args()
    bench_adamw(args.numel, args.steps)
    if not args.skip_dp:
        bench_dp(args.steps, args.dp)


if __name__ == "__main__":
    main()
