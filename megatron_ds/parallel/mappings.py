"""Autograd collectives over a tensor-parallel group (Megatron's "mappings").

Each function is a pair of collectives, one in forward and its adjoint in backward, so that the
gradient of a sharded computation equals the gradient of the unsharded one:

    copy_to_tensor_model_parallel_region          fwd identity            bwd all-reduce
    reduce_from_tensor_model_parallel_region      fwd all-reduce          bwd identity
    scatter_to_tensor_model_parallel_region       fwd split last dim      bwd all-gather last dim
    gather_from_tensor_model_parallel_region      fwd all-gather last dim bwd split last dim
    scatter_to_sequence_parallel_region           fwd split dim 0         bwd all-gather dim 0
    gather_from_sequence_parallel_region          fwd all-gather dim 0    bwd reduce-scatter dim 0 (or split)
    reduce_scatter_to_sequence_parallel_region    fwd reduce-scatter dim 0 bwd all-gather dim 0

Activations are sequence-first ``[s, b, h]``, so the sequence-parallel ones work on dim 0.
The group is passed explicitly; ``None`` is a group of one rank and every function is then the
identity (no autograd node at all), which is how the unsharded model runs the same code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ds.parallel.topology import group_rank, group_size

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single and warns on the old
# names; older torch (clusters pin their own) only has the old ones. Same semantics, same kernels.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --- raw collectives (no autograd) -------------------------------------------------------------


def _check_divisible(x: torch.Tensor, dim: int, world: int, op: str) -> None:
    n = x.shape[dim]
    if n % world != 0:
        what = "the sequence (dim 0)" if dim in (0, -x.dim()) else f"dim {dim}"
        raise ValueError(
            f"{op}: {what} of a tensor of shape {tuple(x.shape)} has size {n}, which is not divisible "
            f"by the tensor-parallel size {world}; choose sizes divisible by "
            f"--tensor-model-parallel-size (e.g. --seq-length under --sequence-parallel)"
        )


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # Reduce into a fresh buffer: the input may be saved by another autograd node (or be a grad
    # that autograd reuses), so an in-place reduction could corrupt it.
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = group_size(group)
    _check_divisible(x, dim, world, "split")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    # The collective gathers along dim 0: [n, ...] -> [world * n, ...], rank-major.
    world = group_size(group)
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    if dim in (0, -x.dim()):
        return out
    # Any other dim: rank r's block is out[r*n:(r+1)*n]; lay the blocks side by side along dim.
    return torch.cat(out.chunk(world, dim=0), dim=dim)


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    # [s, ...] summed over ranks -> this rank's [s/world, ...]. gloo implements it natively in
    # torch >= 2.x, so there is no all-reduce + chunk fallback here.
    world = group_size(group)
    _check_divisible(x, 0, world, "reduce-scatter")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x, group=group)
    return out


# --- autograd pairs ----------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _all_gather(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            # The consumer was TP-sharded (e.g. a column-parallel linear): each rank holds a partial
            # grad of the full sequence, so sum them and keep this rank's rows.
            return _reduce_scatter_dim0(grad, ctx.group), None, None
        # The consumer was replicated: every rank already holds the full grad.
        return _split(grad, 0, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0, ctx.group), None


# --- public API --------------------------------------------------------------------------------


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Replicated input entering a TP region: fwd identity, bwd all-reduce of the grad."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums leaving a TP region: fwd all-reduce, bwd identity."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Full ``[..., h]`` -> own ``[..., h/tp]`` chunk: fwd split last dim, bwd all-gather last dim."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Own ``[..., h/tp]`` -> full ``[..., h]``: fwd all-gather last dim, bwd keep own chunk."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Full ``[s, ...]`` -> own ``[s/tp, ...]``: fwd split dim 0, bwd all-gather dim 0."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """Own ``[s/tp, ...]`` -> full ``[s, ...]``: fwd all-gather dim 0, bwd reduce-scatter dim 0.

    ``tensor_parallel_output_grad=False`` when what consumes the output is replicated over TP (its
    grad is already complete on every rank): backward then just keeps this rank's chunk.
    """
    if group_size(group) == 1:
        return x
    return _GatherFromSP.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums ``[s, ...]`` -> own summed ``[s/tp, ...]``: fwd reduce-scatter dim 0, bwd all-gather dim 0."""
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)
