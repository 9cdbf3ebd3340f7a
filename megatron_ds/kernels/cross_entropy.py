"""The vocab-parallel cross-entropy by the csrc/ kernels: the fused member of ``Kernels.cross_entropy``.

Same contract as ``parallel.cross_entropy.vocab_parallel_cross_entropy`` (the reference), whose
argument checks and vocab-shard arithmetic it shares. Two passes over the logits, with the TP
all-reduces of the max and the sum-exp in Python between them:

    forward   ce_fwd_stats: per row the local max, sum-exp and target logit, reading bf16 or fp32
              logits with fp32 math; completed over TP into lse = log sum_j exp(z_j)
    backward  ce_bwd_: logits <- (exp(z - lse) - onehot(target)) * grad_loss, in place, in the
              logits' dtype

No logits-sized buffer is ever allocated (the fp32 softmax of the reference is the largest tensor
of a training step at a 102400 vocabulary), so the logits are consumed: after backward they hold
their own gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ds.kernels import fused
from megatron_ds.parallel.cross_entropy import check_args, vocab_shard
from megatron_ds.parallel.topology import group_size


class _FusedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, vocab_size):
        tp = group_size(tp_group)
        v_local, start, n_valid = vocab_shard(logits, tp_group, vocab_size)
        # target's column on this rank, -1 where another rank owns it: [...] int64
        local_target = target - start
        local_target = local_target.masked_fill((local_target < 0) | (local_target >= v_local), -1)

        # Local pass: per row max m_r, sum_j exp(z_j - m_r), z_target (0 when not ours); fp32 [N].
        local_max, sum_exp, target_logit = fused.ops().ce_fwd_stats(logits, local_target, n_valid)
        z_max = local_max
        if tp > 1:
            z_max = local_max.clone()
            dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=tp_group)
            # Move each rank's sum to the common max before summing: sum_j exp(z_j - M).
            sum_exp = sum_exp * torch.exp(local_max - z_max)
            both = torch.stack([sum_exp, target_logit])
            dist.all_reduce(both, group=tp_group)
            sum_exp, target_logit = both[0], both[1]
        lse = z_max + torch.log(sum_exp)  # [N] fp32: log sum_j exp(z_j) over the whole vocabulary
        loss = (lse - target_logit).view(target.shape)

        ctx.save_for_backward(logits, lse, local_target)
        ctx.n_valid = n_valid
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("fused_vocab_parallel_cross_entropy: backward ran twice (retain_graph); "
                               "the first backward overwrote the logits with their gradient")
        ctx.used = True
        logits, lse, local_target = ctx.saved_tensors
        # Pass 2, in place: logits <- (exp(z - lse) - onehot) * grad_loss, in the logits' dtype.
        fused.ops().ce_bwd_(logits, lse, local_target, grad_loss.contiguous(), ctx.n_valid)
        return logits, None, None, None


def fused_vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group,
                                       vocab_size: int | None = None) -> torch.Tensor:
    """``vocab_parallel_cross_entropy`` by the csrc/ kernels, the gradient written over ``logits``.

    Same arguments and result. ``logits`` is consumed: after backward it holds d loss / d logits,
    so nothing else may need its values (the LM head's output is used only here). Its vocab dim
    must be contiguous and its rows flattenable to ``[-1, V/tp]``.
    """
    check_args(logits, target, tp_group, vocab_size)
    return _FusedVocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_size)
