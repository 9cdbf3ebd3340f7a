"""Activation recomputation (``--recompute-granularity full|selective``), applied from outside the model.

    full       every TransformerLayer keeps only its input; backward reruns the layer's forward.
    selective  every layer's attention block (QKV projection, rotary, attention core, out-projection)
               is rerun in backward; the MLP keeps its activations. With flash/efficient SDPA the
               core alone saves no s x s matrix, so the block is the unit that frees memory here.

The wrapped module's ``forward`` is replaced on the instance, so parameter names (and checkpoints)
do not change. ``torch.utils.checkpoint`` (non-reentrant) restores the CPU and CUDA RNG states
before recomputing, so anything random in the forward draws the same numbers twice; collectives
inside the block (TP all-gather / reduce-scatter) simply run again in backward, on every TP rank.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _recompute_forward(module: torch.nn.Module) -> None:
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing is saved anyway
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    module.forward = forward
    module._recompute = True


def apply_recompute(model: torch.nn.Module, granularity: str | None) -> torch.nn.Module:
    """Turn on recomputation for ``model``'s layers (a DeepSeekModel or a pipeline chunk of one)."""
    if granularity is None:
        return model
    if granularity not in ("full", "selective"):
        raise ValueError(f"--recompute-granularity {granularity!r}: choose full or selective")
    for layer in model.layers.values():
        target = layer if granularity == "full" else layer.attention
        if not getattr(target, "_recompute", False):
            _recompute_forward(target)
    return model
