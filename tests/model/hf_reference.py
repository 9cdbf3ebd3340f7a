"""Hugging Face Llama references for the model tests: the same architecture built by transformers.

Only the test process imports transformers; gloo ranks receive the HF weights and reference
outputs as tensors.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megatron_ds.config import ModelConfig

SEQ, BATCH = 16, 2

# Tiny shapes: seq 16, hidden 64. MHA: 4 heads of 16. GQA: 4 query heads over 2 KV heads, so TP=2
# splits the KV heads and TP=4 must replicate them (1 query head per rank, KV head rank // 2).
CONFIGS = {
    "mha": dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=4,
                max_position_embeddings=64, vocab_size=512, norm_epsilon=1e-6, init_method_std=0.02),
    "gqa": dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                max_position_embeddings=64, vocab_size=512, norm_epsilon=1e-6, init_method_std=0.02),
}


def model_config(name: str, vocab_size: int = 512) -> ModelConfig:
    return ModelConfig(**{**CONFIGS[name], "vocab_size": vocab_size})


@functools.lru_cache(maxsize=None)
def hf_model(name: str, vocab_size: int = 512):
    """LlamaForCausalLM equal to ``model_config(name, vocab_size)``, fp32, with random norm weights too
    (HF inits them to ones, which would hide a swapped input/post-attention norm)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model_config(name, vocab_size)
    hc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base, max_position_embeddings=cfg.max_position_embeddings,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, initializer_range=cfg.init_method_std,
    )
    hc._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hc).float().eval()
    g = torch.Generator().manual_seed(20240101)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if pname.endswith("norm.weight") else cfg.init_method_std * noise)
    return model


@functools.lru_cache(maxsize=None)
def hf_reference(name: str, vocab_size: int = 512):
    """(hf_state_dict, ids, labels, logits [b,s,V], per-token loss [b,s], grads of loss.sum() by HF name)."""
    model = hf_model(name, vocab_size)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, vocab_size, (BATCH, SEQ), generator=g)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits  # [b, s, V]
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), labels.reshape(-1), reduction="none").view(BATCH, SEQ)
    loss.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sd = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return sd, ids, labels, logits.detach(), loss.detach(), grads


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: the error relative to the tensor's scale (elementwise relative error
    is meaningless for values near zero)."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
