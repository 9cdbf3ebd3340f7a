"""RMSNorm, pure-PyTorch reference: y = x / sqrt(mean(x^2) + eps) * weight."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize the last dim of ``x`` by its root mean square and scale by ``weight``.

    The statistics and the scaling run in fp32 whatever ``x``'s dtype (a bf16 mean of squares
    over 8192 channels loses most of its mantissa); the result is cast back to ``x.dtype``.
    """
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * inv_rms * weight.float()).to(x.dtype)
