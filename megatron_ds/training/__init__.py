"""The training loop: micro-batches, forward/backward schedule, optimizer step, eval, logging."""
