"""An inference model from a checkpoint: this rank's TP shard of its pipeline stage, at any layout.

Checkpoints are layout-free (global shapes, see checkpoint/model_state.py), so a run saved at
TP8 x PP8 loads at TP2 x PP2, or in one process. The architecture comes from the checkpoint's
metadata (every ``--save`` records the run's config) and otherwise from the caller.
The inference model is built with sequence parallelism off and an even layer split.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import MODEL_PREFIX, load_model, stage_layer_range
from megatron_ds.config import ConfigError, ModelConfig
from megatron_ds.model.attention import kv_heads_replicated
from megatron_ds.parallel.topology import ParallelState


def checkpoint_model_config(reader: CheckpointReader) -> Optional[ModelConfig]:
    """The ModelConfig recorded in the checkpoint's metadata, or None when it records none."""
    fields = reader.model_config
    if fields is None:
        return None
    known = set(ModelConfig.__dataclass_fields__)
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


def check_layout(config: ModelConfig, tp: int, pp: int) -> None:
    """ConfigError naming the flag when TP x PP cannot hold this model."""
    if tp < 1 or pp < 1:
        raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if config.num_attention_heads % tp:
        raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the model's "
                          f"{config.num_attention_heads} attention heads")
    try:
        kv_heads_replicated(config, tp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if pp > config.num_layers:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} exceeds the model's {config.num_layers} layers; "
                          "every stage needs at least one")


def build_inference_model(config: ModelConfig, state: ParallelState, *, params_dtype: torch.dtype = torch.float32,
                          fused_kernels: bool = True) -> torch.nn.Module:
    """This rank's stage (layers split evenly, the first stages one more), SP off; weights still the init."""
    from megatron_ds.kernels import select_kernels
    from megatron_ds.model.deepseek import DeepSeekModel

    check_layout(config, state.tp_size, state.pp_size)
    return DeepSeekModel(config, tp_group=state.tp_group, sequence_parallel=False,
                         pre_process=state.is_first_stage, post_process=state.is_last_stage,
                         layer_range=stage_layer_range(config.num_layers, state.pp_size, state.pp_rank),
                         device=state.device, params_dtype=params_dtype,
                         kernels=select_kernels(fused=fused_kernels, device=state.device))


def load_inference_model(path: str, state: ParallelState, *, config: Optional[ModelConfig] = None,
                         params_dtype: Optional[torch.dtype] = None, fused_kernels: bool = True,
                         verify: bool = True) -> tuple[torch.nn.Module, CheckpointReader]:
    """(this rank's model filled from the checkpoint at ``path``, its reader).

    ``config`` is used only when the checkpoint records none. ``params_dtype`` defaults to the
    dtype the checkpoint stores."""
    reader = CheckpointReader(path, verify=verify)
    recorded = checkpoint_model_config(reader)
    if recorded is None and config is None:
        raise ConfigError(f"{reader.dir}/metadata.json records no model config; pass the architecture "
                          "(--model and its flags)")
    config = recorded or config
    dtype = params_dtype or reader.dtype(MODEL_PREFIX + "embedding.weight")
    model = build_inference_model(config, state, params_dtype=dtype, fused_kernels=fused_kernels)
    load_model(model, reader)
    return model, reader
