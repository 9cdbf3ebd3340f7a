"""One pre-norm decoder layer: x + attention(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from megatron_ds.config import ModelConfig
from megatron_ds.model.attention import Attention
from megatron_ds.model.mlp import MLP
from megatron_ds.model.rmsnorm import RMSNorm


class TransformerLayer(nn.Module):
    """[s,b,h] -> [s,b,h] (under SP both are this rank's [s/tp,b,h]; the residual stays sharded)."""

    def __init__(self, config: ModelConfig, layer_number: int, *, tp_group=None, sequence_parallel: bool = False,
                 seed: int = 1234, params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.layer_number = layer_number
        norm = dict(sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device)
        block = dict(tp_group=tp_group, seed=seed, **norm)
        self.input_norm = RMSNorm(config.hidden_size, config.norm_epsilon, **norm)
        self.attention = Attention(config, layer_number, **block)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.norm_epsilon, **norm)
        self.mlp = MLP(config, layer_number, **block)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attention_norm(x))
