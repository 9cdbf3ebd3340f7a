"""Shared pieces of the checkpoint tests: a small GQA model with weights that are not its init."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ds.checkpoint.model_state import stage_layer_range
from megatron_ds.model.deepseek import DeepSeekModel
from megatron_ds.model.hf_names import load_hf_state_dict, shard_hf_state_dict_for_tp
from megatron_ds.parallel.topology import ParallelState, build_parallel_state
from tests.model.hf_reference import hf_reference, model_config

try:  # the kernels issue adds a kernels= argument; checkpoint tests need no forward, so references do
    from megatron_ds.kernels import reference_kernels

    MODEL_KWARGS = {"kernels": reference_kernels()}
except ImportError:
    MODEL_KWARGS = {}

ARCH, VOCAB = "gqa", 1000  # 4 query heads over 2 KV heads: TP4 replicates KV; vocab padded to 1024


def config():
    return model_config(ARCH, VOCAB)


def hf_weights() -> dict[str, torch.Tensor]:
    """Random HF-named weights (norms too): a checkpoint of them differs from any seed's init."""
    return hf_reference(ARCH, VOCAB)[0]


def new_model(cfg=None, **kwargs) -> DeepSeekModel:
    return DeepSeekModel(cfg or config(), **MODEL_KWARGS, **kwargs)


def build_stage(state: ParallelState, seed: int = 11) -> DeepSeekModel:
    cfg = config()
    return new_model(cfg, tp_group=state.tp_group, pre_process=state.is_first_stage,
                         post_process=state.is_last_stage,
                         layer_range=stage_layer_range(cfg.num_layers, state.pp_size, state.pp_rank), seed=seed)


def model_with_weights(state: ParallelState, hf_sd) -> DeepSeekModel:
    model = build_stage(state, seed=5)
    load_hf_state_dict(model, hf_sd)
    return model


def mismatches(model: DeepSeekModel, hf_sd, tp_rank: int, tp_size: int) -> list[str]:
    """Names of parameters that differ from the HF weights' TP shard (padding rows must be zero)."""
    expected = shard_hf_state_dict_for_tp(hf_sd, model.config, tp_rank, tp_size)
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach(), expected[n])]


def parallel_state(tp: int, pp: int) -> ParallelState:
    if dist.is_initialized():
        return build_parallel_state(tp, pp)
    return ParallelState()
