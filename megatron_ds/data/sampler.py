"""Which sample ids each data-parallel rank reads, Megatron's way, plus batch collation.

Step k covers the micro_batch_size * dp_size consecutive ids starting at
consumed_samples + k * micro_batch_size * dp_size; rank r takes ids [r * mbs, (r + 1) * mbs) of it.
The order is a pure function of consumed_samples, so resuming from a checkpoint replays nothing and
skips nothing (the GPTDataset already shuffles, so ids here are sequential).
"""

import numpy as np


class MegatronPretrainingSampler:
    """Yields lists of micro_batch_size sample ids for one data-parallel rank."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        if total_samples < 1:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} outside [0, {total_samples}]; "
                             f"the checkpoint is from a longer run, raise --train-samples")
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size {micro_batch_size}: must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} outside "
                             f"[0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last

    @property
    def _step_size(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self._step_size)
        # A ragged last step gives this rank a batch only if its slice is non-empty.
        last = (not self.drop_last) and rest > self.data_parallel_rank * self.micro_batch_size
        return full + int(last)

    def __iter__(self):
        step = self._step_size
        lo = self.data_parallel_rank * self.micro_batch_size
        hi = lo + self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples, step):
            ids = list(range(start, min(start + step, self.total_samples)))
            if len(ids) < step:
                if self.drop_last or len(ids) <= lo:
                    return
            yield ids[lo:hi]


def collate(samples: list[dict]) -> dict:
    """Stack a list of GPTDataset items into a dict of (batch, seq_length) torch tensors."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    import torch  # here, not at the top: preprocessing workers import this package without torch
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}
