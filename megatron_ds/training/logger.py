"""Run logs: one line to stdout every --log-interval steps, and TensorBoard scalars, from one rank."""

from __future__ import annotations

import sys
import time


# How each logged quantity reads best; others get 4 decimals.
_FORMATS = {"lr": "{:.3e}", "grad norm": "{:.3f}", "tokens/s": "{:.0f}"}


class RunLogger:
    """Prints and writes scalars only where ``enabled`` (one rank); elsewhere every call is a no-op."""

    def __init__(self, enabled: bool, tensorboard_dir: str | None, total_iters: int):
        self.enabled = enabled
        self.total_iters = total_iters
        self.start = time.time()
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: costs ~1 s

            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def step(self, iteration: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        parts = [f"iter {iteration:>6d}/{self.total_iters}"]
        for k, v in scalars.items():
            parts.append(f"{k} {_FORMATS.get(k, '{:.4f}').format(v)}")
        parts.append(f"elapsed {elapsed:.1f}s")
        print(" | ".join(parts), flush=True)
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k.replace(" ", "-"), v, iteration)
            self.writer.add_scalar("elapsed-s", elapsed, iteration)

    def scalar(self, name: str, value: float, iteration: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        sys.stdout.flush()
