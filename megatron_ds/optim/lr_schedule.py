"""Learning-rate schedules: linear warmup, then constant, cosine, warmup-stable-decay (WSD), or
DeepSeek's multi-step decay; measured in optimizer steps or in training tokens.

The paper's multi-step schedule holds the peak LR after warmup, drops to 31.6% of it after 80% of
training and to 10% after 90%. Unlike cosine, its first phase does not depend on the total length:
a run whose token budget is extended (``extend``) has the same LR at every step of that phase, so
a checkpoint taken in it continues into the longer run unchanged.

Positions: step ``i`` (0-based) is the (i+1)-th update; in token units it starts after
``i * tokens_per_step`` tokens. Warmup counts the update itself (step i uses lr * (i+1) / warmup),
so the first update is not taken at LR 0; the decay phases look at the work done *before* the
update (``step >= 0.8 * decay_iters`` drops the LR), so "after 80% of training" is literal.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

STYLES = ("multistep", "cosine", "constant", "wsd")


@dataclass
class LRSchedule:
    """LR as a function of the optimizer step (0-based: step 0 is the first update).

    With ``tokens_per_step`` set, ``warmup_iters``, ``decay_iters`` and ``wsd_decay_iters`` are read
    as token counts instead of steps (``from_config`` does this for --lr-*-tokens).
    """

    lr: float
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of cosine and of the WSD decay."""
    warmup_iters: float = 0
    """Length of the linear warmup (steps, or tokens with tokens_per_step)."""
    decay_iters: float = 1
    """Length of the whole schedule (steps, or tokens), usually --train-iters."""
    style: str = "multistep"
    """'multistep', 'cosine', 'constant' or 'wsd' (warmup-stable-decay)."""
    milestones: tuple[float, ...] = (0.8, 0.9)
    """Multi-step: fractions of decay_iters from which each factor applies."""
    factors: tuple[float, ...] = (0.316, 0.1)
    """Multi-step: LR multiplier (of the peak) from each milestone on."""
    wsd_decay_iters: float = 0
    """WSD: length of the final decay (steps, or tokens); the LR is at its peak before it."""
    wsd_decay_style: str = "linear"
    """WSD: shape of the final decay to min_lr: 'linear', 'cosine' or '1-sqrt'."""
    tokens_per_step: Optional[float] = None
    """When set, the lengths above are in tokens and step i starts at i * tokens_per_step."""

    def __post_init__(self):
        self.milestones, self.factors = tuple(self.milestones), tuple(self.factors)
        if self.style not in STYLES:
            raise ValueError(f"--lr-decay-style {self.style!r}: choose {', '.join(STYLES)}")
        if self.style == "multistep":
            if len(self.milestones) != len(self.factors):
                raise ValueError(f"--lr-decay-milestones {self.milestones} and --lr-decay-factors {self.factors} "
                                 "must have the same length")
            if list(self.milestones) != sorted(self.milestones) or any(not 0 <= m <= 1 for m in self.milestones):
                raise ValueError(f"--lr-decay-milestones {self.milestones}: increasing fractions in [0, 1]")
        if self.wsd_decay_style not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(f"--lr-wsd-decay-style {self.wsd_decay_style!r}: choose linear, cosine or 1-sqrt")
        if self.style == "wsd" and not 0 < self.wsd_decay_iters <= self.decay_iters - self.warmup_iters:
            raise ValueError(f"--lr-wsd-decay-iters {self.wsd_decay_iters} must be > 0 and fit after the warmup "
                             f"in the {self.decay_iters} of the schedule")

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, t) -> "LRSchedule":
        """From a TrainingConfig: steps by default, tokens when --lr-decay-tokens is given."""
        kwargs = dict(lr=t.lr, min_lr=t.min_lr, style=t.lr_decay_style,
                      milestones=parse_floats(t.lr_decay_milestones), factors=parse_floats(t.lr_decay_factors),
                      wsd_decay_style=t.lr_wsd_decay_style)
        if t.lr_decay_tokens:
            return cls(warmup_iters=t.lr_warmup_tokens or 0, decay_iters=t.lr_decay_tokens,
                       wsd_decay_iters=t.lr_wsd_decay_tokens or 0,
                       tokens_per_step=t.global_batch_size * t.seq_length, **kwargs)
        return cls(warmup_iters=t.lr_warmup_iters, decay_iters=t.lr_decay_iters or t.train_iters,
                   wsd_decay_iters=t.lr_wsd_decay_iters or 0, **kwargs)

    def extend(self, decay_iters: float) -> "LRSchedule":
        """The same schedule over a longer budget. For multi-step, every step before the first
        milestone of the *shorter* schedule has the same LR in both, so that phase is reused."""
        if decay_iters < self.decay_iters:
            raise ValueError(f"extend: {decay_iters} is shorter than the current {self.decay_iters}")
        return dataclasses.replace(self, decay_iters=decay_iters)

    def first_phase_end(self) -> float:
        """Multi-step: the step (or token count) where the first drop happens; what ``extend`` reuses."""
        return self.milestones[0] * self.decay_iters if self.milestones else self.decay_iters

    # -- evaluation ---------------------------------------------------------------------------

    def __call__(self, step: int) -> float:
        if self.tokens_per_step is None:
            return self.at(step, 1)
        return self.at(step * self.tokens_per_step, self.tokens_per_step)

    def at(self, position: float, increment: float = 1) -> float:
        """LR for the update that starts after ``position`` units of work and does ``increment``."""
        if self.warmup_iters > 0 and position < self.warmup_iters:
            return self.lr * min(1.0, (position + increment) / self.warmup_iters)
        if self.style == "constant":
            return self.lr
        if self.style == "multistep":
            factor = 1.0
            for milestone, f in zip(self.milestones, self.factors):
                if position >= milestone * self.decay_iters:
                    factor = f
            return self.lr * factor
        if self.style == "cosine":
            span = max(1, self.decay_iters - self.warmup_iters)
            progress = min(1.0, (position - self.warmup_iters) / span)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        # wsd: peak until the last wsd_decay_iters, then down to min_lr
        decay_start = self.decay_iters - self.wsd_decay_iters
        if position < decay_start:
            return self.lr
        progress = min(1.0, (position - decay_start) / self.wsd_decay_iters)
        if self.wsd_decay_style == "linear":
            shape = 1.0 - progress
        elif self.wsd_decay_style == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:  # 1-sqrt (Hägele et al. 2024)
            shape = 1.0 - math.sqrt(progress)
        return self.min_lr + (self.lr - self.min_lr) * shape


def parse_floats(text) -> tuple[float, ...]:
    """'0.8,0.9' -> (0.8, 0.9); a tuple passes through."""
    if isinstance(text, (tuple, list)):
        return tuple(float(x) for x in text)
    return tuple(float(x) for x in str(text).split(",") if x.strip())
