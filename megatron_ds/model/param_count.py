"""Parameter counts of real layouts, from models built on the meta device (no memory, no init).

One rank's shard is built with ``VirtualGroup(size=tp, rank=r)`` standing in for its TP group, so
the count comes from the same code that trains, not from a formula. A TP-sharded weight
(``tensor_model_parallel``) holds a different slice on every rank; everything else (norm weights,
a replicated KV projection) is a full copy on every rank and counts once in the model's total.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ds.config import ModelConfig, model_preset
from megatron_ds.model.deepseek import DeepSeekModel
from megatron_ds.parallel.topology import VirtualGroup


def build_on_meta(config: ModelConfig, tp: int, tp_rank: int = 0, *, layer_range: Optional[range] = None,
                  pre_process: bool = True, post_process: bool = True,
                  sequence_parallel: bool = False) -> DeepSeekModel:
    """TP rank ``tp_rank``'s shard of the model (or of one pipeline stage) on the meta device."""
    group = VirtualGroup(size=tp, rank=tp_rank) if tp > 1 else None
    return DeepSeekModel(config, tp_group=group, sequence_parallel=sequence_parallel, pre_process=pre_process,
                         post_process=post_process, layer_range=layer_range, device=torch.device("meta"))


def rank_parameter_counts(config: ModelConfig, tp: int, tp_rank: int = 0, *, layer_range: Optional[range] = None,
                          pre_process: bool = True, post_process: bool = True) -> dict[str, int]:
    """``{"sharded": n, "replicated": m}`` elements on one rank: TP-sharded weights vs full copies."""
    model = build_on_meta(config, tp, tp_rank, layer_range=layer_range, pre_process=pre_process,
                          post_process=post_process)
    counts = {"sharded": 0, "replicated": 0}
    for p in model.parameters():
        counts["sharded" if getattr(p, "tensor_model_parallel", False) else "replicated"] += p.numel()
    return counts


def count_model_parameters(config: ModelConfig, tp: int, layer_range: Optional[range] = None,
                           pre_process: bool = True, post_process: bool = True, *, tp_rank: int = 0) -> int:
    """Parameters one rank holds (TP rank ``tp_rank`` of ``tp``, the stage given by the other arguments)."""
    c = rank_parameter_counts(config, tp, tp_rank, layer_range=layer_range, pre_process=pre_process,
                              post_process=post_process)
    return c["sharded"] + c["replicated"]


def global_parameter_count(config: ModelConfig, tp: int, layer_range: Optional[range] = None,
                           pre_process: bool = True, post_process: bool = True) -> int:
    """The model's (or stage's) parameters summed back from all TP ranks: shards summed, copies once.

    Includes the vocabulary padding of ``config.padded_vocab_size(tp)``.
    """
    per_rank = [rank_parameter_counts(config, tp, r, layer_range=layer_range, pre_process=pre_process,
                                      post_process=post_process) for r in range(tp)]
    return sum(c["sharded"] for c in per_rank) + per_rank[0]["replicated"]


def presets_on_meta(name: str, tp: int) -> list[int]:
    """Per-rank parameter counts of preset ``name`` (``--model``) at TP ``tp``, one pipeline stage."""
    config = model_preset(name)
    return [count_model_parameters(config, tp, tp_rank=r) for r in range(tp)]
