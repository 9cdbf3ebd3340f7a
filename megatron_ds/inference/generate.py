"""Autoregressive generation with the live model at any TP x PP layout: prefill, then one token per step.

    result = generate(model, state, prompt_ids, max_new_tokens=32, sampling=SamplingParams(temperature=0.8, top_p=0.9),
                      eos_id=tokenizer.eod)
    result.tokens   # [b, n] new token ids, the same on every rank

With the KV cache (the default) the prompt goes through the model once and each later step feeds
only the newest token at its position; every model chunk keeps the K/V of its own layers and
local KV heads (model/kv_cache.py). ``use_kv_cache=False`` re-runs the whole sequence every step:
the reference the tests hold the cache against, and the baseline of benchmarks/bench_generate.py.

Collective over the TP and pipeline groups. Under PP the step's tokens (b, s) are known on every
rank; stage 0 embeds them, activations [s, b, h] go forward by p2p through the stages (and model
chunks, in virtual-stage order when interleaving), the last stage gathers the vocab-parallel
logits of the last position over TP, drops the padding columns, picks the token and broadcasts it
over the pipeline group. Sequence parallelism is switched off for generation: it shards the
sequence, which a one-token step cannot be, and it changes no weight (see ``_inference_mode``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_ds.inference.sampling import SamplingParams, sample_next
from megatron_ds.model.kv_cache import KVCache
from megatron_ds.parallel.pipeline import PipelineP2P
from megatron_ds.parallel.topology import ParallelState, group_size


@dataclass
class GenerationResult:
    tokens: torch.Tensor
    """[b, n] generated ids (prompt excluded) on every rank; rows that met EOS are EOS-padded after it."""
    step_logits: Optional[list[torch.Tensor]] = None
    """With ``return_logits``, on the last pipeline stage: each step's fp32 logits [b, vocab_size]."""


def gather_vocab(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """[b, V_padded/tp] vocab-parallel shards -> [b, V_padded] on every TP rank."""
    if group_size(tp_group) == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(group_size(tp_group))]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


@contextmanager
def _inference_mode(chunks: Sequence[torch.nn.Module]):
    """eval() and sequence parallelism off for the duration, both restored after.

    SP only decides where the TP collectives cut the sequence (all-gather + reduce-scatter instead
    of identity + all-reduce); the weights and the math are the same, so flipping the modules'
    ``sequence_parallel`` flags runs the trained model unchanged (up to fp32 summation order)."""
    sp_modules = [m for c in chunks for m in c.modules() if getattr(m, "sequence_parallel", False) is True]
    modes = [c.training for c in chunks]
    for m in sp_modules:
        m.sequence_parallel = False
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m in sp_modules:
            m.sequence_parallel = True
        for c, mode in zip(chunks, modes):
            c.train(mode)


def _last_logits(chunks, state: ParallelState, ids: torch.Tensor, pos: torch.Tensor,
                 caches: Optional[list[KVCache]], vocab_size: int) -> Optional[torch.Tensor]:
    """ids, pos [b, s] -> fp32 logits [b, vocab_size] of the last position on the last stage; None elsewhere."""
    b, s = ids.shape
    first = chunks[0]
    p2p = None
    if state.pp_size > 1:
        p2p = PipelineP2P(state, (s, b, first.config.hidden_size), next(first.parameters()).dtype, state.device)
    out = None
    for i, chunk in enumerate(chunks):  # virtual stages c * P + pp_rank, in order
        hidden = None if chunk.pre_process else p2p.exchange(recv_prev=True)[0]
        out = chunk(input_ids=ids if chunk.pre_process else None, hidden_states=hidden, position_ids=pos,
                    kv_cache=caches[i] if caches is not None else None, last_token_logits=True)
        if not chunk.post_process:
            p2p.exchange(send_next=out)
    if p2p is not None:
        p2p.wait_sends()
    if not chunks[-1].post_process:
        return None
    return gather_vocab(out[:, -1].float(), chunks[-1].tp_group)[:, :vocab_size]  # drop the padding columns


def _as_batch(prompt_ids, device) -> torch.Tensor:
    """list[int] | list[list[int]] (equal lengths) | LongTensor [b, s] -> LongTensor [b, s]."""
    if isinstance(prompt_ids, torch.Tensor):
        t = prompt_ids
    elif len(prompt_ids) and isinstance(prompt_ids[0], (list, tuple)):
        if len({len(p) for p in prompt_ids}) != 1:
            raise ValueError("a batch of prompts must have equal lengths (no padding here); generate them one by one")
        t = torch.tensor(prompt_ids, dtype=torch.long)
    else:
        t = torch.tensor([list(prompt_ids)], dtype=torch.long)
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"prompt ids must be a non-empty [batch, length] array, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.long)


def generate(model, state: ParallelState, prompt_ids, max_new_tokens: int, *,
             sampling: SamplingParams = SamplingParams(), eos_id: Optional[int] = None,
             vocab_size: Optional[int] = None, max_length: Optional[int] = None,
             use_kv_cache: bool = True, return_logits: bool = False) -> GenerationResult:
    """Continue ``prompt_ids`` (one prompt, or a batch of equal-length prompts) by up to ``max_new_tokens``.

    ``model``: this rank's module or its list of model chunks. Stops early when every row has
    produced ``eos_id``, or when the sequence reaches ``max_length`` positions (default the
    model's max_position_embeddings). Every rank of the model replica must call it alike.
    """
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    config = chunks[0].config
    vocab_size = vocab_size or config.vocab_size
    max_length = max_length or config.max_position_embeddings
    prompt = _as_batch(prompt_ids, state.device)
    b, s = prompt.shape
    n_new = max(0, min(max_new_tokens, max_length - s))
    generator = torch.Generator().manual_seed(sampling.seed)  # CPU: the same stream on every rank
    out: list[torch.Tensor] = []
    step_logits: Optional[list[torch.Tensor]] = [] if return_logits else None
    with _inference_mode(chunks):
        caches = [KVCache.for_model(c, b, s + n_new) for c in chunks] if use_kv_cache and n_new else None
        seq = prompt
        feed, pos = prompt, torch.arange(s, device=state.device).expand(b, s)
        finished = torch.zeros(b, dtype=torch.bool, device=state.device)
        for step in range(n_new):
            logits = _last_logits(chunks, state, feed, pos, caches, vocab_size)
            token = torch.zeros(b, dtype=torch.long, device=state.device)
            if logits is not None:
                token = sample_next(logits, sampling, generator)
                if step_logits is not None:
                    step_logits.append(logits)
            if state.pp_size > 1:
                dist.broadcast(token, src=state.pp_ranks[-1], group=state.pp_group)
            if eos_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_id), token)
                finished |= token == eos_id
            out.append(token)
            if bool(finished.all()):
                break
            seq = torch.cat([seq, token[:, None]], dim=1)
            if caches is not None:  # the new token alone, at its position
                feed, pos = token[:, None], torch.full((b, 1), s + step, device=state.device)
            else:  # the whole sequence again
                feed, pos = seq, torch.arange(seq.shape[1], device=state.device).expand(b, seq.shape[1])
    tokens = torch.stack(out, dim=1) if out else torch.empty(b, 0, dtype=torch.long, device=state.device)
    return GenerationResult(tokens, step_logits)
