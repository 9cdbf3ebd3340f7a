"""Choosing the next token from the logits: greedy, temperature, top-k, top-p (nucleus).

Every TP rank holds the same gathered logits and a ``torch.Generator`` seeded alike, and draws
on the CPU, so every rank picks the same token without a broadcast (the pipeline's last stage
still broadcasts it to the other stages, which have no logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How a token is picked; the defaults are greedy decoding."""

    temperature: float = 0.0
    """0 picks the most likely token (greedy); otherwise the logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 keeps all."""
    top_p: float = 1.0
    """Sample among the smallest set of most likely tokens whose probability adds up to >= top_p; 1 keeps all."""
    seed: int = 1234
    """Seed of the sampling generator (the same on every rank, so TP ranks pick the same token)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k}: must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p {self.top_p}: must lie in (0, 1] (1 keeps every token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[b, V] -> the same with every token below the k-th largest logit set to -inf (ties at the k-th stay)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """[b, V] -> the same with -inf outside the nucleus: the smallest set of most likely tokens whose
    probabilities add up to >= p (a token stays iff the tokens ranked above it hold < p)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # [b, V] probability of the strictly higher-ranked tokens
    drop_sorted = mass_above >= p  # the most likely token has mass_above 0 < p: always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[b, V] fp32 logits -> the tempered, top-k and top-p filtered logits a non-greedy draw samples from
    (HF's order: temperature, then top-k, then top-p on the tempered distribution)."""
    logits = logits.float() / params.temperature
    return top_p_filter(top_k_filter(logits, params.top_k), params.top_p)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """[b, V] logits (real vocabulary only) -> next token ids [b] (long, on the logits' device)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, params).softmax(dim=-1)
    # Drawn on the CPU generator: the same stream on every rank and every device type.
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
