"""Offline writing of a checkpoint laid out for a target TP x PP, one tensor block at a time.

The files a target rank gets are decided by the same code the trainer saves with: the rank's
model shard is built on the meta device (no memory) and ``model_sharded_tensors`` lists its
pieces. Each piece's data is read from the source only when it is written, so at most one block
is in memory: a 67B checkpoint can be resharded on a machine that cannot hold it.

A source is anything with ``keys()``, ``global_shape(key)``, ``dtype(key)`` and
``read(key, offsets, shape)``: a ``CheckpointReader`` (resharding) or a Hugging Face checkpoint
(``hf.HFSource``, import).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from typing import Optional

import torch

from megatron_ds.checkpoint.format import (
    COMMON, FORMAT_VERSION, TMP_SUFFIX, CheckpointError, existing_checkpoint, iter_dir_name, remove_stale_tmp,
)
from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import MODEL_PREFIX, meta_model_shard, model_sharded_tensors, stage_layer_range
from megatron_ds.checkpoint.save import _Job
from megatron_ds.checkpoint.sharded_tensor import ShardedTensor
from megatron_ds.config import ConfigError, ModelConfig, ParallelConfig, check_model_layout
from megatron_ds.paths import check_writable_dir


def check_target_layout(config: ModelConfig, tp: int, pp: int) -> None:
    """The target TP x PP passes the trainer's own rules (``config.check_model_layout``), checked
    before anything is written; else a one-line CheckpointError in the tools' words: ``--target-tp``
    / ``--target-pp`` for the trainer's layout flags, "the model's <field>" for the architecture
    (which comes from the checkpoint, not from a flag of the tool).

    The layer split is the one the files are written with (``stage_layer_range``), given to the
    rules as an explicit ``--pipeline-layer-split``, which the tools' messages call ``--target-pp``.
    """
    counts = [len(stage_layer_range(config.num_layers, pp, r)) for r in range(pp)] if pp >= 1 else []
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              pipeline_layer_split=",".join(map(str, counts)) if counts else None)
    try:
        check_model_layout(config, parallel)
    except ConfigError as e:
        raise CheckpointError(tool_flags(str(e), pp)) from None


_MODEL_FLAGS = {f"--{f.name.replace('_', '-')}": f.name for f in dataclasses.fields(ModelConfig)}


def tool_flags(message: str, pp: int) -> str:
    """A trainer message about a target layout, in the offline tools' flags."""
    trainer = {"--tensor-model-parallel-size": "--target-tp", "--pipeline-model-parallel-size": "--target-pp"}
    # The split is --target-pp's even one: its messages name the split, "--target-pp N" says where it came from.
    message = re.sub(r"--pipeline-layer-split(?: [0-9,]+)?(?![\w-])", f"--target-pp {pp}", message)

    def sub(m: re.Match) -> str:
        flag = m.group(0)
        if flag in trainer:
            return trainer[flag]
        return f"the model's {_MODEL_FLAGS[flag]}" if flag in _MODEL_FLAGS else flag

    return re.sub(r"--[a-z][a-z0-9-]*(?![\w-])", sub, message)


def target_pieces(source, config: ModelConfig, tp: int, pp: int) -> list[list[ShardedTensor]]:
    """Pieces each target rank (rank = pp_rank * tp + tp_rank) writes, data on the meta device.

    Keys of the model that the source lacks, or has with another shape, are errors. Other keys
    (optimizer state ``<name>/model/<param>``) follow their parameter's split when their name
    ends in a parameter key of the same shape; the rest go whole to rank 0.
    """
    src_keys = set(source.keys())
    ranks, model_keys = [], set()
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            shard = meta_model_shard(config, tp, tp_rank, pp, pp_rank)
            pieces = []
            for p in model_sharded_tensors(shard):
                model_keys.add(p.key)
                if p.key not in src_keys:
                    raise CheckpointError(f"{source}: no tensor {p.key}; it does not hold this model's weights")
                if tuple(source.global_shape(p.key)) != p.global_shape:
                    raise CheckpointError(f"{source}: {p.key} has shape {tuple(source.global_shape(p.key))}, the "
                                          f"model of its config needs {p.global_shape}")
                pieces.append(p)
            ranks.append(pieces)
    for key in sorted(src_keys - model_keys):
        tail = key[key.find(MODEL_PREFIX):] if MODEL_PREFIX in key else None
        placed = False
        if tail in model_keys:
            for pieces in ranks:
                for p in [q for q in pieces if q.key == tail]:
                    if p.global_shape == tuple(source.global_shape(key)):
                        pieces.append(dataclasses.replace(p, key=key))
                        placed = True
        if not placed:
            shape = tuple(source.global_shape(key))
            ranks[0].append(ShardedTensor(key, torch.empty(shape, device="meta"), shape, (0,) * len(shape), shape))
    # Data as meta tensors of the source's dtype: the header of each file is written before any data.
    return [[dataclasses.replace(p, data=torch.empty(p.shape, dtype=source.dtype(p.key), device="meta"))
             for p in pieces if p.replica_id == 0] for pieces in ranks]


def check_save_dir(save: str, iteration: int, force: bool = False) -> None:
    """A --save the offline tools may write ``iter_N`` into: writable (or creatable), and holding no
    checkpoint unless ``force``; else a one-line error naming --save."""
    check_writable_dir(save, "--save")
    existing = existing_checkpoint(save)
    if existing is not None and not force:
        raise CheckpointError(f"--save {save} already holds a checkpoint ({existing}); write to a new directory, or "
                              f"pass --force to add {iter_dir_name(iteration)} there (replacing one of that "
                              f"iteration; 'latest' does not move back to an older iteration)")


def write_layout(save: str, source, config: ModelConfig, tp: int, pp: int, *, iteration: int = 0,
                 consumed_samples: int = 0, full_config: Optional[dict] = None, tokenizer: Optional[dict] = None,
                 common_state_bytes: Optional[bytes] = None, extra_metadata: Optional[dict] = None,
                 force: bool = False, set_latest: bool = False) -> str:
    """Write ``source`` as ``save/iter_N`` laid out for TP ``tp`` x PP ``pp`` and point ``latest`` at it.

    A ``save`` that already holds a checkpoint is an error unless ``force``; then an ``iter_N``
    there is replaced whole (the new one is written as ``iter_N.tmp`` and renamed into place), and
    ``latest`` stays on a newer iteration it names unless ``set_latest``. A write that fails removes
    its ``.tmp`` directory and touches nothing else.
    """
    check_target_layout(config, tp, pp)
    check_save_dir(save, iteration, force)
    ranks = target_pieces(source, config, tp, pp)
    final = os.path.join(save, iter_dir_name(iteration))
    tmp = final + TMP_SUFFIX
    os.makedirs(save, exist_ok=True)
    remove_stale_tmp(save)
    os.makedirs(tmp)
    metadata = {
        "format_version": FORMAT_VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
        "config": full_config if full_config is not None else dataclasses.asdict(config),
        "tokenizer": tokenizer, "layout": dict(tp=tp, pp=pp, dp=1), "world_size": tp * pp,
        "saved_at_unix": time.time(), **(extra_metadata or {}),
    }

    def fetch(p: ShardedTensor) -> torch.Tensor:
        block = source.read(p.key, p.offsets, p.shape)
        return block.reshape(-1)[p.flat_range[0]:p.flat_range[1]] if p.flat_range is not None else block

    # Rank 0 last: its job commits the checkpoint once every other rank's marker is there.
    try:
        for rank in reversed(range(tp * pp)):
            _Job(root=save, tmp=tmp, final=final, rank=rank, world_size=tp * pp, pieces=ranks[rank],
                 rank_state=None, common_state=common_state_bytes if rank == 0 else None, metadata=metadata,
                 keep_last_n=None, timeout_s=0.0, fetch=fetch, keep_newer_latest=not set_latest).run()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def reshard(load: str, save: str, target_tp: int, target_pp: int, verify: bool = True, *, force: bool = False,
            set_latest: bool = False) -> str:
    """Rewrite the checkpoint at ``load`` for TP ``target_tp`` x PP ``target_pp`` (1 x 1: one file).

    Everything layout-free comes along (tensors, config, iteration, consumed samples, tokenizer,
    the common state); per-rank states (RNG streams) belong to the old layout and are dropped.
    ``force`` and ``set_latest``: as in ``write_layout``.
    """
    reader = CheckpointReader(load, verify=verify)
    if os.path.realpath(save) in (os.path.realpath(load), os.path.dirname(os.path.realpath(reader.dir))):
        raise CheckpointError(f"--save {save} is the checkpoint being read; write the resharded copy elsewhere")
    check_save_dir(save, reader.iteration, force)  # before anything is read
    if reader.model_config is None:
        raise CheckpointError(f"{reader.dir}/metadata.json: no model config recorded; cannot tell the layers apart")
    config = ModelConfig(**reader.model_config)
    check_target_layout(config, target_tp, target_pp)
    common = None
    if COMMON in reader.meta["files"]:
        with open(reader._check_file(COMMON), "rb") as f:
            common = f.read()
    skip = {"format_version", "iteration", "consumed_samples", "config", "tokenizer", "layout", "world_size",
            "saved_at_unix", "tensors", "files"}
    return write_layout(save, reader, config, target_tp, target_pp, iteration=reader.iteration,
                        consumed_samples=reader.consumed_samples, full_config=reader.config,
                        tokenizer=reader.tokenizer, common_state_bytes=common,
                        extra_metadata={k: v for k, v in reader.meta.items() if k not in skip},
                        force=force, set_latest=set_latest)
