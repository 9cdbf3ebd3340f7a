"""A DeepSeekModel shard (any TP rank, any pipeline stage) as pieces of layout-free global tensors.

Global keys are ``model/`` + the single-process parameter name, with two layout-independent
conventions:

- the vocabulary is stored unpadded: ``model/embedding.weight`` and ``model/lm_head.weight`` are
  ``[vocab_size, h]`` (HF's shape); the padding rows of a TP layout are zeros after a load (they
  meet no token and get no gradient, see ``parallel/cross_entropy.py``);
- the replicated-KV layout (TP above the KV heads) stores its ``attention.q`` and
  ``attention.kv`` weights as the row blocks ``[0, nq d)`` and ``[nq d, (nq + 2 nkv) d)`` of the
  global ``attention.qkv.weight``, which is what every other layout holds.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.sharded_tensor import ShardedTensor, tp_sharded_tensors
from megatron_ds.parallel.topology import VirtualGroup, group_rank, group_size

MODEL_PREFIX = "model/"
_VOCAB_PADDED = ("embedding.weight", "lm_head.weight")


def _global_name_and_shape(name: str, p: nn.Parameter, config, tp: int) -> tuple[str, tuple, int]:
    """(global name, global shape, row offset inside it) of local parameter ``name``."""
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] = sum(p.partition_sizes)
    qkv_rows = (config.num_attention_heads + 2 * config.num_kv_heads) * config.head_dim
    if name.endswith("attention.q.weight"):
        return name[:-len("q.weight")] + "qkv.weight", (qkv_rows, shape[1]), 0
    if name.endswith("attention.kv.weight"):
        return name[:-len("kv.weight")] + "qkv.weight", (qkv_rows, shape[1]), qkv_rows - shape[0]
    if name in _VOCAB_PADDED:
        shape[0] = config.vocab_size
    return name, tuple(shape), 0


def model_sharded_tensors(model: nn.Module, dp_rank: int = 0, prefix: str = MODEL_PREFIX) -> list[ShardedTensor]:
    """This rank's parameters as pieces (views of the parameters: fill them to load, copy to save).

    ``dp_rank`` > 0 marks every piece as a replica (not written): without ZeRO every DP rank holds
    the same weights. TP-replicated weights are written by TP rank 0 only.
    """
    pieces = []
    for name, p in model.named_parameters():
        pieces += param_sharded_tensors(model, name, p.data, prefix=prefix, replica_id=dp_rank, param=p)
    return pieces


def param_sharded_tensors(model: nn.Module, name: str, data: torch.Tensor, prefix: str = MODEL_PREFIX,
                          flat_range: Optional[tuple[int, int]] = None, replica_id: int = 0,
                          param: Optional[nn.Parameter] = None) -> list[ShardedTensor]:
    """Pieces of a tensor shaped like this rank's parameter ``name`` (the parameter itself, or an
    optimizer state of it), stored under ``prefix`` + the parameter's global name.

    ``flat_range=(a, b)``: ``data`` is 1-D, elements [a, b) of the flattened local tensor, the way
    a ZeRO-1 buffer holds a slice of a parameter (e.g. prefix ``optimizer/exp_avg/model/``).
    """
    config, tp_group = model.config, model.tp_group
    tp, tp_rank = group_size(tp_group), group_rank(tp_group)
    p = param if param is not None else model.get_parameter(name)
    key, gshape, row_offset = _global_name_and_shape(name, p, config, tp)
    if name in _VOCAB_PADDED:
        # This rank holds padded rows [rank * V_p/tp, (rank+1) * V_p/tp); only those < vocab_size are stored.
        per_rank, h = p.shape
        start = tp_rank * per_rank
        real = max(0, min(per_rank, config.vocab_size - start))
        if flat_range is None:
            return [ShardedTensor(prefix + key, data.narrow(0, 0, real), gshape, (start, 0), (real, h),
                                  replica_id=replica_id)] if real else []
        a, b = flat_range[0], min(flat_range[1], real * h)
        if a >= b:
            return []
        return [ShardedTensor(prefix + key, data[:b - a], gshape, (start, 0), (real, h), flat_range=(a, b),
                              replica_id=replica_id)]
    if getattr(p, "tensor_model_parallel", False):
        return tp_sharded_tensors(prefix + key, data, gshape, p.partition_dim, p.partition_sizes, tp_rank, tp,
                                  replica_id=replica_id, row_offset=row_offset, flat_range=flat_range)
    return tp_sharded_tensors(prefix + key, data, gshape, None, None, tp_rank, tp, replica_id=replica_id,
                              row_offset=row_offset, flat_range=flat_range)


def load_model(model: nn.Module, reader: CheckpointReader, prefix: str = MODEL_PREFIX) -> None:
    """Fill every parameter of ``model`` (any TP rank, any stage) from ``reader``'s checkpoint.

    All pieces are checked against the checkpoint before the first copy; an error leaves the
    model untouched except where the checkpoint's data was already valid for it.
    """
    pieces = model_sharded_tensors(model, prefix=prefix)
    for piece in pieces:  # shapes and names first: another model fails before any copy
        entry = reader._entry(piece.key)
        if tuple(entry["global_shape"]) != piece.global_shape:
            reader.read_into(piece)  # raises the shape error naming metadata.json
    with torch.no_grad():
        for name in _VOCAB_PADDED:
            p = dict(model.named_parameters()).get(name)
            if p is not None:
                p.zero_()  # padding rows stay zero; the real rows are read below
        for piece in pieces:
            reader.read_into(piece)


def stage_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Layers of stage ``pp_rank``: an even split, the first ``num_layers % pp`` stages one more.

    Only the offline tools use it (to decide which file a layer goes to); the checkpoint itself
    does not depend on how a run splits its layers.
    """
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def meta_model_shard(config, tp_size: int, tp_rank: int, pp_size: int = 1, pp_rank: int = 0,
                     layer_range: Optional[range] = None) -> nn.Module:
    """The parameters one rank of a TP x PP layout holds, on the meta device (no memory, no init)."""
    import inspect

    from megatron_ds.model.deepseek import DeepSeekModel

    kwargs = {}
    if "kernels" in inspect.signature(DeepSeekModel).parameters:  # a meta shard runs nothing: no fused ops
        from megatron_ds.kernels import reference_kernels

        kwargs["kernels"] = reference_kernels()
    group = VirtualGroup(tp_size, tp_rank) if tp_size > 1 else None
    layers = layer_range if layer_range is not None else stage_layer_range(config.num_layers, pp_size, pp_rank)
    return DeepSeekModel(config, tp_group=group, pre_process=pp_rank == 0, post_process=pp_rank == pp_size - 1,
                         layer_range=layers, device="meta", **kwargs)


def buffer_sharded_tensors(model: nn.Module, param_ranges: dict[str, tuple[int, int]], owned: torch.Tensor,
                           owned_range: tuple[int, int], prefix: str, replica_id: int = 0) -> list[ShardedTensor]:
    """Pieces of the part ``owned`` = ``buffer[owned_range[0]:owned_range[1]]`` of a flat buffer in
    which parameter ``name`` occupies ``param_ranges[name]`` (its flattened local tensor).

    This is how a ZeRO-1 optimizer describes its fp32 master weights and Adam moments (each DP
    rank a different range, ``replica_id=0``), or a plain-DP optimizer its full buffer
    (``replica_id=dp_rank``). Padding between parameters is not stored. Load by passing the
    destination as ``owned`` and calling ``reader.read_into`` on each piece.
    """
    s, e = owned_range
    if owned.numel() != e - s:
        raise ValueError(f"owned holds {owned.numel()} elements, owned_range {owned_range} says {e - s}")
    params = dict(model.named_parameters())
    pieces = []
    for name, (ps, pe) in param_ranges.items():
        a, b = max(s, ps), min(e, pe)
        if a < b:
            pieces += param_sharded_tensors(model, name, owned[a - s:b - s], prefix=prefix,
                                            flat_range=(a - ps, b - ps), replica_id=replica_id, param=params[name])
    return pieces
