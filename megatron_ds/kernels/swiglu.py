"""SwiGLU activation, pure-PyTorch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``gate_up`` [..., 2f] holding [gate | up] along the last dim; -> [..., f]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
