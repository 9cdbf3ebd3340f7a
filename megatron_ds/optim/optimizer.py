"""A plain ``torch.optim.AdamW`` over a model's parameters with the recipe's weight-decay groups.

The trainer uses ``MegatronOptimizer`` (distributed_optimizer.py). This exists so that checkpoints
can also describe, and be loaded into, a stock PyTorch AdamW (checkpoint/optimizer_state.py), e.g.
for a user's own fine-tuning loop.
"""

from __future__ import annotations

import torch


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: the paper's recipe leaves norm weights (1-D) undecayed.

    ``model`` is a module or a list of model chunks (interleaved pipeline)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    decay, no_decay = [], []
    for p in (p for c in chunks for p in c.parameters()):
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay)]
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0))
    return groups


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas, eps: float) -> torch.optim.AdamW:
    # foreach=True: one fused multi-tensor pass per group instead of a Python loop over params.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=True)
