"""The real DeepSeek shapes, built shard by shard on the meta device at TP 8, sum back to the paper's counts."""

import pytest

from megatron_ds.config import count_parameters, model_preset
from megatron_ds.model.param_count import (
    count_model_parameters,
    global_parameter_count,
    presets_on_meta,
    rank_parameter_counts,
)


@pytest.mark.parametrize("name,expected,shown", [("deepseek-7b", 6_910_365_696, "6.910B"),
                                                 ("deepseek-67b", 67_425_001_472, "67.43B")])
def test_tp8_shards_on_meta_sum_to_the_paper_count(name, expected, shown):
    cfg = model_preset(name)
    per_rank = [rank_parameter_counts(cfg, 8, r) for r in range(8)]
    # TP-sharded weights are summed over ranks; replicated ones (norm weights) count once.
    total = sum(c["sharded"] for c in per_rank) + per_rank[0]["replicated"]
    print(f"{name} TP=8 per rank: {[c['sharded'] + c['replicated'] for c in per_rank]} -> total {total:,}")
    assert all(c == per_rank[0] for c in per_rank)
    assert total == count_parameters(cfg) == expected
    assert (f"{total / 1e9:.3f}B" if total < 1e10 else f"{total / 1e9:.2f}B") == shown


def test_presets_on_meta_gives_per_rank_counts():
    counts = presets_on_meta("deepseek-7b", 2)
    cfg = model_preset("deepseek-7b")
    assert len(counts) == 2 and counts[0] == counts[1] == count_model_parameters(cfg, 2, tp_rank=1)


def test_pipeline_stages_partition_the_67b_model():
    # 95 layers over 4 uneven stages (24, 24, 24, 23): the stages' counts add up to the whole model.
    cfg = model_preset("deepseek-67b")
    bounds = [0, 24, 48, 72, 95]
    stages = [global_parameter_count(cfg, 8, layer_range=range(a, b), pre_process=i == 0, post_process=i == 3)
              for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    assert sum(stages) == count_parameters(cfg)


def test_replicated_kv_heads_count_once():
    # 67B's 8 KV heads at TP 16: every rank holds the full K/V projection (replicated), which counts
    # once; the vocabulary 102400 is a multiple of 128 * 16, so the total is still the paper's.
    cfg = model_preset("deepseek-67b")
    assert cfg.padded_vocab_size(16) == cfg.vocab_size
    assert global_parameter_count(cfg, 16) == count_parameters(cfg)
