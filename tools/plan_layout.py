"""Rank TP x PP x DP x micro-batch x recompute layouts of a model on a cluster (megatron_ds/planner.py
holds the model of memory and step time; this prints it).

    python tools/plan_layout.py --model deepseek-67b --gpus 256 --gpu h100 --global-batch-size 4608
    python tools/plan_layout.py --model deepseek-7b --gpus 64 --gpu a100 --global-batch-size 2304 --top 5
    python tools/plan_layout.py --model deepseek-67b --gpus 1024 --gpu h200 --ib-gbps 25 --show-rejected 5

Each row: estimated step time, memory of the fullest GPU, MFU, and why (memory breakdown of that stage,
pipeline bubble, exposed communication). The last line prints the winner's pretrain flags.
Bad input ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

try:
    import megatron_ds  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ds import planner
from megatron_ds.config import PRESETS, ConfigError, model_preset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deepseek-67b", help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", help=f"GPU type for the defaults below: {', '.join(planner.GPUS)}")
    p.add_argument("--memory-gib", type=float, help="GPU memory (GiB); default from --gpu")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU (TFLOP/s); default from --gpu")
    p.add_argument("--nvlink-gbps", type=float, help="intra-node bus bandwidth per GPU (GB/s); default from --gpu")
    p.add_argument("--ib-gbps", type=float, help="inter-node bandwidth per GPU (GB/s); default from --gpu")
    for f in ("gemm_efficiency", "headroom", "latency_us", "dp_overlap", "param_gather_overlap", "tp_overlap"):
        default = getattr(planner.Cluster(num_gpus=1), f)
        p.add_argument("--" + f.replace("_", "-"), type=float, default=default, help=f"default {default}")
    p.add_argument("--global-batch-size", type=int, help="sequences per step; default the paper's (7B 2304, 67B 4608)")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-sizes", default="1,2,4")
    p.add_argument("--layout", type=int, nargs=3, metavar=("TP", "PP", "MB"),
                   help="evaluate this one layout (the launch scripts' dry run) instead of searching")
    p.add_argument("--split", help="with --layout: layers per stage, e.g. 12,12,12,12,12,12,12,11 (default: balanced)")
    p.add_argument("--recompute", choices=["selective", "full"], help="with --layout: activation recomputation")
    p.add_argument("--top", type=int, default=10, help="feasible rows to print")
    p.add_argument("--show-rejected", type=int, default=0, help="also print this many rejected layouts with why")
    return p


PAPER_BATCH = {"deepseek-7b": 2304, "deepseek-67b": 4608}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.gpu not in planner.GPUS:
            raise ConfigError(f"--gpu {args.gpu!r}: choose one of {', '.join(planner.GPUS)} (and override its figures)")
        if args.gpus < 1 or args.gpus_per_node < 1:
            raise ConfigError("--gpus and --gpus-per-node must be >= 1")
        config = model_preset(args.model)
        base = planner.GPUS[args.gpu]
        gpu = dataclasses.replace(base, **{k: v for k, v in dict(
            memory_gib=args.memory_gib, peak_bf16_tflops=args.peak_tflops, nvlink_gbps=args.nvlink_gbps,
            ib_gbps=args.ib_gbps).items() if v is not None})
        cluster = planner.Cluster(num_gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu=gpu,
                                  gemm_efficiency=args.gemm_efficiency, headroom=args.headroom,
                                  latency_us=args.latency_us, dp_overlap=args.dp_overlap,
                                  param_gather_overlap=args.param_gather_overlap, tp_overlap=args.tp_overlap)
        gbs = args.global_batch_size or PAPER_BATCH.get(args.model)
        if gbs is None:
            raise ConfigError(f"--global-batch-size is needed for --model {args.model}")
        mbs = tuple(int(x) for x in args.micro_batch_sizes.split(","))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.layout:
        return check_one(args, config, cluster, gbs)

    t0 = time.perf_counter()
    plans = planner.plan_layouts(config, cluster, global_batch=gbs, seq=args.seq_length, micro_batches=mbs)
    elapsed = time.perf_counter() - t0
    ok = [p for p in plans if p.feasible]
    print(f"{args.model} on {args.gpus} x {gpu.name} ({gpu.memory_gib:g} GiB, budget "
          f"{cluster.budget_bytes / planner.GiB:.1f} GiB; {gpu.peak_bf16_tflops:g} TFLOP/s x {cluster.gemm_efficiency:g}; "
          f"NVLink {gpu.nvlink_gbps:g} GB/s, IB {gpu.ib_gbps:g} GB/s), global batch {gbs} x {args.seq_length}: "
          f"{len(ok)} of {len(plans)} layouts fit ({elapsed:.1f} s)")
    print(f"{'layout':<34} {'split':<14} {'M':>5} {'step s':>7} {'GiB':>6} {'MFU':>5}  reasoning")
    for p in ok[: args.top]:
        split = p.layout.stage_layers
        split_s = f"{split[0]}..{split[-1]}" if len(split) > 1 else str(split[0])
        print(f"{p.layout.name():<34} {split_s:<14} {p.num_microbatches:>5} {p.step_s:>7.2f} {p.memory_gib:>6.1f} "
              f"{p.mfu:>5.1%}  {p.reasoning()}")
    for p in [p for p in plans if not p.feasible][: args.show_rejected]:
        print(f"rejected {p.layout.name()}: {p.reason}")
    if not ok:
        print(f"error: no layout of {args.model} fits on {args.gpus} x {gpu.name}", file=sys.stderr)
        return 2
    print("flags: " + " ".join(ok[0].layout.flags(config.num_layers)))
    return 0


def check_one(args, config, cluster, gbs) -> int:
    """One row for a given layout: its estimate, or why it does not fit."""
    tp, pp, mb = args.layout
    if tp < 1 or pp < 1 or mb < 1 or args.gpus % (tp * pp):
        print(f"error: --layout {tp} {pp} {mb} does not divide --gpus {args.gpus}", file=sys.stderr)
        return 2
    try:
        head = planner.head_flops_per_token(config) / planner.layer_flops_per_token(config, args.seq_length)
        split = (tuple(int(x) for x in args.split.split(",")) if args.split
                 else tuple(planner.balanced_split(config.num_layers, pp, head)) if pp > 1 else (config.num_layers,))
    except (ConfigError, ValueError) as e:
        print(f"error: --split: {e}", file=sys.stderr)
        return 2
    lay = planner.Layout(tp, pp, args.gpus // (tp * pp), mb, args.recompute, 1, split)
    p = planner.evaluate(config, cluster, lay, global_batch=gbs, seq=args.seq_length)
    if not p.feasible:
        print(f"{lay.name()} on {args.gpus} x {cluster.gpu.name}: does not fit: {p.reason}")
        return 1
    print(f"{lay.name()} on {args.gpus} x {cluster.gpu.name}: est. {p.step_s:.2f} s/step, MFU {p.mfu:.1%}, "
          f"{p.memory_gib:.1f} of {cluster.budget_bytes / planner.GiB:.1f} GiB; {p.reasoning()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
