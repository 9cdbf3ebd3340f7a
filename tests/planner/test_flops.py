"""Model FLOPs (megatron_ds/flops.py, the planner's and the trainer's count) against torch's FLOP
counter on real passes of the model, and MFU against a hand calculation."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_ds import flops, planner
from megatron_ds.config import ModelConfig, model_preset
from megatron_ds.kernels import select_kernels
from megatron_ds.model.deepseek import DeepSeekModel

# GQA (8 query heads over 2 KV heads), an FFN that is not 8/3 h, a vocabulary that pads (500 -> 512).
GQA = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=176, num_attention_heads=8, num_query_groups=2,
                  vocab_size=500, max_position_embeddings=64)
MHA_WIDE_HEADS = ModelConfig(num_layers=2, hidden_size=48, ffn_hidden_size=128, num_attention_heads=4,
                             kv_channels=16, vocab_size=256, max_position_embeddings=64)


def _counted(cfg: ModelConfig, b: int, s: int, backward: bool) -> int:
    # SDPA's math backend decomposes attention into matmuls the counter sees (the CPU flash kernel
    # has no FLOP formula registered); it computes the full s x s scores, as flops.py counts them.
    model = DeepSeekModel(cfg, seed=3, kernels=select_kernels(fused=False))
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = model(input_ids=ids, labels=ids).sum()
        if backward:
            loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("cfg", [GQA, MHA_WIDE_HEADS], ids=["gqa", "head-dim-not-h-over-heads"])
def test_forward_flops_per_token_equal_torchs_flop_counter(cfg):
    b, s = 2, 24
    assert flops.forward_flops_per_token(cfg, s) * b * s == _counted(cfg, b, s, backward=False)


def test_training_flops_are_three_forwards_by_the_counter():
    b, s = 2, 16
    assert flops.training_flops_per_token(GQA, s) * b * s == _counted(GQA, b, s, backward=True)


def test_planner_counts_the_same_flops():
    cfg = model_preset("deepseek-67b")
    per_token = cfg.num_layers * planner.layer_flops_per_token(cfg, 4096) + planner.head_flops_per_token(cfg)
    assert per_token == flops.training_flops_per_token(cfg, 4096)


def test_7b_flops_by_hand():
    # 7B: h 4096, 32 heads of 128 (MHA), f 11008, 30 layers, V 102400, s 4096. Per layer and token,
    # forward: qkv 2*4096*3*4096 + core 4*4096*4096 + out 2*4096*4096 + mlp 6*4096*11008.
    per_layer = 2 * 4096 * 3 * 4096 + 4 * 4096 * 4096 + 2 * 4096 * 4096 + 6 * 4096 * 11008
    head = 2 * 4096 * 102400
    assert flops.forward_flops_per_token(model_preset("deepseek-7b"), 4096) == 30 * per_layer + head
    # Without the LM head this is the paper's non-embedding M for 7B's real shapes, 4.247e10 FLOPs per
    # token (deepseek-llm.md); the idealized 72 n d^2 + 12 n d l (FFN = 8/3 d) is 0.45% lower.
    non_embedding = flops.training_flops_per_token(model_preset("deepseek-7b"), 4096) - 3 * head
    assert non_embedding == pytest.approx(4.247e10, rel=1e-4)  # 4 digits, as the paper prints it


def test_mfu_by_hand():
    # 8 H100s train the 7B model at 4096 tokens, 2 global batches of 256 sequences in 20 s.
    cfg = model_preset("deepseek-7b")
    per_token = 3 * (30 * (2 * 4096 * 3 * 4096 + 4 * 4096 * 4096 + 2 * 4096 * 4096 + 6 * 4096 * 11008)
                     + 2 * 4096 * 102400)  # = 4.4984e10 FLOPs per token
    tokens = 2 * 256 * 4096
    got = flops.throughput(flops.training_flops_per_token(cfg, 4096), tokens, 20.0, 8, flops.PEAK_TFLOPS["h100"]["bf16"])
    tokens_per_s = tokens / 20.0  # 104857.6
    tflops_per_gpu = per_token * tokens_per_s / 8 / 1e12  # 589.6 TFLOP/s on each GPU
    assert got["tokens/s"] == pytest.approx(tokens_per_s)
    assert got["TFLOP/s per device"] == pytest.approx(tflops_per_gpu, rel=1e-12)
    assert got["MFU"] == pytest.approx(tflops_per_gpu / 989.4, rel=1e-12)
    assert math.isclose(got["MFU"], 0.5959, rel_tol=1e-4)  # 4.4984e10 * 104857.6 / 8 / 989.4e12


def test_no_peak_no_mfu():
    got = flops.throughput(1e9, 1000, 1.0, 2, None)
    assert "MFU" not in got and got["TFLOP/s per device"] == pytest.approx(0.5)
    assert flops.device_peak_tflops("cpu", torch.bfloat16) is None
