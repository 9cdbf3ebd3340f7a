"""Learning-rate schedules: linear warmup, then DeepSeek's multi-step decay, cosine, or constant.

The paper's multi-step schedule holds the peak LR after warmup, drops to 31.6% of it after 80%
of training and to 10% after 90%. Unlike cosine, its first phase does not depend on the total
length, so a run whose token budget is extended can reuse it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    """LR as a function of the optimizer step (0-based: step 0 is the first update)."""

    lr: float
    """Peak learning rate."""
    min_lr: float
    """Cosine floor."""
    warmup_iters: int
    """Steps of linear warmup: step i uses lr * (i + 1) / warmup_iters."""
    decay_iters: int
    """Length of the schedule in steps (usually --train-iters)."""
    style: str = "multistep"
    """'multistep', 'cosine' or 'constant'."""
    milestones: tuple[float, ...] = (0.8, 0.9)
    """Multi-step: fractions of decay_iters at which the LR drops."""
    factors: tuple[float, ...] = (0.316, 0.1)
    """Multi-step: LR multiplier (of the peak) from each milestone on."""

    def __call__(self, step: int) -> float:
        if self.warmup_iters > 0 and step < self.warmup_iters:
            return self.lr * (step + 1) / self.warmup_iters
        if self.style == "constant":
            return self.lr
        if self.style == "multistep":
            factor = 1.0
            for milestone, f in zip(self.milestones, self.factors):
                if step >= milestone * self.decay_iters:
                    factor = f
            return self.lr * factor
        if self.style == "cosine":
            span = max(1, self.decay_iters - self.warmup_iters)
            progress = min(1.0, (step - self.warmup_iters) / span)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        raise ValueError(f"--lr-decay-style {self.style!r}: choose multistep, cosine or constant")
