"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Activations are sequence-first: ``[s, b, h]``; under sequence parallelism (SP) each TP rank holds
``[s/tp, b, h]`` outside the TP regions. DeepSeek's linears have no bias, so neither do these.

Every TP weight carries attributes for checkpoint code, which stores global shapes:
``tensor_model_parallel = True``, ``partition_dim`` (the dim split over TP) and
``partition_sizes`` (global sizes of the parts along ``partition_dim`` that are split over TP
independently, e.g. ``[q, k, v]`` of a fused QKV; one part for an ordinary weight). The global
weight is the concatenation of the parts; this rank holds chunk ``tp_rank`` of each part, concatenated.

Initialization: the FULL fp32 master weight is drawn from the layer's generator and the rank keeps
its shard, so every layout starts from the single-process weights (see ``random.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_ds.parallel.linear_comm import linear_with_tp_comm
from megatron_ds.parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_ds.parallel.random import InitMethod
from megatron_ds.parallel.topology import group_rank, group_size


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp != 0:
        raise ValueError(f"{what} = {n} is not divisible by --tensor-model-parallel-size {tp}")
    return n // tp


def _init_shard(weight: nn.Parameter, init_method: InitMethod, generator: torch.Generator,
                tp_group, full_shape: tuple[int, int], partition_dim: int, part_sizes: Sequence[int]) -> None:
    """Draw the full fp32 master weight on the generator's device, copy this rank's shard into ``weight``."""
    if weight.device.type == "meta":
        return
    master = torch.empty(full_shape, dtype=torch.float32, device=generator.device)
    init_method(master, generator)
    tp, rank = group_size(tp_group), group_rank(tp_group)
    shard = torch.cat([part.chunk(tp, dim=partition_dim)[rank]
                       for part in master.split(list(part_sizes), dim=partition_dim)], dim=partition_dim)
    with torch.no_grad():
        weight.copy_(shard)  # casts to params_dtype and moves to the weight's device


def _mark_tensor_parallel(weight: nn.Parameter, partition_dim: int, part_sizes: Sequence[int]) -> None:
    weight.tensor_model_parallel = True
    weight.partition_dim = partition_dim
    weight.partition_sizes = list(part_sizes)


class ColumnParallelLinear(nn.Module):
    """Y = X W^T with W's output rows split over TP: rank holds W[out/tp, in]; X replicated [s,b,in] (SP: own [s/tp,b,in]) -> Y [s,b,out/tp]; fwd identity (SP: all-gather dim 0), bwd all-reduce of dX (SP: reduce-scatter dim 0).

    ``partition_sizes`` splits each part of a fused weight over TP separately (``[q, k, v]`` for a
    GQA QKV, ``[ffn, ffn]`` for gate+up), so the local output is ``[q/tp | k/tp | v/tp]`` and
    ``self.local_partition_sizes`` gives its split. ``gather_output`` all-gathers the last dim
    (bwd: keep own chunk) to return the full ``[s, b, out]``.
    """

    def __init__(self, input_size: int, output_size: int, *, tp_group, init_method: InitMethod,
                 init_generator: torch.Generator, gather_output: bool = False,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 device=None, partition_sizes: Sequence[int] | None = None):
        super().__init__()
        tp = group_size(tp_group)
        parts = list(partition_sizes) if partition_sizes is not None else [output_size]
        if sum(parts) != output_size:
            raise ValueError(f"partition_sizes {parts} sum to {sum(parts)}, not output_size {output_size}")
        if gather_output and len(parts) > 1:
            # The gathered tensor would be [q0 k0 v0 q1 k1 v1 ...], not the master order.
            raise ValueError("gather_output is not supported with several partition_sizes")
        if gather_output and sequence_parallel:
            raise ValueError("gather_output is not supported under sequence parallelism")
        self.input_size, self.output_size = input_size, output_size
        self.tp_group, self.tp_size = tp_group, tp
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.partition_sizes = parts
        self.local_partition_sizes = [_divide(p, tp, "ColumnParallelLinear output part size") for p in parts]
        self.output_size_per_partition = sum(self.local_partition_sizes)

        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size,
                                               dtype=params_dtype, device=device))
        _mark_tensor_parallel(self.weight, 0, parts)
        _init_shard(self.weight, init_method, init_generator, tp_group, (output_size, input_size), 0, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SP: all-gather of x, keeping only the local shard for backward; backward overlaps its
        # collectives with the dX and dW GEMMs (parallel/linear_comm.py).
        y = linear_with_tp_comm(x, self.weight, self.tp_group, self.sequence_parallel)  # [s, b, out/tp]
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y, self.tp_group)  # [s, b, out]
        return y

    def extra_repr(self) -> str:
        parts = f", partition_sizes={self.partition_sizes}" if len(self.partition_sizes) > 1 else ""
        return (f"in={self.input_size}, out={self.output_size}, out_per_partition={self.output_size_per_partition}, "
                f"tp={self.tp_size}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}{parts}")


class RowParallelLinear(nn.Module):
    """Y = X W^T with W's input columns split over TP: rank holds W[out, in/tp] and X [s,b,in/tp] -> Y [s,b,out] summed over TP (SP: own [s/tp,b,out]); fwd all-reduce (SP: reduce-scatter dim 0), bwd identity (SP: all-gather dim 0).

    ``input_is_parallel=False`` takes a replicated ``[s, b, in]`` and keeps this rank's last-dim
    chunk first (bwd: all-gather of dX).
    """

    def __init__(self, input_size: int, output_size: int, *, tp_group, init_method: InitMethod,
                 init_generator: torch.Generator, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        tp = group_size(tp_group)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear under sequence parallelism needs input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.tp_group, self.tp_size = tp_group, tp
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.input_size_per_partition = _divide(input_size, tp, "RowParallelLinear input size")

        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition,
                                               dtype=params_dtype, device=device))
        _mark_tensor_parallel(self.weight, 1, [input_size])
        _init_shard(self.weight, init_method, init_generator, tp_group, (output_size, input_size), 1, [input_size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.tp_group)  # [s, b, in/tp]
        y = F.linear(x, self.weight)  # [s, b, out], a partial sum over this rank's in/tp columns
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(y, self.tp_group)  # [s/tp, b, out]
        return reduce_from_tensor_model_parallel_region(y, self.tp_group)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, in_per_partition={self.input_size_per_partition}, "
                f"tp={self.tp_size}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocab split over TP: rank holds rows [r*V/tp, (r+1)*V/tp) of W[V, h]; ids [b,s] replicated -> [s,b,h] (SP: own [s/tp,b,h]); fwd all-reduce of the masked lookups (SP: reduce-scatter dim 0), bwd identity (SP: all-gather dim 0).

    ``num_embeddings`` is the padded vocabulary (Megatron pads it to a multiple of 128 * tp).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group, init_method: InitMethod,
                 init_generator: torch.Generator, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        tp = group_size(tp_group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_group, self.tp_size = tp_group, tp
        self.sequence_parallel = sequence_parallel
        self.num_embeddings_per_partition = _divide(num_embeddings, tp, "padded vocabulary size")
        self.vocab_start_index = group_rank(tp_group) * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition

        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim,
                                               dtype=params_dtype, device=device))
        _mark_tensor_parallel(self.weight, 0, [num_embeddings])
        _init_shard(self.weight, init_method, init_generator, tp_group,
                    (num_embeddings, embedding_dim), 0, [num_embeddings])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.t()  # [b, s] -> [s, b]: look up sequence-first so no activation transpose
        if self.tp_size > 1:
            outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
            local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
            emb = F.embedding(local_ids, self.weight)  # [s, b, h]
            # Rows of ids another rank owns are zero here; the sum over TP fills them in.
            emb = emb.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            emb = F.embedding(input_ids, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(emb, self.tp_group)  # [s/tp, b, h]
        return reduce_from_tensor_model_parallel_region(emb, self.tp_group)  # [s, b, h]

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"per_partition={self.num_embeddings_per_partition}, tp={self.tp_size}, "
                f"sequence_parallel={self.sequence_parallel}")


# --- replicated params under sequence parallelism ------------------------------------------------


def set_sequence_parallel_attr(param: nn.Parameter) -> None:
    """Mark a TP-replicated param (a norm weight) that sees only this rank's s/tp tokens under SP,
    so its grad is a partial sum that ``allreduce_tp_replicated_grads`` must complete."""
    param.sequence_parallel = True


def _needs_tp_grad_sum(p: nn.Parameter) -> bool:
    # sequence_parallel: norm weights under SP each saw s/tp tokens.
    # sum_grad_over_tp: a replicated weight each rank used for its own heads only (KV heads when
    # TP exceeds the KV-head count, see model/attention.py).
    return p.requires_grad and (getattr(p, "sequence_parallel", False) or getattr(p, "sum_grad_over_tp", False))


def allreduce_tp_replicated_grads(module: nn.Module, tp_group) -> None:
    """Sum over TP the grads (``.main_grad`` if present, else ``.grad``) of replicated params whose
    grad is partial on each rank; call after backward (and the DP sync), before grad clipping."""
    if group_size(tp_group) == 1:
        return
    grads: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in module.parameters():
        if not _needs_tp_grad_sum(p):
            continue
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None:
            grads.setdefault(g.dtype, []).append(g)
    # One all-reduce per dtype: norm weights are tiny and a call each would be all latency.
    for gs in grads.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, group=tp_group)
        for g, reduced in zip(gs, flat.split([g.numel() for g in gs])):
            g.copy_(reduced.view_as(g))
