"""The column-parallel GEMM with its TP communication folded in (megatron_ds/parallel/linear_comm.py)
beside the composition it replaces (all-gather of the input as an autograd op, then ``F.linear``),
under sequence parallelism on gloo, 2 processes on this machine's cores.

For a 7B-shaped gate/up projection (h 4096 -> 2 x 11008 / TP) over s tokens: forward + backward time,
and the activation bytes autograd keeps for backward. The folded op keeps the local [s/tp, b, h]
input instead of the gathered [s, b, h] and gathers it again in backward (one more all-gather);
its backward starts the re-gather before the dX GEMM and the dX reduce-scatter before the dW GEMM.
On CPU the collectives compete with the GEMMs for the same cores, so the time is not expected to
improve here; on GPUs NCCL runs them beside the GEMMs.

    python benchmarks/bench_tp_linear.py [--tokens 2048] [--hidden 4096] [--ffn 11008] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(rank, world, port, args, queue):
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatron_ds.parallel.linear_comm import linear_with_tp_comm
    from megatron_ds.parallel.mappings import gather_from_sequence_parallel_region

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    gen = torch.Generator().manual_seed(rank)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    x = torch.randn(args.tokens // world, 1, args.hidden, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(2 * args.ffn // world, args.hidden, generator=gen) * 0.02).to(dtype).requires_grad_(True)
    dy = torch.randn(args.tokens, 1, 2 * args.ffn // world, generator=gen).to(dtype)

    def composed(x, w):
        return F.linear(gather_from_sequence_parallel_region(x, group, tensor_parallel_output_grad=True), w)

    def folded(x, w):
        return linear_with_tp_comm(x, w, group, True)

    out = {}
    for name, fn in (("gather + F.linear", composed), ("linear_with_tp_comm", folded)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(x, w)
        kept = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != w.data_ptr())
        y.backward(dy)
        times = []
        for _ in range(args.steps):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            fn(x, w).backward(dy)
            times.append(time.perf_counter() - t0)
        out[name] = (statistics.median(times), kept)
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    import torch.multiprocessing as mp

    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(q.get() for _ in range(world))
    for p in procs:
        p.join()
    print(f"column-parallel gate/up {args.hidden} -> 2 x {args.ffn}, {args.tokens} tokens, TP {world} with SP, "
          f"{'bf16' if args.bf16 else 'fp32'}, gloo, forward + backward (slowest rank, median of {args.steps})")
    base_t = max(r["gather + F.linear"][0] for r in results.values())
    base_m = results[0]["gather + F.linear"][1]
    for name in ("gather + F.linear", "linear_with_tp_comm"):
        t = max(r[name][0] for r in results.values())
        m = results[0][name][1]
        print(f"  {name:22s} {t * 1e3:8.1f} ms  {base_t / t:5.2f}x   kept for backward {m / 2**20:7.1f} MiB "
              f"({m / base_m:.2f} of the composition's)")


if __name__ == "__main__":
    main()
