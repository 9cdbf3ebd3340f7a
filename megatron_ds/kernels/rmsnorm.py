"""RMSNorm, pure-PyTorch reference: y = x / sqrt(mean(x^2) + eps) * weight."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize the last dim of ``x`` by its root mean square and scale by ``weight``.

    The statistics and the scaling run in fp32 whatever ``x``'s dtype (a bf16 mean of squares
    over 8192 channels loses most of its mantissa); the result is cast back to ``x.dtype``.
    """
    compute = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for gradcheck
    x32 = x.to(compute)
    inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * inv_rms * weight.to(compute)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (in x's dtype) and ``rms_norm(h)``: returns ``(rms_norm(h), h)``.

    The pre-norm layer's "add the block output to the residual stream, then normalize it for the
    next block", as one call so the fused kernel can do both in one pass.
    """
    h = x + residual
    return rms_norm(h, weight, eps), h
