"""Shared pieces of the DPO tests: the data, the flags of a tiny model, and the DPO formula written
out directly on an unsharded model (plain log_softmax / gather, autograd), the reference that the
trainer's pipelined, sharded, DP-split computation is held against."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]

# 4 layers so PP2 has 2 per stage; GQA (4 heads over 2 KV groups); vocab 512 pads to 512 at TP 1 and 2,
# so every layout holds the same global embedding and LM-head shapes (the tokenizer has ~300 ids).
MODEL_FLAGS = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "192", "--num-attention-heads", "4",
               "--num-query-groups", "2", "--vocab-size", "512", "--seq-length", "64", "--max-position-embeddings", "64"]
# The reference model: the same architecture from another seed, so that policy != reference and a
# mix-up of the two (or a reference that moves) shows in the loss.
REFERENCE_SEED = 4321


def make_dpo_files(out: Path, pairs: int = 96, valid: int = 32) -> tuple[str, str, str]:
    spec = importlib.util.spec_from_file_location("dpo_pairs", REPO / "examples" / "dpo_pairs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    train, valid_path, text = out / "pairs.jsonl", out / "valid.jsonl", out / "corpus.txt"
    gen.main(["--output", str(train), "--pairs", str(pairs), "--valid-output", str(valid_path),
              "--valid-pairs", str(valid), "--text-output", str(text)])
    from tools import train_tokenizer

    tok = out / "tokenizer.json"
    assert train_tokenizer.main(["--input", str(text), "--vocab-size", "320", "--output", str(tok)]) == 0
    return str(train), str(valid_path), str(tok)


def dpo_flags(train: str, tok: str, *extra: str) -> list[str]:
    return MODEL_FLAGS + ["--dpo-data", train, "--tokenizer-model", tok, "--micro-batch-size", "2",
                          "--global-batch-size", "8", "--lr", "1e-3", "--log-interval", "1000", *extra]


def reference_config(cfg):
    ref = copy.deepcopy(cfg)
    ref.training.seed = REFERENCE_SEED
    return ref


def sequence_logps_direct(model, batch: dict, vocab_size: int, average: bool = False) -> torch.Tensor:
    """[rows] log p(response | prompt) of an unsharded model: log_softmax over the vocabulary, gather the
    labels, sum (or mean) over the response tokens."""
    logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"])  # [rows, s, V]
    logp = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
    token_logp = logp.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)  # [rows, s]
    mask = batch["loss_mask"]
    out = (token_logp * mask).sum(-1)
    return out / mask.sum(-1) if average else out


def direct_dpo(policy, reference, batch: dict, vocab_size: int, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The DPO / cDPO / IPO loss of a batch of pairs (rows: all chosen, then all rejected), mean over pairs,
    written out from the papers; returns (loss with autograd to ``policy``, metrics)."""
    average = loss_type == "ipo"
    pi = sequence_logps_direct(policy, batch, vocab_size, average)
    with torch.no_grad():
        ref = sequence_logps_direct(reference, batch, vocab_size, average)
    b = pi.shape[0] // 2
    pi_c, pi_r, ref_c, ref_r = pi[:b], pi[b:], ref[:b], ref[b:]
    m = (pi_c - ref_c) - (pi_r - ref_r)
    if loss_type == "sigmoid":  # DPO; cDPO: the label flipped with probability e
        e = label_smoothing
        losses = -(1 - e) * F.logsigmoid(beta * m) - e * F.logsigmoid(-beta * m)
    else:  # IPO: squared distance of the (token-mean) log-ratio margin from 1 / (2 beta)
        losses = (m - 1 / (2 * beta)) ** 2
    r_c, r_r = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()
    metrics = {"loss": losses.mean().item(), "reward margin": (r_c - r_r).mean().item(),
               "preference accuracy": (r_c > r_r).float().mean().item(),
               "chosen logps": pi_c.mean().item(), "rejected logps": pi_r.mean().item(),
               "chosen reward": r_c.mean().item(), "rejected reward": r_r.mean().item()}
    return losses.mean(), metrics


def direct_grads(policy, reference, batch: dict, vocab_size: int, beta: float, **kw) -> tuple[dict, dict]:
    """(grad of every policy parameter by global name, metrics) of direct_dpo's loss."""
    policy.zero_grad(set_to_none=True)
    loss, metrics = direct_dpo(policy, reference, batch, vocab_size, beta, **kw)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in policy.named_parameters()}, metrics


def first_global_batch(dataset, global_batch_size: int) -> dict:
    """The pairs of the first step, in sample order, collated as one batch of 2 x global_batch_size rows."""
    from megatron_ds.data.dpo_dataset import collate_pairs

    return collate_pairs([dataset[i] for i in range(global_batch_size)])


def set_threads() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
