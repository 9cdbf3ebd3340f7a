"""Random-token samples, deterministic in (seed, sample id): for benchmarks and parity tests.

The tokens follow a simple learnable rule (each sequence counts upward from a random start,
modulo the vocabulary) so that a short run shows the loss falling, not only noise.
"""

from __future__ import annotations

import numpy as np


class MockGPTDataset:
    """Same item layout as GPTDataset: tokens, labels, loss_mask, position_ids of seq_length."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        rng = np.random.default_rng([self.seed, int(idx)])
        start = rng.integers(0, self.vocab_size)
        step = rng.integers(1, 4)
        x = (start + step * np.arange(self.seq_length + 1)) % self.vocab_size
        noise = rng.random(self.seq_length + 1) < 0.1  # 10% random tokens keep it from being trivial
        x[noise] = rng.integers(0, self.vocab_size, noise.sum())
        x = x.astype(np.int64)
        return {
            "tokens": x[:-1],
            "labels": x[1:],
            "loss_mask": np.ones(self.seq_length, dtype=np.float32),
            "position_ids": np.arange(self.seq_length, dtype=np.int64),
        }
