"""Training throughput of the tiny model on CPU: megatron-ds at several layouts beside Hugging Face.

The baseline is `transformers.LlamaForCausalLM` of the same shape, trained by a plain PyTorch
loop (AdamW, grad clipping, gradient accumulation over the same micro-batches) on the same
batches, in the same run. Every configuration gets the machine's cores: one process with all
threads, or N processes with cores/N threads each.

    python benchmarks/bench_train_throughput.py [--model tiny] [--steps 30] [--layouts 1x1,2x1,1x2,2x2]

Prints tokens/s per configuration and the ratio to the baseline. A layout TPxDP runs under
torchrun on gloo (sequence parallelism on when TP > 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _config(args, tp=1, dp=1):
    from megatron_ds.config import config_from_args

    flags = ["--model", args.model, "--micro-batch-size", str(args.micro_batch_size),
             "--global-batch-size", str(args.global_batch_size), "--seq-length", str(args.seq_length),
             "--train-iters", str(args.steps), "--lr", "1e-3", "--lr-decay-style", "constant",
             "--mock-data", "--log-interval", str(10**9), "--tensor-model-parallel-size", str(tp)]
    if tp > 1:
        flags.append("--sequence-parallel")
    return config_from_args(flags)


def _timed_tokens_per_s(step_times: list[float], tokens_per_step: int, warmup: int) -> float:
    span = step_times[-1] - step_times[warmup - 1]
    return tokens_per_step * (len(step_times) - warmup) / span


def run_ours_worker(args) -> None:
    """One rank of a megatron-ds run (under torchrun); rank 0 prints a JSON result line."""
    import torch
    import torch.distributed as dist

    from megatron_ds.data.mock_dataset import MockGPTDataset
    from megatron_ds.parallel.topology import build_parallel_state, initialize_distributed
    from megatron_ds.pretrain import build_model
    from megatron_ds.training.trainer import Trainer

    device = initialize_distributed()
    world = dist.get_world_size()
    torch.set_num_threads(max(1, args.cores // world))
    cfg = _config(args, tp=args.tp, dp=world // args.tp)
    state = build_parallel_state(args.tp, 1, device=device)
    torch.manual_seed(0)
    model = build_model(cfg, state)
    t = cfg.training
    ds = MockGPTDataset(t.train_iters * t.global_batch_size, t.seq_length, cfg.model.vocab_size, t.seed)
    trainer = Trainer(cfg, state, model, ds)
    times = [time.perf_counter()]
    trainer.train(on_step=lambda res: times.append(time.perf_counter()))
    if dist.get_rank() == 0:
        tps = _timed_tokens_per_s(times[1:], t.global_batch_size * t.seq_length, args.warmup)
        print("RESULT " + json.dumps({"tokens_per_s": tps, "final_loss": trainer.result.losses[-1]}), flush=True)
    dist.destroy_process_group()


def run_ours(args, tp: int, dp: int) -> dict:
    nproc = tp * dp
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.abspath(__file__), "--worker", "--tp", str(tp)] + _passthrough(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.cores // nproc)), PYTHONPATH=REPO)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"layout TP{tp} x DP{dp} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def run_hf(args) -> dict:
    """The baseline: HF LlamaForCausalLM, same shape, same batches, a plain loop."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_ds.data.mock_dataset import MockGPTDataset
    from megatron_ds.data.sampler import collate

    torch.set_num_threads(args.cores)
    cfg = _config(args)
    m, t = cfg.model, cfg.training
    hf_cfg = LlamaConfig(
        vocab_size=m.padded_vocab_size(1), hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon, rope_theta=m.rotary_base, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, initializer_range=m.init_method_std)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    ds = MockGPTDataset(t.train_iters * t.global_batch_size, t.seq_length, m.vocab_size, t.seed)
    n_micro = t.global_batch_size // t.micro_batch_size
    times = [time.perf_counter()]
    loss = None
    for step in range(t.train_iters):
        opt.zero_grad(set_to_none=True)
        for k in range(n_micro):
            first = step * t.global_batch_size + k * t.micro_batch_size
            mb = collate([ds[i] for i in range(first, first + t.micro_batch_size)])
            logits = model(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten()) / n_micro
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter())
    tps = _timed_tokens_per_s(times[1:], t.global_batch_size * t.seq_length, args.warmup)
    return {"tokens_per_s": tps, "final_loss": float(loss.detach()) * n_micro}


def _passthrough(args) -> list[str]:
    return ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--seq-length", str(args.seq_length), "--cores", str(args.cores)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="comma-separated TPxDP")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_ours_worker(args)
        return
    print(f"model {args.model}, global batch {args.global_batch_size} x {args.seq_length} tokens, "
          f"micro-batch {args.micro_batch_size}, {args.steps} steps ({args.warmup} untimed), {args.cores} cores")
    base = run_hf(args)
    print(f"{'configuration':<34}{'tokens/s':>12}{'vs HF':>9}{'final loss':>12}")
    print(f"{'HF LlamaForCausalLM, plain loop':<34}{base['tokens_per_s']:>12.0f}{1.0:>9.2f}{base['final_loss']:>12.4f}")
    for layout in args.layouts.split(","):
        tp, dp = (int(x) for x in layout.lower().split("x"))
        r = run_ours(args, tp, dp)
        name = f"megatron-ds TP{tp} x DP{dp}" + (" +SP" if tp > 1 else "")
        print(f"{name:<34}{r['tokens_per_s']:>12.0f}{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}"
              f"{r['final_loss']:>12.4f}", flush=True)


if __name__ == "__main__":
    main()
