"""Data-parallel gradients: fp32 main-grad buffers in buckets, all-reduced over DP during backward.

Each parameter gets ``param.main_grad``, a view into one contiguous fp32 buffer. A hook run after
autograd has written ``param.grad`` for a micro-batch adds it into ``main_grad`` and frees
``param.grad``, so gradients accumulate across micro-batches in fp32 whatever the parameter dtype.

The buffer is cut into buckets of about ``bucket_size`` elements, in reverse parameter order (the
order backward produces them). On the last micro-batch a bucket's all-reduce starts as soon as
every parameter in it has its gradient, so communication overlaps the rest of the backward.

The loss each rank back-propagates is already divided by the token count of the *global* batch
(see training/schedules.py), so the DP reduction is a plain SUM, not an average.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ds.parallel.topology import group_size


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter], data: torch.Tensor):
        self.params = params
        self.data = data  # (numel,) fp32 view of the grad buffer
        self.pending = set(id(p) for p in params)
        self.handle = None

    def reset(self) -> None:
        self.pending = set(id(p) for p in self.params)
        self.handle = None


class GradBuffer:
    """Contract: every rank holds full fp32 grads of its own params; after ``finish_grad_sync`` each
    holds the SUM over its data-parallel group (async all-reduce per bucket)."""

    def __init__(self, params: list[torch.nn.Parameter], dp_group, bucket_size: int = 25_000_000, overlap: bool = True):
        params = [p for p in params if p.requires_grad]
        device = params[0].device if params else torch.device("cpu")
        self.dp_group = dp_group
        self.overlap = overlap and group_size(dp_group) > 1
        total = sum(p.numel() for p in params)
        self.buffer = torch.zeros(total, dtype=torch.float32, device=device)
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        # Lay params out in reverse so the first bucket is the first one backward completes.
        offset, start, current = 0, 0, []
        for p in reversed(params):
            p.main_grad = self.buffer[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
            current.append(p)
            if offset - start >= bucket_size:
                self._add_bucket(current, start, offset)
                current, start = [], offset
        if current:
            self._add_bucket(current, start, offset)
        self.is_last_microbatch = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate) for p in params]

    def _add_bucket(self, params, start, end) -> None:
        bucket = _Bucket(params, self.buffer[start:end])
        self.buckets.append(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket

    def _accumulate(self, param: torch.nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        if self.overlap and self.is_last_microbatch:
            bucket = self._bucket_of[id(param)]
            bucket.pending.discard(id(param))
            if not bucket.pending and bucket.handle is None:
                bucket.handle = dist.all_reduce(bucket.data, group=self.dp_group, async_op=True)

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for b in self.buckets:
            b.reset()
        self.is_last_microbatch = False

    def finish_grad_sync(self) -> None:
        """Wait for the bucket all-reduces; start those whose params got no gradient this step."""
        if group_size(self.dp_group) == 1:
            return
        for b in self.buckets:
            if b.handle is None:
                b.handle = dist.all_reduce(b.data, group=self.dp_group, async_op=True)
        for b in self.buckets:
            b.handle.wait()
