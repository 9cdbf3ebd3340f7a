"""Model FLOPs of the decoder and the peak rates they are measured against (MFU).

Counted are the matrix multiplies, the only operations that matter at this scale; norms,
SwiGLU, rotary, softmax and the cross-entropy are a fraction of a percent and are left out, as in
Megatron's and the PaLM paper's MFU. Per token, forward, with h = hidden, d = head dim, n_q / n_kv
query / key-value heads, f = FFN size, s = sequence length, V = padded vocabulary:

    QKV projection      2 h (n_q + 2 n_kv) d
    attention scores    2 s n_q d      (q k^T against all s keys: causal masking not discounted,
    attention values    2 s n_q d       as the paper's M = 72 n d^2 + 12 n d l does)
    output projection   2 n_q d h
    SwiGLU MLP          2 h (2 f) + 2 f h
    LM head             2 h V          (once, after the last layer)

Training costs 3x the forward: the backward computes the gradient of each input and of each weight,
two multiplies of the forward's size. Recomputation is not counted: it is hardware work, not model
work, so MFU stays comparable across recompute settings.

``torch.utils.flop_counter.FlopCounterMode`` counts the same multiplies on a real forward pass
(with SDPA's math backend); tests/planner/test_flops.py holds the two equal.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ds.config import ModelConfig

# Dense (no sparsity) peak TFLOP/s of one device, SXM parts: bf16 on the tensor cores, and plain
# fp32 (no TF32, which PyTorch leaves off for matmuls by default). Vendor data sheets.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "a100": {"bf16": 312.0, "fp32": 19.5},
    "h100": {"bf16": 989.4, "fp32": 66.9},
    "h200": {"bf16": 989.4, "fp32": 66.9},
}


def layer_forward_flops_per_token(config: ModelConfig, seq: int) -> float:
    """Forward FLOPs of one transformer layer per token of a ``seq``-token sequence."""
    h, d, f = config.hidden_size, config.head_dim, config.ffn_hidden_size
    nq, nkv = config.num_attention_heads, config.num_kv_heads
    qkv = 2 * h * (nq + 2 * nkv) * d
    core = 2 * 2 * seq * nq * d
    out = 2 * nq * d * h
    mlp = 2 * h * 2 * f + 2 * f * h
    return float(qkv + core + out + mlp)


def head_forward_flops_per_token(config: ModelConfig) -> float:
    """Forward FLOPs of the LM head per token (the padded vocabulary: those columns are computed too)."""
    return 2.0 * config.hidden_size * config.padded_vocab_size()


def forward_flops_per_token(config: ModelConfig, seq: int) -> float:
    """Forward FLOPs of the whole model per token."""
    return config.num_layers * layer_forward_flops_per_token(config, seq) + head_forward_flops_per_token(config)


def training_flops_per_token(config: ModelConfig, seq: int) -> float:
    """Forward + backward FLOPs per trained token (3x the forward)."""
    return 3.0 * forward_flops_per_token(config, seq)


def device_peak_tflops(device: torch.device | str, dtype: torch.dtype) -> Optional[float]:
    """The PEAK_TFLOPS entry for this CUDA device's name (A100, H100, H200) and dtype; None when
    unknown (CPU, other GPUs): pass --peak-tflops then."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    key = "bf16" if dtype == torch.bfloat16 else "fp32"
    for gpu, peaks in PEAK_TFLOPS.items():
        if gpu in name:
            return peaks[key]
    return None


def throughput(flops_per_token: float, tokens: float, seconds: float, num_devices: int,
               peak_tflops: Optional[float]) -> dict[str, float]:
    """What the trainer logs for a window of steps: tokens/s of the whole run, achieved model TFLOP/s
    per device, and MFU (that rate over the device's peak; absent when no peak is known)."""
    tokens_per_s = tokens / seconds
    tflops = flops_per_token * tokens_per_s / num_devices / 1e12
    out = {"tokens/s": tokens_per_s, "TFLOP/s per device": tflops}
    if peak_tflops:
        out["MFU"] = tflops / peak_tflops
    return out
