"""RMSNorm module over the hidden dim; its weight is replicated on every TP rank."""

from __future__ import annotations

import torch
from torch import nn

from megatron_ds.kernels import Kernels, select_kernels
from megatron_ds.parallel.layers import set_sequence_parallel_attr


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim (weight initialised to ones).

    Under sequence parallelism each TP rank normalizes a different slice of the sequence, so its
    weight grad is a partial sum: the weight is marked with ``set_sequence_parallel_attr`` and the
    trainer all-reduces such grads over the TP group.
    """

    def __init__(self, hidden_size: int, eps: float, *, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None, kernels: Kernels | None = None):
        super().__init__()
        self.eps = eps
        self.kernels = kernels or select_kernels()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=params_dtype, device=device))
        if self.weight.device.type != "meta":
            nn.init.ones_(self.weight)
        if sequence_parallel:
            set_sequence_parallel_attr(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = x + residual``, returns ``(norm(h), h)`` (one fused pass with the fused kernels)."""
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        sp = ", sequence_parallel" if getattr(self.weight, "sequence_parallel", False) else ""
        return f"{self.weight.shape[0]}, eps={self.eps}{sp}"
