"""One pre-norm decoder layer: x + attention(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_ds.config import ModelConfig
from megatron_ds.kernels import Kernels, select_kernels
from megatron_ds.model.attention import Attention
from megatron_ds.model.kv_cache import KVCache
from megatron_ds.model.mlp import MLP
from megatron_ds.model.rmsnorm import RMSNorm


class TransformerLayer(nn.Module):
    """[s,b,h] -> [s,b,h] (under SP both are this rank's [s/tp,b,h]; the residual stays sharded)."""

    def __init__(self, config: ModelConfig, layer_number: int, *, tp_group=None, sequence_parallel: bool = False,
                 seed: int = 1234, params_dtype: torch.dtype = torch.float32, device=None,
                 kernels: Kernels | None = None):
        super().__init__()
        self.layer_number = layer_number
        kernels = kernels or select_kernels()
        norm = dict(sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device, kernels=kernels)
        block = dict(tp_group=tp_group, seed=seed, **norm)
        self.input_norm = RMSNorm(config.hidden_size, config.norm_epsilon, **norm)
        self.attention = Attention(config, layer_number, **block)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.norm_epsilon, **norm)
        self.mlp = MLP(config, layer_number, **block)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        attn_out = self.attention(self.input_norm(x), cos, sin, attention_mask, kv_cache)
        # x <- x + attn_out and its norm, in one pass with the fused kernels.
        normed, x = self.post_attention_norm.add_forward(attn_out, x)
        return x + self.mlp(normed)
