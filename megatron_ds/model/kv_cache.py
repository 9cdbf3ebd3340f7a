"""The inference KV cache: every layer's keys and values of the tokens seen so far.

Generation feeds the prompt once (prefill), then one token per step; each step appends its K/V
here and attends over everything cached, so a step costs O(length) instead of re-running the
whole prefix. Training never builds one (``kv_cache=None`` everywhere on that path).

One ``KVCache`` belongs to one model chunk (a pipeline stage, or one virtual stage when
interleaving) and holds only that chunk's layers; under TP each rank caches its own KV heads
(``attention.num_local_kv_heads``: nkv/tp, or the single replicated KV head its query heads use).
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Per layer two buffers [b, kv_heads_local, max_len, d] (SDPA's layout: a step reads a view,
    never a copy) and ``seq_len``, the positions already filled (the same for every layer)."""

    def __init__(self, layer_numbers, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = {int(i): torch.empty(shape, dtype=dtype, device=device) for i in layer_numbers}
        self.values = {int(i): torch.empty(shape, dtype=dtype, device=device) for i in layer_numbers}
        self.batch_size, self.max_len = batch_size, max_len
        self.seq_len = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> "KVCache":
        """An empty cache for the layers of ``model`` (a DeepSeekModel chunk), on its device and dtype."""
        p = next(model.parameters())
        heads = {layer.attention.num_local_kv_heads for layer in model.layers.values()} or {1}
        return cls(model.layers.keys(), batch_size, max_len, heads.pop(), model.config.head_dim,
                   dtype=p.dtype, device=p.device)

    def update(self, layer_number: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v [b, nkv, s, d] at positions seq_len.. and return all cached
        [b, nkv, seq_len + s, d]."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this step would fill {end}")
        keys, values = self.keys[layer_number], self.values[layer_number]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def causal_mask(self, s: int) -> Optional[torch.Tensor]:
        """bool [s, seq_len + s]: query i sits at position seq_len + i and sees keys 0..seq_len + i.
        None for one query: it sees every cached key, no mask needed."""
        if s == 1:
            return None
        device = next(iter(self.keys.values())).device if self.keys else None
        return torch.ones(s, self.seq_len + s, dtype=torch.bool, device=device).tril(self.seq_len)

    def advance(self, s: int) -> None:
        """The model calls this once per forward, after all its layers have written their s positions."""
        self.seq_len += s

    def reset(self) -> None:
        self.seq_len = 0
