"""What a DPO step costs against plain fine-tuning of the same sequences, on CPU.

    python benchmarks/bench_dpo.py [--num-layers 4] [--hidden-size 128] [--seq-length 256] [--pairs 8]

One global batch of ``--pairs`` preference pairs, single process, fp32, no optimizer step:

    DPO (reference every step)  the frozen reference model's forward over the 2 x pairs rows, then the
                                policy's forward + backward over the same rows with the DPO loss
    DPO (precomputed reference) the policy's forward + backward only (--dpo-precompute-ref)
    SFT / pre-training          forward + backward of the same 2 x pairs rows with the token-mean loss:
                                the "two fine-tuning passes" a pair amounts to (chosen and rejected)

Each variant runs --repeats times after --warmup, interleaved round-robin so all see the same machine load;
the table gives the median and the ratio to SFT. A forward is about a third of a forward + backward
(the backward does two multiplies of the forward's size per GEMM), so the reference pass should cost
about 1/3 on top and the precomputed variant about nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def synthetic_pairs(n: int, seq_length: int, vocab: int, seed: int = 0):
    """n pairs of random tokens: a shared prompt of half the sequence, replies filling the rest (full rows,
    so no padding flatters either side)."""
    import numpy as np

    from megatron_ds.data.dpo_dataset import PreferencePairs

    rng = np.random.default_rng(seed)
    pairs = PreferencePairs(path="<synthetic>", seq_length=seq_length, pad_id=0)
    prompt_len = seq_length // 2
    for _ in range(n):
        prompt = rng.integers(3, vocab, prompt_len)
        mask = np.r_[np.zeros(prompt_len, np.int8), np.ones(seq_length + 1 - prompt_len, np.int8)]
        for ids_list, mask_list in ((pairs.chosen, pairs.chosen_mask), (pairs.rejected, pairs.rejected_mask)):
            ids_list.append(np.r_[prompt, rng.integers(3, vocab, seq_length + 1 - prompt_len)].astype(np.int32))
            mask_list.append(mask)
    return pairs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per global batch (= micro-batch: one micro-batch)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args(argv)

    import torch

    from megatron_ds.config import config_from_args
    from megatron_ds.data.dpo_dataset import DPODataset, collate_pairs
    from megatron_ds.dpo import DPORunConfig
    from megatron_ds.parallel.topology import single_process_state
    from megatron_ds.pretrain import build_model
    from megatron_ds.training.dpo_trainer import DPOTrainer
    from megatron_ds.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    h = args.hidden_size
    cfg = config_from_args(["--num-layers", str(args.num_layers), "--hidden-size", str(h), "--ffn-hidden-size",
                            str(h * 11 // 4), "--num-attention-heads", "8", "--num-query-groups", "4",
                            "--vocab-size", str(args.vocab_size), "--seq-length", str(args.seq_length),
                            "--max-position-embeddings", str(args.seq_length), "--micro-batch-size", str(args.pairs),
                            "--global-batch-size", str(args.pairs), "--train-iters", "1000", "--lr", "1e-4"],
                           DPORunConfig, "bench_dpo")
    state = single_process_state()
    pairs = synthetic_pairs(args.pairs, args.seq_length, args.vocab_size)
    ds = DPODataset(pairs, args.pairs, cfg.training.seed)
    rows = collate_pairs([ds[i] for i in range(args.pairs)])  # 2 x pairs rows: chosen, then rejected

    on_the_fly = DPOTrainer(cfg, state, build_model(cfg, state), ds, reference=build_model(cfg, state))
    pre_pairs = synthetic_pairs(args.pairs, args.seq_length, args.vocab_size)
    pre_ds = DPODataset(pre_pairs, args.pairs, cfg.training.seed)
    precomputed = DPOTrainer(cfg, state, build_model(cfg, state), pre_ds, reference=build_model(cfg, state))
    precomputed.precompute_reference([pre_ds])
    pre_rows = collate_pairs([pre_ds[i] for i in range(args.pairs)])
    sft = Trainer(cfg, state, build_model(cfg, state), ds)  # token-mean loss over the same rows' loss mask

    def batch(src):
        return [{k: v.clone() for k, v in src.items()}]

    variants = {
        "SFT fwd+bwd of the 2 x pairs rows": lambda: sft.forward_backward_step(batch(rows)),
        "DPO, reference every step": lambda: on_the_fly.forward_backward_step(batch(rows)),
        "DPO, precomputed reference": lambda: precomputed.forward_backward_step(batch(pre_rows)),
    }
    times = {k: [] for k in variants}
    for i in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["SFT fwd+bwd of the 2 x pairs rows"])
    print(f"model: {args.num_layers} layers, hidden {h}, vocab {args.vocab_size}; {args.pairs} pairs x 2 rows x "
          f"{args.seq_length} tokens; {args.threads} thread(s); median of {args.repeats}")
    print(f"{'variant':<36} {'ms/step':>9} {'vs SFT':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<36} {1e3 * med:>9.1f} {med / base:>7.2f}")


if __name__ == "__main__":
    main()
