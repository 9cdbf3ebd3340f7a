"""Data-parallel gradients: fp32 main-grad buffers in buckets, all-reduced (or, under ZeRO-1,
reduce-scattered) over DP during backward.

Each parameter gets ``param.main_grad``, a view into one contiguous fp32 buffer. A hook run after
autograd has written ``param.grad`` for a micro-batch adds it into ``main_grad`` and frees
``param.grad``, so gradients accumulate across micro-batches in fp32 whatever the parameter dtype
(bf16 params: bf16 grads, fp32 accumulation).

The buffer is cut into buckets of about ``bucket_size`` elements, in reverse parameter order (the
order backward produces them). On the last micro-batch a bucket's collective starts as soon as
every parameter in it has its gradient, so communication overlaps the rest of the backward.

Two contracts, chosen by ``distributed``:

- all-reduce (plain DP): after ``finish_grad_sync`` every rank holds the full SUM over DP in
  ``buffer``.
- reduce-scatter (ZeRO-1): every bucket is padded to a multiple of DP and split into DP equal
  chunks; rank r owns chunk r of every bucket. After ``finish_grad_sync`` ``shard_grad`` (a
  contiguous fp32 tensor of ``buffer.numel() / dp`` elements: rank r's chunks, bucket after bucket)
  holds the SUM over DP of those chunks; the rest of ``buffer`` is this rank's own partial grads.
  ``shard_ranges`` says which buffer slices the shard is made of. After the optimizer has updated
  its chunks of the params (laid out like this buffer), ``start_param_gather`` / ``wait_param_gather``
  all-gather them back bucket by bucket.

The loss each rank back-propagates is already divided by the token count of the *global* batch
(see training/schedules.py), so the DP reduction is a plain SUM, not an average.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ds.parallel.topology import group_rank, group_size

# torch >= 2.10 names these *_single; the *_tensor names are deprecated aliases.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter], data: torch.Tensor, start: int):
        self.params = params
        self.data = data  # (numel,) fp32 view of the grad buffer, padded to a multiple of DP under ZeRO-1
        self.start = start  # offset of data in the buffer
        self.shard = None  # ZeRO-1: this rank's (numel / dp,) view of shard_grad
        self.pending = set(id(p) for p in params)
        self.handle = None  # the gradient reduce-scatter / all-reduce in flight
        self.gather = None  # ZeRO-1: (handle, input) of the parameter all-gather in flight

    def reset(self) -> None:
        self.pending = set(id(p) for p in self.params)
        self.handle = None


class GradBuffer:
    """Contract (all-reduce): every rank holds full fp32 grads of its own params; after
    ``finish_grad_sync`` each holds the SUM over its data-parallel group. Contract (``distributed``,
    ZeRO-1): after ``finish_grad_sync`` ``shard_grad`` holds the DP SUM of this rank's chunk of every
    bucket (async reduce-scatter per bucket)."""

    def __init__(self, params: list[torch.nn.Parameter], dp_group, bucket_size: int = 25_000_000, overlap: bool = True,
                 distributed: bool = False):
        params = [p for p in params if p.requires_grad]
        device = params[0].device if params else torch.device("cpu")
        self.dp_group = dp_group
        self.dp_size, self.dp_rank = group_size(dp_group), group_rank(dp_group)
        self.distributed = distributed
        self.overlap = overlap and self.dp_size > 1
        # Lay params out in reverse so the first bucket is the first one backward completes.
        # Under ZeRO-1 each bucket is padded to a multiple of DP so it splits into equal chunks.
        pad = self.dp_size if distributed else 1
        layout, bucket_spans = [], []
        offset, start, current = 0, 0, []
        for p in reversed(params):
            layout.append((p, offset))
            offset += p.numel()
            current.append(p)
            if offset - start >= bucket_size:
                offset = -(-offset // pad) * pad
                bucket_spans.append((current, start, offset))
                current, start = [], offset
        if current:
            offset = -(-offset // pad) * pad
            bucket_spans.append((current, start, offset))
        self.params = [p for p, _ in layout]
        """Params in buffer order (reverse of the order given)."""
        self.param_offsets = {id(p): off for p, off in layout}
        """id(param) -> offset of its first element in ``buffer``."""
        self.numel = offset
        self.buffer = torch.zeros(offset, dtype=torch.float32, device=device)
        for p, off in layout:
            p.main_grad = self.buffer[off: off + p.numel()].view(p.shape)
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        for ps, s, e in bucket_spans:
            bucket = _Bucket(ps, self.buffer[s:e], s)
            self.buckets.append(bucket)
            for p in ps:
                self._bucket_of[id(p)] = bucket
        self.shard_grad = None
        self.shard_ranges: list[tuple[int, int, int]] = []
        """ZeRO-1: (buffer offset, shard offset, length) of each chunk this rank owns, bucket order."""
        if distributed:
            if self.dp_size == 1:
                self.shard_grad = self.buffer  # one rank owns everything: no copy, no collective
            else:
                self.shard_grad = torch.zeros(offset // self.dp_size, dtype=torch.float32, device=device)
            shard_off = 0
            for b in self.buckets:
                chunk = b.data.numel() // self.dp_size
                b.shard = self.shard_grad[shard_off: shard_off + chunk]
                self.shard_ranges.append((b.start + self.dp_rank * chunk, shard_off, chunk))
                shard_off += chunk
        self.is_last_microbatch = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate) for p in params]

    def _start(self, bucket: _Bucket) -> None:
        if self.distributed:
            bucket.handle = _reduce_scatter(bucket.shard, bucket.data, group=self.dp_group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(bucket.data, group=self.dp_group, async_op=True)

    def _accumulate(self, param: torch.nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        if self.overlap and self.is_last_microbatch:
            bucket = self._bucket_of[id(param)]
            bucket.pending.discard(id(param))
            if not bucket.pending and bucket.handle is None:
                self._start(bucket)

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for b in self.buckets:
            b.reset()
        self.is_last_microbatch = False

    def finish_grad_sync(self) -> None:
        """Wait for the bucket collectives; start those whose params got no gradient this step."""
        if self.dp_size == 1:
            return
        for b in self.buckets:
            if b.handle is None:
                self._start(b)
        for b in self.buckets:
            b.handle.wait()

    def start_param_gather(self, param_buffer: torch.Tensor) -> None:
        """ZeRO-1: every rank has written its own chunks of ``param_buffer`` (same layout as the grad
        buffer, any dtype); start gathering the other ranks' chunks, one async all-gather per bucket.

        They are issued in the order the next forward reads them: the buffer is in reverse parameter
        order, so the last bucket holds the first layers. ``wait_param_gather`` completes them; until
        then the params of a bucket in flight must not be read or written.
        """
        if self.dp_size == 1:
            return
        for b, (buf_off, _, chunk) in reversed(list(zip(self.buckets, self.shard_ranges))):
            assert b.gather is None, "a parameter all-gather was started twice"
            out = param_buffer[b.start: b.start + b.data.numel()]
            # A copy as input: gloo does not promise that an input aliasing the output is safe. It
            # is kept with the handle, alive until the wait.
            mine = param_buffer[buf_off: buf_off + chunk].clone()
            b.gather = (_all_gather(out, mine, group=self.dp_group, async_op=True), mine)

    def wait_param_gather(self, buckets: list[_Bucket] | None = None) -> None:
        """Wait for the parameter all-gathers of ``buckets`` (default: all) that are still in flight."""
        for b in self.buckets if buckets is None else buckets:
            if b.gather is not None:
                b.gather[0].wait()
                b.gather = None

    def bucket_of(self, param: torch.nn.Parameter) -> _Bucket:
        return self._bucket_of[id(param)]
