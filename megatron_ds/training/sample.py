"""Greedy continuation of a prompt with the live (possibly tensor-parallel) model.

Used at the end of a run to show what the model learned. No KV cache: each new token re-runs
the whole prefix, which is fine for the tiny demo; the generation tool of a later issue adds
the cache and sampling. Under pipeline parallelism the prefix goes through the stages (and model
chunks) in order, the last stage picks the token and broadcasts it over the pipeline group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ds.parallel.pipeline import PipelineP2P
from megatron_ds.parallel.topology import ParallelState, group_size


def _gather_vocab(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """(b, s, V/tp) shards -> (b, s, V) on every TP rank."""
    if group_size(tp_group) == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(group_size(tp_group))]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def _pipeline_logits(chunks: list, state: ParallelState, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
    """(1, s) ids -> this TP rank's logits (1, s, V/tp) on the last stage; None on the others."""
    if state.pp_size == 1:
        return chunks[0](input_ids=x, position_ids=pos)
    first = chunks[0]
    s = x.shape[1] // (first.tp_size if first.sequence_parallel else 1)
    p2p = PipelineP2P(state, (s, 1, first.config.hidden_size), next(first.parameters()).dtype, state.device)
    out = None
    for chunk in chunks:  # virtual stages c * P + pp_rank, in order
        hidden = None if chunk.pre_process else p2p.exchange(recv_prev=True)[0]
        out = chunk(input_ids=x if chunk.pre_process else None, hidden_states=hidden, position_ids=pos)
        if not chunk.post_process:
            p2p.exchange(send_next=out)
    p2p.wait_sends()
    return out if chunks[-1].post_process else None


@torch.no_grad()
def greedy_generate(model, state: ParallelState, prompt_ids: list[int], max_new_tokens: int,
                    vocab_size: int, pad_multiple: int = 1, max_length: int | None = None) -> list[int]:
    """Collective over the TP and pipeline groups (``model``: this rank's module or model chunks).
    Returns the generated ids (prompt excluded) on every rank."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for c in chunks:
        c.eval()
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
        logits = _pipeline_logits(chunks, state, x, pos)
        token = torch.zeros((), dtype=torch.long, device=state.device)
        if logits is not None:
            token.fill_(int(_gather_vocab(logits, state.tp_group)[0, n - 1, :vocab_size].float().argmax()))  # (1, s, V)
        if state.pp_size > 1:
            dist.broadcast(token, src=state.pp_ranks[-1], group=state.pp_group)
        nxt = int(token)
        ids.append(nxt)
        out.append(nxt)
    for c in chunks:
        c.train()
    return out
