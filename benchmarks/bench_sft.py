"""SFT throughput against pre-training the same model, at TP 2 x DP 2 on CPU (4 processes, gloo).

Both runs: the same model, layout, micro/global batch, sequence length and number of steps; the
first --warmup steps are not timed. Pre-training reads mock tokens with plain causal attention;
SFT reads packed conversations (tools/preprocess_sft.py output of examples/sft_conversations.py)
with the document-causal mask, restarted positions and the assistant-only loss mask. What SFT
costs beyond pre-training: building each packed sample and the explicit [s, s] attention mask
(SDPA takes the is_causal fast path without one).

    python benchmarks/bench_sft.py [--model tiny] [--steps 30] [--seq-length 256]

Prints tokens/s (all positions of the batch) of each, the median of --repeats interleaved runs, and
the ratio SFT / pre-training, plus the share of positions that carry loss in SFT (the rest is prompt
and padding).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TP, DP = 2, 2


def _flags(args) -> list[str]:
    return ["--model", args.model, "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.global_batch_size), "--seq-length", str(args.seq_length),
            "--train-iters", str(args.steps), "--lr", "1e-3", "--lr-decay-style", "constant",
            "--log-interval", str(10**9), "--tensor-model-parallel-size", str(TP), "--sequence-parallel"]


def worker(args) -> None:
    """One rank of a run (under torchrun); rank 0 prints a RESULT line."""
    import torch
    import torch.distributed as dist

    from megatron_ds.config import config_from_args
    from megatron_ds.data.mock_dataset import MockGPTDataset
    from megatron_ds.data.sft_dataset import ConversationCorpus, SFTDataset
    from megatron_ds.parallel.topology import build_parallel_state, initialize_distributed
    from megatron_ds.pretrain import build_model
    from megatron_ds.sft import SFTRunConfig, SFTTrainer
    from megatron_ds.training.trainer import Trainer

    device = initialize_distributed()
    torch.set_num_threads(max(1, args.cores // dist.get_world_size()))
    cfg = config_from_args(_flags(args), SFTRunConfig, "megatron_ds.sft")
    state = build_parallel_state(TP, 1, device=device)
    torch.manual_seed(0)
    model = build_model(cfg, state)
    t = cfg.training
    n = t.train_iters * t.global_batch_size
    if args.mode == "sft":
        ds = SFTDataset(ConversationCorpus(args.data), t.seq_length, t.seed, num_samples=n)
        trainer = SFTTrainer(cfg, state, model, ds)
        loss_share = ds.stats.loss_tokens / (ds.num_packed * t.seq_length)
    else:
        ds = MockGPTDataset(n, t.seq_length, cfg.model.vocab_size, t.seed)
        trainer = Trainer(cfg, state, model, ds)
        loss_share = 1.0
    times = [time.perf_counter()]
    trainer.train(on_step=lambda res: times.append(time.perf_counter()))
    if dist.get_rank() == 0:
        timed = times[args.warmup:]
        tps = t.global_batch_size * t.seq_length * (len(timed) - 1) / (timed[-1] - timed[0])
        print("RESULT " + json.dumps({"tokens_per_s": tps, "loss_share": loss_share,
                                      "first_loss": trainer.result.losses[0],
                                      "final_loss": trainer.result.losses[-1]}), flush=True)
    dist.destroy_process_group()


def launch(args, mode: str, data: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={TP * DP}",
           os.path.abspath(__file__), "--worker", "--mode", mode, "--data", data,
           "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
           "--global-batch-size", str(args.global_batch_size), "--cores", str(args.cores)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.cores // (TP * DP))), PYTHONPATH=REPO)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{mode} run failed:\n{out.stderr[-3000:]}")


def make_sft_data(directory: str, conversations: int) -> str:
    """Generated conversations -> tokenizer -> binarized SFT prefix."""
    from examples import sft_conversations
    from tools import preprocess_sft, train_tokenizer

    chats, corpus = os.path.join(directory, "chats.jsonl"), os.path.join(directory, "corpus.jsonl")
    sft_conversations.main(["--output", chats, "--conversations", str(conversations), "--text-output", corpus])
    tok = os.path.join(directory, "tokenizer.json")
    if train_tokenizer.main(["--input", corpus, "--vocab-size", "320", "--output", tok]) != 0:
        raise RuntimeError("train_tokenizer failed")
    prefix = os.path.join(directory, "chats")
    if preprocess_sft.main(["--input", chats, "--output-prefix", prefix, "--tokenizer-model", tok]) != 0:
        raise RuntimeError("preprocess_sft failed")
    return prefix


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--conversations", type=int, default=4000)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; the median is reported")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("sft", "pretrain"), help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    runs = {"pretrain": [], "sft": []}
    with tempfile.TemporaryDirectory() as d:
        prefix = make_sft_data(d, args.conversations)
        # Alternate the two, --repeats times each: a shared machine's load drifts, and the median of
        # interleaved runs is what both saw alike.
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(launch(args, mode, prefix))

    def median(mode):
        ordered = sorted(runs[mode], key=lambda r: r["tokens_per_s"])
        return ordered[len(ordered) // 2]

    pre, sft = median("pretrain"), median("sft")
    each = {m: ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs[m]) for m in runs}
    print(f"model {args.model}, TP {TP} x DP {DP} on {args.cores} cores, {args.steps} steps ({args.warmup} untimed), "
          f"global batch {args.global_batch_size} x {args.seq_length} tokens, micro-batch {args.micro_batch_size}; "
          f"median of {args.repeats} interleaved runs each")
    print(f"pre-training: {pre['tokens_per_s']:,.0f} tokens/s (runs: {each['pretrain']}; "
          f"loss {pre['first_loss']:.3f} -> {pre['final_loss']:.3f})")
    print(f"SFT:          {sft['tokens_per_s']:,.0f} tokens/s (runs: {each['sft']}; loss {sft['first_loss']:.3f} -> "
          f"{sft['final_loss']:.3f}; {100 * sft['loss_share']:.0f}% of positions carry loss)")
    print(f"ratio SFT / pre-training: {sft['tokens_per_s'] / pre['tokens_per_s']:.3f}")

if __name__ == "__main__":
    main()
