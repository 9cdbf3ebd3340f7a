"""Rotary position embedding (RoPE), pure-PyTorch reference, Hugging Face's rotate-half layout.

A head vector of size d is read as two halves (x1, x2) = (x[:d/2], x[d/2:]); frequency i
rotates the pair (x1[i], x2[i]) by angle position * base^(-2i/d). This is the layout of the
DeepSeek/Llama checkpoints on the Hub, so their q/k projections load without a permutation.
"""

from __future__ import annotations

import torch


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat((-t2, t1), dim=-1)


def apply_rotary_pos_emb(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``t`` [s, b, n, d] by the angles whose cos/sin are given as [s, b, 1, d]."""
    return t * cos + _rotate_half(t) * sin


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``position_ids`` [b, s], each [s, b, 1, head_dim] in ``dtype``.

    Angles are computed in fp32 (positions up to 4096 times frequencies near 1 need its mantissa)
    and cast at the end.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=position_ids.device) / head_dim))  # (d/2,)
    freqs = position_ids.t().float()[..., None] * inv_freq  # (s, b, d/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (s, b, 1, d)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_qk(qkv: torch.Tensor, num_rotated_heads: int, head_dim: int, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``num_rotated_heads`` heads of ``qkv [s, b, heads * d]`` by cos/sin [s, b, 1, d].

    The fused QKV output is [q heads | k heads | v heads] per token, so ``nq + nkv`` rotated heads
    are exactly q and k (GQA: nkv may differ from nq); the rest (v) passes through. Returns a new
    tensor; the fused version (kernels/fused.py) rotates ``qkv`` in place instead, so callers must
    use the returned tensor and not reuse their input.
    """
    s, b = qkv.shape[:2]
    heads = qkv.view(s, b, -1, head_dim)
    rotated = apply_rotary_pos_emb(heads[:, :, :num_rotated_heads], cos, sin)
    return torch.cat([rotated, heads[:, :, num_rotated_heads:]], dim=2).view(qkv.shape)
