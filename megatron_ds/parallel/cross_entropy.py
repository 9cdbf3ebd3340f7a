"""Cross-entropy over vocab-parallel logits, without ever gathering the full vocabulary.

With logits z split over TP along the vocab (rank r holds columns [r*V/tp, (r+1)*V/tp)):

    loss = log(sum_j exp(z_j - m)) - (z_target - m),      m = max_j z_j

Each rank computes its partial max, sum-exp and (if it owns the target) target logit, and the
three are completed by TP all-reduces (max, then one sum for sum-exp and target logit together).
Backward needs only the local softmax: dloss/dz_j = softmax_j - [j == target].

Two implementations with one contract:
- ``vocab_parallel_cross_entropy``: pure PyTorch, keeps an fp32 softmax [..., V/tp] for backward
  (the reference, and what ``--no-fused-kernels`` uses);
- ``kernels.cross_entropy.fused_vocab_parallel_cross_entropy``: the csrc/ kernels, which build on
  this module's argument checks and shard arithmetic. Forward reads the logits once (bf16 or fp32,
  fp32 math on the fly) for the local max, sum-exp and target logit; Python all-reduces between
  the passes; backward writes the gradient OVER the logits, in their dtype. Nothing logits-sized
  is allocated, so the logits must not be used by anything else after that call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ds.parallel.topology import group_rank, group_size


def check_args(logits: torch.Tensor, target: torch.Tensor, tp_group, vocab_size: int | None) -> None:
    v_padded = logits.shape[-1] * group_size(tp_group)
    if vocab_size is not None and not 0 < vocab_size <= v_padded:
        raise ValueError(f"vocab_size {vocab_size} must be in (0, {v_padded}] "
                         f"(the padded vocabulary: {logits.shape[-1]} columns x tp {group_size(tp_group)})")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}[:-1]")


def vocab_shard(logits: torch.Tensor, tp_group, vocab_size: int | None) -> tuple[int, int, int]:
    """(V/tp, first global column of this rank, columns of this rank that are real vocabulary)."""
    v_local = logits.shape[-1]
    start = group_rank(tp_group) * v_local
    n_valid = v_local if vocab_size is None else max(0, min(v_local, vocab_size - start))
    return v_local, start, n_valid


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, vocab_size):
        # logits [..., V/tp] (fp32 or bf16), target [...] int64 global ids.
        tp = group_size(tp_group)
        v_local, start, n_valid = vocab_shard(logits, tp_group, vocab_size)

        # [..., V/tp] fp32 (float64 stays float64, for gradcheck); becomes the softmax in place, saved for backward
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if z is logits:
            z = z.clone()  # fp32 input: do not overwrite the caller's logits
        if n_valid < v_local:
            # Padding columns (global index >= vocab_size) are -inf: exp gives 0, so they add nothing
            # to the sum and get a zero gradient, whatever the LM head wrote there.
            z[..., n_valid:] = float("-inf")

        z_max = z.amax(dim=-1)  # [...]
        if tp > 1:
            dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=tp_group)
        z.sub_(z_max.unsqueeze(-1))

        not_mine = (target < start) | (target >= start + v_local)  # [...]
        local_target = (target - start).masked_fill(not_mine, 0)
        target_logit = z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(not_mine, 0.0)

        z.exp_()
        sum_exp = z.sum(dim=-1)  # [...]
        if tp > 1:
            # Both are sums over the vocab shards: one all-reduce of [2, ...] instead of two calls.
            both = torch.stack([sum_exp, target_logit])
            dist.all_reduce(both, group=tp_group)
            sum_exp, target_logit = both[0], both[1]

        loss = torch.log(sum_exp) - target_logit  # [...] fp32
        z.div_(sum_exp.unsqueeze(-1))  # softmax [..., V/tp]

        ctx.save_for_backward(z, local_target, not_mine)
        ctx.logits_dtype = logits.dtype
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("vocab_parallel_cross_entropy: backward ran twice (retain_graph); "
                               "its saved softmax is consumed in place by the first backward")
        ctx.used = True
        softmax, local_target, not_mine = ctx.saved_tensors
        grad = softmax  # reuse the fp32 buffer: [..., V/tp]
        # d loss / d z_j = softmax_j - 1[j == target], the one-hot only on the rank that owns the target.
        grad.scatter_add_(-1, local_target.unsqueeze(-1), (not_mine.to(grad.dtype) - 1.0).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token loss ``[...]`` fp32 from vocab-parallel ``logits [..., V/tp]`` and global ``target [...]``.

    Math is fp32 whatever the logits' dtype; the gradient returns in the logits' dtype.
    ``vocab_size`` is the true (unpadded) vocabulary: columns at global index >= vocab_size are
    excluded from the softmax and get zero gradient. ``target`` must lie in ``[0, vocab_size)``.
    """
    check_args(logits, target, tp_group, vocab_size)
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_size)


def cross_entropy_reference(full_logits: torch.Tensor, target: torch.Tensor,
                            vocab_size: int | None = None) -> torch.Tensor:
    """Unsharded reference: ``F.cross_entropy`` in fp32 on the first ``vocab_size`` columns, per token."""
    if vocab_size is not None:
        full_logits = full_logits[..., :vocab_size]
    v = full_logits.shape[-1]
    full_logits = full_logits.to(torch.promote_types(full_logits.dtype, torch.float32))  # fp32 (float64 stays)
    loss = F.cross_entropy(full_logits.reshape(-1, v), target.reshape(-1), reduction="none")
    return loss.view(target.shape)
