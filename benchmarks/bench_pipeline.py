"""Pipeline schedules on CPU: time per step at PP=2 and PP=4 for several micro-batch counts M,
beside the ideal bubble fraction (P-1)/(M+P-1).

    python benchmarks/bench_pipeline.py [--pp 2,4] [--microbatches 1,2,4,8] [--interleaved]

How the bubble is estimated: each layout runs under torchrun, one process and one thread per
stage. In the same run, alternating with the pipelined steps (so both see the same machine load),
each stage times the forward+backward of one micro-batch through all its layers *alone*, while the
other stages wait at a barrier (t_stage; the slowest stage t_max). The pipelined step is the
forward/backward of a global batch of M micro-batches (no optimizer step). Without a bubble the
slowest stage would be busy all the time, so

    measured bubble = 1 - M * t_max / t_step        ideal (1F1B, equal stages) = (P-1) / (M+P-1)

(interleaved with V chunks per rank: the warm-up shrinks V-fold, ideal = ((P-1)/V) / (M + (P-1)/V)).

A stage needs a core of its own for the two to be comparable: with fewer cores than stages the
ranks time-share and the estimate mostly measures the oversubscription (the table says so).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _config(args, pp: int, m: int, interleaved: bool = False):
    from megatron_ds.config import config_from_args

    flags = ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
             "--ffn-hidden-size", str(args.hidden_size * 11 // 4), "--num-attention-heads", "8",
             "--num-query-groups", "4", "--vocab-size", str(args.vocab_size), "--max-position-embeddings", "1024",
             "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(m * args.micro_batch_size),
             "--seq-length", str(args.seq_length), "--train-iters", "1000", "--lr", "1e-3",
             "--lr-decay-style", "constant", "--mock-data", "--log-interval", str(10**9),
             "--pipeline-model-parallel-size", str(pp)]
    if interleaved:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(args.num_layers // (2 * pp))]
    return config_from_args(flags)


def run_worker(args) -> None:
    """One stage of a pipelined run (under torchrun); rank 0 prints one JSON line per M."""
    import torch
    import torch.distributed as dist

    from megatron_ds.parallel.topology import build_parallel_state, initialize_distributed
    from megatron_ds.pretrain import build_datasets, build_model
    from megatron_ds.training.trainer import Trainer

    torch.set_num_threads(1)
    device = initialize_distributed()
    pp, rank = dist.get_world_size(), dist.get_rank()
    state = build_parallel_state(1, pp, device=device)
    for m in [int(x) for x in args.microbatches.split(",")]:
        if args.interleaved and m % pp:
            continue  # the interleaved schedule needs M a multiple of P
        cfg = _config(args, pp, m, args.interleaved)
        model = build_model(cfg, state)
        train_ds, _ = build_datasets(cfg, None)
        trainer = Trainer(cfg, state, model, train_ds)
        batch = next(trainer._batches(train_ds, 0, 1))
        step_times, stage_times = [], [[] for _ in range(pp)]
        for _ in range(args.repeats + 1):
            for r in range(pp):  # each stage alone: one micro-batch through all of this rank's chunks
                dist.barrier()
                if r == rank:
                    stage_times[r].append(_stage_alone(trainer.model_chunks, batch[0], cfg))
            dist.barrier()
            start = time.perf_counter()
            trainer.forward_backward_step(batch)
            dist.barrier()  # the step ends when the last stage's last backward reaches stage 0
            step_times.append(time.perf_counter() - start)
        mine = torch.tensor([statistics.median(stage_times[rank][1:])], dtype=torch.float64)
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(pp)]
        dist.all_gather(gathered, mine)
        if rank == 0:
            print("RESULT " + json.dumps({"m": m, "step_s": statistics.median(step_times[1:]),
                                          "stage_s": [float(t) for t in gathered]}), flush=True)
    dist.destroy_process_group()


def _stage_alone(chunks, mb: dict, cfg) -> float:
    """Seconds of one micro-batch's forward+backward through this rank's chunks, no communication."""
    import torch

    b, s = mb["tokens"].shape
    start = time.perf_counter()
    for chunk in chunks:
        x = None if chunk.pre_process else torch.randn(s, b, cfg.model.hidden_size, requires_grad=True)
        y = chunk(input_ids=mb["tokens"] if chunk.pre_process else None, hidden_states=x,
                  position_ids=mb["position_ids"], labels=mb["labels"] if chunk.post_process else None)
        (y.mean() if chunk.post_process else y).backward(None if chunk.post_process else torch.ones_like(y))
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run_layout(args, pp: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={pp}",
           os.path.abspath(__file__), "--worker"] + _passthrough(args)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        raise RuntimeError(f"PP{pp} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return results


def _passthrough(args) -> list[str]:
    out = ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size), "--vocab-size",
           str(args.vocab_size), "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
           "--microbatches", args.microbatches, "--repeats", str(args.repeats)]
    return out + (["--interleaved"] if args.interleaved else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", default="2,4", help="comma-separated pipeline sizes")
    p.add_argument("--microbatches", default="1,2,4,8", help="comma-separated micro-batch counts M")
    p.add_argument("--interleaved", action="store_true", help="two model chunks per rank (interleaved 1F1B)")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per M (after one untimed)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.num_layers} layers, hidden {args.hidden_size}, vocab {args.vocab_size}, micro-batch "
          f"{args.micro_batch_size} x {args.seq_length} tokens, {'interleaved (2 chunks/rank)' if args.interleaved else '1F1B'}, "
          f"{cores} cores, one thread per stage")
    print(f"{'PP':>3}{'M':>4}{'step ms':>10}{'M*t_max ms':>12}{'bubble':>9}{'ideal':>8}{'ratio':>7}  stage ms (alone)")
    for pp in [int(x) for x in args.pp.split(",")]:
        for r in run_layout(args, pp):
            m, step = r["m"], r["step_s"]
            t_max = max(r["stage_s"])
            stages = " ".join(f"{t * 1e3:.1f}" for t in r["stage_s"])
            bubble = 1 - m * t_max / step
            v = 2 if args.interleaved else 1
            ideal = ((pp - 1) / v) / (m + (pp - 1) / v)
            note = "" if pp <= cores else f"  ({pp} stages on {cores} cores: time-shared)"
            print(f"{pp:>3}{m:>4}{step * 1e3:>10.1f}{m * t_max * 1e3:>12.1f}{bubble:>9.2f}{ideal:>8.2f}"
                  f"{bubble / ideal:>7.2f}  {stages}{note}", flush=True)


if __name__ == "__main__":
    main()
