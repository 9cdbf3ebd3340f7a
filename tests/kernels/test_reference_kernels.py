"""The pure-PyTorch kernel references against Hugging Face Llama's own implementations."""

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from megatron_ds.kernels import apply_rotary_pos_emb, rms_norm, rotary_cos_sin, swiglu


def test_rms_norm_equals_hf_in_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 64, generator=g)
    ref = LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
        # Same fp32 ops; HF multiplies by the weight last, we fold it in the same product order.
        torch.testing.assert_close(rms_norm(x, ref.weight, 1e-6), ref(x), rtol=1e-6, atol=1e-6)


def test_rms_norm_keeps_bf16_and_computes_in_fp32():
    x = torch.randn(4, 8192, dtype=torch.float64) * 50
    w = torch.rand(8192, dtype=torch.float64) + 0.5
    exact = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w
    out = rms_norm(x.to(torch.bfloat16), w.to(torch.bfloat16), 1e-6)
    assert out.dtype == torch.bfloat16
    # Only the bf16 rounding of inputs and output remains: a few bf16 ulps (2^-8 relative).
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -6, atol=2 ** -6)


def test_rotary_equals_hf_rotate_half():
    s, b, n, d = 16, 2, 3, 32
    hc = LlamaConfig(hidden_size=n * d, num_attention_heads=n, head_dim=d, rope_theta=10000.0,
                     max_position_embeddings=64)
    g = torch.Generator().manual_seed(1)
    position_ids = torch.stack([torch.arange(s), torch.arange(s) + 7])  # [b, s], distinct per sequence
    q = torch.randn(b, n, s, d, generator=g)  # HF layout
    k = torch.randn(b, n, s, d, generator=g)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hc)(q, position_ids)  # [b, s, d]
    ref_q, ref_k = hf_apply_rotary_pos_emb(q, k, hf_cos, hf_sin)

    cos, sin = rotary_cos_sin(position_ids, d, 10000.0, torch.float32)
    assert cos.shape == sin.shape == (s, b, 1, d)
    # Same fp32 angle products and the same cos/sin: bitwise equal tables.
    assert torch.equal(cos[:, :, 0].transpose(0, 1), hf_cos) and torch.equal(sin[:, :, 0].transpose(0, 1), hf_sin)
    ours_q = apply_rotary_pos_emb(q.permute(2, 0, 1, 3), cos, sin).permute(1, 2, 0, 3)  # via [s, b, n, d]
    ours_k = apply_rotary_pos_emb(k.permute(2, 0, 1, 3), cos, sin).permute(1, 2, 0, 3)
    assert torch.equal(ours_q, ref_q) and torch.equal(ours_k, ref_k)


def test_rotary_cos_sin_cast_to_dtype():
    cos, sin = rotary_cos_sin(torch.arange(8)[None], 16, 10000.0, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert torch.all(cos[0] == 1) and torch.all(sin[0] == 0)  # position 0 is no rotation


def test_swiglu_is_silu_gate_times_up():
    g = torch.Generator().manual_seed(2)
    gate, up = torch.randn(4, 3, 10, generator=g), torch.randn(4, 3, 10, generator=g)
    out = swiglu(torch.cat([gate, up], dim=-1))
    assert out.shape == (4, 3, 10)
    # silu's vectorized and scalar CPU paths (contiguous vs strided halves) may differ in the last ulp.
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-7)
