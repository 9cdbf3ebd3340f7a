"""Optimizer state as layout-free pieces, so that any TP x PP x DP layout reads what any other wrote.

Global keys (docs/checkpoint_format.md), each shaped like the parameter's global tensor:

    optimizer/exp_avg/model/<global param name>       Adam first moment, fp32
    optimizer/exp_avg_sq/model/<global param name>    Adam second moment, fp32
    optimizer/master/model/<global param name>        fp32 master weights, only when they are not
                                                      the model params themselves (bf16, ZeRO-1)

plus, in ``common.pt``, ``{"optimizer": {"kind", "step"}}`` (Adam's step count).

Two optimizers are described the same way, so a checkpoint of one loads into the other:

- ``optim.distributed_optimizer.MegatronOptimizer``: flat fp32 buffers per model chunk. Under
  ZeRO-1 each DP rank holds chunks of them (``shard.ranges``) and writes exactly those
  (``buffer_sharded_tensors``, replica 0); without ZeRO every DP rank holds the full buffer and
  DP rank 0 writes it. Bucket padding is never stored.
- ``torch.optim`` Adam/AdamW over the params (the trainer's path before the ZeRO wiring): per-param
  ``exp_avg`` / ``exp_avg_sq``, written by DP rank 0; the params are the master weights.

Loading reads, for this rank's layout, exactly the elements it holds, from whichever pieces the
saving layout wrote.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_ds.checkpoint.format import CheckpointError
from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import MODEL_PREFIX, buffer_sharded_tensors, param_sharded_tensors
from megatron_ds.checkpoint.sharded_tensor import ShardedTensor
from megatron_ds.parallel.topology import ParallelState

OPTIMIZER_PREFIX = "optimizer/"
MOMENTS = ("exp_avg", "exp_avg_sq")


def state_prefix(kind: str) -> str:
    """``optimizer/<kind>/model/``: where state ``kind`` of every parameter is stored."""
    return f"{OPTIMIZER_PREFIX}{kind}/{MODEL_PREFIX}"


def is_megatron_optimizer(optimizer) -> bool:
    return hasattr(optimizer, "shards") and hasattr(optimizer, "reload_model_params")


def _chunks(model_chunks) -> list[torch.nn.Module]:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _param_ranges(chunk: torch.nn.Module, grad_buffer) -> dict[str, tuple[int, int]]:
    """{param name: (start, end)} of every param of ``chunk`` in its flat buffer."""
    out = {}
    for name, p in chunk.named_parameters():
        off = grad_buffer.param_offsets.get(id(p))
        if off is not None:
            out[name] = (off, off + p.numel())
    return out


def _megatron_pieces(optimizer, model_chunks, state: ParallelState, with_master: bool) -> list[ShardedTensor]:
    chunks = _chunks(model_chunks)
    if len(chunks) != len(optimizer.shards):
        raise ValueError(f"{len(chunks)} model chunks, the optimizer has {len(optimizer.shards)} shards")
    replica = 0 if optimizer.distributed else state.dp_rank
    pieces = []
    for chunk, shard in zip(chunks, optimizer.shards):
        ranges = _param_ranges(chunk, shard.grad_buffer)
        tensors = {"exp_avg": shard.exp_avg, "exp_avg_sq": shard.exp_avg_sq}
        if with_master and not shard.master_is_param_buffer:
            tensors["master"] = shard.master
        for kind, flat in tensors.items():
            for buf_off, sh_off, n in shard.ranges:
                pieces += buffer_sharded_tensors(chunk, ranges, flat[sh_off:sh_off + n], (buf_off, buf_off + n),
                                                 prefix=state_prefix(kind), replica_id=replica)
    return pieces


def _torch_pieces(optimizer: torch.optim.Optimizer, model_chunks, state: ParallelState,
                  create: bool = False) -> list[ShardedTensor]:
    pieces = []
    for chunk in _chunks(model_chunks):
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                continue
            st = optimizer.state.get(p)
            if create and not st:
                st = optimizer.state[p]
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                for kind in MOMENTS:
                    st[kind] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not st or "exp_avg" not in st:
                continue  # no step taken yet: nothing to save
            for kind in MOMENTS:
                pieces += param_sharded_tensors(chunk, name, st[kind], prefix=state_prefix(kind),
                                                replica_id=state.dp_rank, param=p)
    return pieces


def _torch_step(optimizer: torch.optim.Optimizer) -> int:
    for st in optimizer.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def optimizer_sharded_tensors(optimizer, model_chunks, state: ParallelState) -> list[ShardedTensor]:
    """This rank's optimizer state as pieces (views: ``save`` copies them at the call)."""
    if optimizer is None:
        return []
    if is_megatron_optimizer(optimizer):
        return _megatron_pieces(optimizer, model_chunks, state, with_master=True)
    return _torch_pieces(optimizer, model_chunks, state)


def optimizer_common_state(optimizer) -> Optional[dict]:
    """What goes into ``common_state["optimizer"]``: the kind and Adam's step count."""
    if optimizer is None:
        return None
    if is_megatron_optimizer(optimizer):
        return {"kind": "zero1" if optimizer.distributed else "megatron", "step": int(optimizer.iteration)}
    return {"kind": "torch", "step": _torch_step(optimizer)}


def has_optimizer_state(reader: CheckpointReader) -> bool:
    prefix = state_prefix("exp_avg")
    return any(k.startswith(prefix) for k in reader.keys())


@torch.no_grad()
def load_optimizer_state(optimizer, model_chunks, state: ParallelState, reader: CheckpointReader,
                         common_state: Optional[dict] = None) -> None:
    """Fill ``optimizer`` (this rank's part, at this rank's layout) from ``reader``'s checkpoint.

    Call after the model weights are loaded: the fp32 master weights start as a copy of them (a
    checkpoint without master weights, saved where the params were the master, needs nothing
    else) and are then overwritten by the stored master weights when there are any.
    """
    if optimizer is None:
        return
    if not has_optimizer_state(reader):
        raise CheckpointError(f"{reader.dir}: no optimizer state in this checkpoint (saved without one?); "
                              "pass --no-load-optim (or --finetune) to start the optimizer afresh")
    saved = (common_state or {}).get("optimizer") if isinstance(common_state, dict) else None
    step = int(saved["step"]) if saved else int(reader.iteration)
    if is_megatron_optimizer(optimizer):
        optimizer.reload_model_params()
        stored_master = any(k.startswith(state_prefix("master")) for k in reader.keys())
        pieces = _megatron_pieces(optimizer, model_chunks, state, with_master=stored_master)
        # Check every key and shape before the first copy: another model fails before any change.
        for piece in pieces:
            if reader.global_shape(piece.key) != piece.global_shape:
                reader.read_into(piece)  # raises the shape error naming metadata.json
        for piece in pieces:
            reader.read_into(piece)
        optimizer.iteration = step
        return
    pieces = _torch_pieces(optimizer, model_chunks, state, create=True)
    for piece in pieces:
        if reader.global_shape(piece.key) != piece.global_shape:
            reader.read_into(piece)
    for piece in pieces:
        reader.read_into(piece)
    for st in optimizer.state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step), dtype=torch.float32)


def reset_optimizer_from_model(optimizer) -> None:
    """After loading weights only (--no-load-optim, --finetune): master weights from the params."""
    if optimizer is not None and is_megatron_optimizer(optimizer):
        optimizer.reload_model_params()


__all__: Sequence[str] = (
    "optimizer_sharded_tensors", "optimizer_common_state", "load_optimizer_state", "has_optimizer_state",
    "reset_optimizer_from_model", "state_prefix",
)
