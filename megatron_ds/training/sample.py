"""Greedy continuation of a prompt with the live (possibly tensor-parallel) model.

Used at the end of a run to show what the model learned. No KV cache: each new token re-runs
the whole prefix, which is fine for the tiny demo; the generation tool of a later issue adds
the cache and sampling.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ds.parallel.topology import ParallelState, group_size


def _gather_vocab(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """(b, s, V/tp) shards -> (b, s, V) on every TP rank."""
    if group_size(tp_group) == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(group_size(tp_group))]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def greedy_generate(model, state: ParallelState, prompt_ids: list[int], max_new_tokens: int,
                    vocab_size: int, pad_multiple: int = 1, max_length: int | None = None) -> list[int]:
    """Collective over the TP group. Returns the generated ids (prompt excluded)."""
    model.eval()
    ids = list(prompt_ids) or [0]
    out = []
    for _ in range(max_new_tokens):
        if max_length is not None and len(ids) >= max_length:
            break
        n = len(ids)
        # Sequence parallelism needs a length divisible by TP: pad on the right, which causal
        # attention never lets position n-1 see.
        padded = -(-n // pad_multiple) * pad_multiple
        x = torch.tensor([ids + [0] * (padded - n)], dtype=torch.long, device=state.device)
        pos = torch.arange(padded, device=state.device).unsqueeze(0)
        logits = _gather_vocab(model(input_ids=x, position_ids=pos), state.tp_group)  # (1, s, V)
        nxt = int(logits[0, n - 1, :vocab_size].float().argmax())
        ids.append(nxt)
        out.append(nxt)
    model.train()
    return out
