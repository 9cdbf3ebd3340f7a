"""Pipeline stages: which layers each rank holds, and the model chunks it builds.

The L layers are cut into P stages in order. The split is even by default; uneven splits come from
``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers`` (those stages get
the given count, the others share the rest evenly) or from ``--pipeline-layer-split`` (every
stage's count). The first stage also holds the embedding; the last the final norm, LM head and loss.

Interleaving (``--num-layers-per-virtual-pipeline-stage k``) cuts the layers into V * P virtual
stages of k layers each, V = L / (P * k). Rank r holds V model chunks; chunk c is virtual stage
c * P + r, so an activation goes round the ranks V times:

    L = 8, P = 2, k = 2:  rank 0: chunks [layers 0-1, layers 4-5]   rank 1: [layers 2-3, layers 6-7]

Nothing here communicates; the 67B layout can be laid out in one process (``stage_parameter_counts``).
"""

from __future__ import annotations

from typing import Optional

from megatron_ds.config import Config, ModelConfig, ParallelConfig
from megatron_ds.layer_split import (  # noqa: F401 - the split arithmetic, re-exported here
    check_pipeline_config, num_virtual_chunks, parse_layer_split, rank_chunk_ranges, stage_layer_counts,
    virtual_stage_ranges,
)


def build_model_chunks(cfg: Config, tp_group, pp_rank: int, *, device=None, params_dtype=None, kernels=None) -> list:
    """This rank's model chunks (one DeepSeekModel each, global layer names), pipeline order."""
    import torch

    from megatron_ds.model.deepseek import DeepSeekModel

    ranges = rank_chunk_ranges(cfg.model.num_layers, cfg.parallel, pp_rank)
    pp = cfg.parallel.pipeline_model_parallel_size
    last_virtual = len(ranges) * pp - 1
    return [DeepSeekModel(cfg.model, tp_group=tp_group, sequence_parallel=cfg.parallel.sequence_parallel,
                          pre_process=c * pp + pp_rank == 0, post_process=c * pp + pp_rank == last_virtual,
                          layer_range=r, seed=cfg.training.seed, device=device,
                          params_dtype=params_dtype or torch.float32, kernels=kernels)
            for c, r in enumerate(ranges)]


def stage_parameter_counts(config: ModelConfig, tp: int, parallel: ParallelConfig) -> list[dict]:
    """Per pipeline rank: its layers and parameters summed over its TP shards (built on the meta device).

    ``[{"pp_rank": r, "layers": [range, ...], "parameters": n}, ...]``; the parameters add up to the
    whole model (with the vocabulary padding of TP ``tp``).
    """
    from megatron_ds.model.param_count import global_parameter_count

    pp = parallel.pipeline_model_parallel_size
    out = []
    for r in range(pp):
        ranges = rank_chunk_ranges(config.num_layers, parallel, r)
        last_virtual = len(ranges) * pp - 1
        n = sum(global_parameter_count(config, tp, layer_range=rg, pre_process=c * pp + r == 0,
                                       post_process=c * pp + r == last_virtual)
                for c, rg in enumerate(ranges))
        out.append({"pp_rank": r, "layers": ranges, "parameters": n})
    return out


def describe_split(counts: list[dict], total: Optional[int] = None) -> str:
    """One line per stage: layers and parameters, for logs and tests."""
    lines = []
    for c in counts:
        layers = ", ".join(f"{rg.start}-{rg.stop - 1}" for rg in c["layers"])
        lines.append(f"stage {c['pp_rank']}: {sum(len(rg) for rg in c['layers']):3d} layers ({layers}) "
                     f"{c['parameters']:>16,d} parameters")
    lines.append(f"total: {sum(c['parameters'] for c in counts):,d}" + (f" (expected {total:,d})" if total else ""))
    return "\n".join(lines)
