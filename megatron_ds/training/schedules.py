"""Forward/backward over the micro-batches of one global batch (no pipelining).

The loss is the exact per-token mean over the *global* batch, whatever the split into
micro-batches and data-parallel ranks:

    loss = sum over all ranks and micro-batches of sum(token_loss * loss_mask) / global_num_tokens

Each micro-batch back-propagates its own share (its masked sum divided by the global count), so
gradients simply add up: over micro-batches in the fp32 main-grad buffer, over DP ranks by an
all-reduce SUM.
"""

from __future__ import annotations

import torch


def forward_backward_no_pipelining(model, micro_batches: list[dict], global_num_tokens: float,
                                   grad_buffer=None, forward_only: bool = False) -> torch.Tensor:
    """Run every micro-batch forward (and backward); returns this rank's share of the loss (scalar)."""
    total = torch.zeros((), dtype=torch.float32)
    for i, mb in enumerate(micro_batches):
        if grad_buffer is not None:
            # The last micro-batch's backward launches the DP bucket all-reduces as buckets fill.
            grad_buffer.is_last_microbatch = i == len(micro_batches) - 1
        with torch.set_grad_enabled(not forward_only):
            token_loss = model(input_ids=mb["tokens"], position_ids=mb["position_ids"], labels=mb["labels"])  # (b, s) fp32
            loss = (token_loss * mb["loss_mask"]).sum() / global_num_tokens
        if not forward_only:
            loss.backward()
        total += loss.detach().float().cpu()
    return total
