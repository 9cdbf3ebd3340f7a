"""Shared pieces of the generation tests: a tiny model, its layout-free init, a saved checkpoint."""

from __future__ import annotations

import os

import torch

from megatron_ds.config import ModelConfig
from megatron_ds.kernels import reference_kernels
from megatron_ds.model.deepseek import DeepSeekModel

SEED = 17
PROMPT = [5, 17, 300, 42, 7, 101]


def tiny_config(num_kv_heads: int = 2, vocab_size: int = 500) -> ModelConfig:
    """4 layers (PP2 x 2 virtual stages gets one layer each), 4 query heads of 16 over ``num_kv_heads``
    (2: TP2 splits them; 1: TP2 replicates the KV head). Vocab 500 is padded to 512 at TP2, so the
    padding columns are exercised. std 0.05 gives logits whose top-2 margins dwarf fp32 rounding."""
    return ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                       num_query_groups=num_kv_heads, max_position_embeddings=64, vocab_size=vocab_size,
                       init_method_std=0.05)


def build_chunks(config: ModelConfig, tp_group=None, pp_size: int = 1, pp_rank: int = 0, virtual: int = 1,
                 sequence_parallel: bool = False) -> list[DeepSeekModel]:
    """This rank's model chunks, one layer range each (virtual stage c * P + r holds layers
    [v * L/(V P), (v + 1) * L/(V P))); the init is layout-free, so every layout holds the same weights."""
    per = config.num_layers // (virtual * pp_size)
    last = virtual * pp_size - 1
    chunks = []
    for c in range(virtual):
        v = c * pp_size + pp_rank
        chunks.append(DeepSeekModel(config, tp_group=tp_group, sequence_parallel=sequence_parallel,
                                    pre_process=v == 0, post_process=v == last,
                                    layer_range=range(v * per, (v + 1) * per), seed=SEED,
                                    kernels=reference_kernels()))
    return chunks


def save_tiny_checkpoint(root: str, config: ModelConfig, tokenizer_path: str | None = None) -> DeepSeekModel:
    """Save the single-process model of ``config`` (seed SEED) at iteration 1; returns the model."""
    from megatron_ds.checkpoint.model_state import model_sharded_tensors
    from megatron_ds.checkpoint.save import save_checkpoint

    model = build_chunks(config)[0]
    tok = None
    if tokenizer_path is not None:
        tok = {"path": os.path.abspath(tokenizer_path), "sha256_16": "test", "vocab_size": config.vocab_size}
    save_checkpoint(root, 1, model_sharded_tensors(model), config=config, tokenizer=tok)
    return model


def word_tokenizer(path: str, words: int = 61) -> str:
    """A word-level tokenizer.json: <s>, </s> (EOD), <unk>, then w0 .. w{words-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": 3 + i for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(path)
    return path


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (the error relative to the logits' scale)."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
