"""Forward/backward over the micro-batches of one global batch, pipelined or not.

The loss is the exact per-token mean over the *global* batch, whatever the split into
micro-batches, pipeline stages and data-parallel ranks:

    loss = sum over all DP ranks and micro-batches of sum(token_loss * loss_mask) / global_num_tokens

Each micro-batch back-propagates its own share (its masked sum divided by the global count), so
gradients simply add up: over micro-batches in the fp32 main-grad buffer, over DP ranks by an
all-reduce SUM. Only the last pipeline stage computes loss shares; every stage knows
``global_num_tokens`` because every stage reads the batch (the first uses the tokens, the last
the labels and loss mask).

Which schedule runs (parallel/pipeline/schedules.py) follows from the layout: no pipelining at
PP = 1, 1F1B with one model chunk per rank, interleaved 1F1B with several.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from megatron_ds.parallel.pipeline import PipelineP2P, build_schedule, run_schedule
from megatron_ds.parallel.topology import ParallelState, single_process_state


class LossFunc(Protocol):
    """What the last stage makes of the model's per-token loss. Pre-training and SFT average over
    tokens (``TokenMeanLoss``); DPO averages a per-pair loss (``megatron_ds/dpo.py``)."""

    def count(self, micro_batch: dict) -> torch.Tensor:
        """This micro-batch's share of the global denominator (tokens, or pairs), a 0-d tensor."""

    def __call__(self, token_loss: torch.Tensor, micro_batch: dict, global_count: float) -> torch.Tensor:
        """token_loss [b, s] fp32 (-log p of each label) -> the scalar loss share to back-propagate."""


class TokenMeanLoss:
    """The exact per-token mean over the global batch: each micro-batch's masked sum / global token count."""

    def count(self, micro_batch: dict) -> torch.Tensor:
        return micro_batch["loss_mask"].sum()

    def __call__(self, token_loss: torch.Tensor, micro_batch: dict, global_count: float) -> torch.Tensor:
        return (token_loss * micro_batch["loss_mask"]).sum() / global_count


TOKEN_MEAN = TokenMeanLoss()


def _activation_shape(model, micro_batch: dict) -> tuple[int, int, int]:
    """[s, b, h] between stages; [s/tp, b, h] under sequence parallelism (each TP rank's shard)."""
    b, s = micro_batch["tokens"].shape
    if model.sequence_parallel:
        s //= model.tp_size
    return (s, b, model.config.hidden_size)


def forward_backward(model_chunks: Sequence[torch.nn.Module], micro_batches: list[dict], global_num_tokens: float,
                     state: ParallelState, grad_buffers: Optional[Sequence] = None,
                     forward_only: bool = False, loss_func: LossFunc = TOKEN_MEAN) -> torch.Tensor:
    """Run this rank's schedule over ``micro_batches``; returns its summed loss shares (zero off the last stage).

    ``global_num_tokens`` is the global denominator: the sum of ``loss_func.count`` over every
    micro-batch of every DP rank.

    ``grad_buffers[c]`` (one per chunk) gets ``is_last_microbatch`` set before the chunk's last
    backward, so its DP bucket all-reduces start as that backward fills them.
    """
    chunks = list(model_chunks)
    actions = build_schedule(state.pp_size, len(chunks), len(micro_batches), state.pp_rank, forward_only)

    def forward_step(chunk: int, m: int, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        model, mb = chunks[chunk], micro_batches[m]
        # Every stage gets the positions (rotary) and document ids (attention mask, when the data has them).
        extra = {"document_ids": mb["document_ids"]} if "document_ids" in mb else {}
        out = model(input_ids=mb["tokens"] if model.pre_process else None, hidden_states=hidden,
                    position_ids=mb["position_ids"], labels=mb["labels"] if model.post_process else None, **extra)
        if not model.post_process:
            return out  # [s, b, h] ([s/tp, b, h] under SP)
        return loss_func(out, mb, global_num_tokens)  # out: per-token loss [b, s] fp32

    def before_backward(chunk: int, is_last: bool) -> None:
        if grad_buffers is not None:
            grad_buffers[chunk].is_last_microbatch = is_last

    p2p = None
    if state.pp_size > 1:
        dtype = next(chunks[0].parameters()).dtype
        p2p = PipelineP2P(state, _activation_shape(chunks[0], micro_batches[0]), dtype, state.device)
    with torch.set_grad_enabled(not forward_only):
        return run_schedule(actions, forward_step, pp_rank=state.pp_rank, pp_size=state.pp_size,
                            num_chunks=len(chunks), p2p=p2p, before_backward=before_backward)


def forward_backward_no_pipelining(model, micro_batches: list[dict], global_num_tokens: float,
                                   grad_buffer=None, forward_only: bool = False) -> torch.Tensor:
    """One whole model on one stage: gradient accumulation over the micro-batches (the PP = 1 schedule)."""
    return forward_backward([model], micro_batches, global_num_tokens, single_process_state(),
                            None if grad_buffer is None else [grad_buffer], forward_only)
