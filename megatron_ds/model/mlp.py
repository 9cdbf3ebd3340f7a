"""SwiGLU feed-forward block, split over tensor parallelism along the FFN dim."""

from __future__ import annotations

import torch
from torch import nn

from megatron_ds.config import ModelConfig
from megatron_ds.kernels import Kernels, select_kernels
from megatron_ds.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_ds.parallel.random import init_method_normal, param_generator


class MLP(nn.Module):
    """[s,b,h] (SP: [s/tp,b,h]) -> gate_up [s,b,2f/tp] -> swiglu [s,b,f/tp] -> down -> same shape as input.

    ``gate_up`` fuses HF's gate_proj and up_proj (master rows [gate | up]); partition_sizes [f, f]
    splits each over TP separately, so every rank holds matching gate and up columns
    [gate_r | up_r] and the activation needs no communication.
    """

    def __init__(self, config: ModelConfig, layer_number: int, *, tp_group=None, sequence_parallel: bool = False,
                 seed: int = 1234, params_dtype: torch.dtype = torch.float32, device=None,
                 kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or select_kernels()
        h, f = config.hidden_size, config.ffn_hidden_size
        prefix = f"layers.{layer_number}.mlp"
        init = init_method_normal(config.init_method_std)
        common = dict(tp_group=tp_group, sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device)
        self.gate_up = ColumnParallelLinear(h, 2 * f, init_method=init, partition_sizes=[f, f],
                                            init_generator=param_generator(seed, f"{prefix}.gate_up", device), **common)
        self.down = RowParallelLinear(f, h, init_method=init, input_is_parallel=True,
                                      init_generator=param_generator(seed, f"{prefix}.down", device), **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.kernels.swiglu(self.gate_up(x)))
