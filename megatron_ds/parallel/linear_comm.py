"""The GEMM of a column-parallel linear with its tensor-parallel communication folded in, as
Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``:

    forward    Y = X_total W^T      X_total = all-gather of X over dim 0 under SP, else X itself
    backward   dX_total = dY W      then reduce-scatter (SP) or all-reduce over TP  -> dX
               dW = dY^T X_total

Two things beside the plain composition (``gather_from_sequence_parallel_region`` then ``F.linear``):

- Memory: under SP only this rank's ``[s/tp, b, in]`` input is kept for backward, not the gathered
  ``[s, b, in]``; backward gathers it again. Per layer that drops 2 s b h (1 - 1/tp) elements of
  saved activations (the QKV and gate/up inputs), at the cost of one more all-gather of each.
- Overlap: backward starts the re-gather before the dX GEMM, and the reduction of dX before the dW
  GEMM, each as an async collective, so where the collective runs beside the compute (NCCL on GPUs,
  with CUDA_DEVICE_MAX_CONNECTIONS=1 so the collective is queued ahead of the GEMM) both are hidden.

The results are those of the composition: the same GEMMs on the same tensors and the same
collectives (tests/parallel/test_linear_comm.py holds one against the other and against an
unsharded layer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ds.parallel.mappings import (
    _all_gather,
    _all_gather_single,
    _check_divisible,
    _reduce_scatter_single,
    copy_to_tensor_model_parallel_region,
)
from megatron_ds.parallel.topology import group_size


class _LinearWithTPComm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, group, sequence_parallel):
        # x: [s/tp, b, in] under SP, else [s, b, in]; weight: [out/tp, in]
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        total = _all_gather(x, 0, group) if sequence_parallel else x  # [s, b, in]
        ctx.save_for_backward(x, weight)  # the local shard only: backward gathers it again
        return F.linear(total, weight)  # [s, b, out/tp]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        group, sp = ctx.group, ctx.sequence_parallel
        world = group_size(group)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gather = None
        if sp and need_dw:  # start the re-gather of the input; the dX GEMM runs meanwhile
            x = x.contiguous()
            total = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
            gather = _all_gather_single(total, x, group=group, async_op=True)
        else:
            total = x
        dx, reduce = None, None
        if need_dx:
            dx_total = grad.matmul(weight)  # [s, b, in]: this rank's partial sum over its out/tp rows
            if sp:
                _check_divisible(dx_total, 0, world, "reduce-scatter")
                dx = torch.empty((dx_total.shape[0] // world, *dx_total.shape[1:]), dtype=dx_total.dtype,
                                 device=dx_total.device)
            else:
                dx = dx_total
        if gather is not None:
            gather.wait()
        if need_dx:  # start the reduction of dX over TP; the dW GEMM runs meanwhile
            if sp:
                reduce = _reduce_scatter_single(dx, dx_total.contiguous(), group=group, async_op=True)
            else:
                reduce = dist.all_reduce(dx, group=group, async_op=True)
        dw = None
        if need_dw:
            out_features = grad.shape[-1]
            dw = grad.reshape(-1, out_features).t().mm(total.reshape(-1, total.shape[-1]))  # [out/tp, in]
        if reduce is not None:
            reduce.wait()
        return dx, dw, None, None


def linear_with_tp_comm(x: torch.Tensor, weight: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """``F.linear`` of the TP region's input: ``x`` all-gathered over dim 0 under SP (its gradient
    reduce-scattered), else replicated (its gradient all-reduced); see the module docstring."""
    if group_size(group) == 1:
        return F.linear(x, weight)
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        # No backward: nothing to save or overlap (inference, frozen reference models).
        return F.linear(_all_gather(x, 0, group) if sequence_parallel else
                        copy_to_tensor_model_parallel_region(x, group), weight)
    return _LinearWithTPComm.apply(x, weight, group, sequence_parallel)
