"""What a rank saves or loads: pieces of global tensors, each placed by its global shape and offsets.

A ``ShardedTensor`` is one rectangular block ``global[offsets[0]:offsets[0]+shape[0], ...]`` of a
global (unsharded) tensor named ``key``, or a contiguous range of that block's row-major
flattening (``flat_range``: how a ZeRO-1 flat buffer slices a parameter). The same description
serves saving (``data`` holds the values) and loading (``data`` is a view to fill in place), so
any layout can read what any other wrote.

Pieces of one key never overlap on disk: a piece is written only by its ``replica_id == 0``
holder (DP rank 0 for model weights, TP rank 0 for TP-replicated ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class ShardedTensor:
    key: str
    """Global name, e.g. ``model/layers.3.attention.qkv.weight`` or ``optimizer/exp_avg/model/...``."""
    data: torch.Tensor
    """The values held: shape ``shape``, or 1-D of ``flat_range`` length."""
    global_shape: tuple[int, ...]
    """Shape of the whole (unsharded) tensor."""
    offsets: tuple[int, ...]
    """Start of this block in every dim of the global tensor."""
    shape: tuple[int, ...]
    """Extent of the block in every dim."""
    flat_range: Optional[tuple[int, int]] = None
    """``data`` is ``block.flatten()[start:stop]`` rather than the block itself."""
    replica_id: int = 0
    """0 for the one holder that writes this piece; others hold identical copies and skip it."""

    def __post_init__(self):
        self.global_shape, self.offsets, self.shape = tuple(self.global_shape), tuple(self.offsets), tuple(self.shape)
        if not (len(self.global_shape) == len(self.offsets) == len(self.shape)):
            raise ValueError(f"{self.key}: global_shape, offsets and shape need one entry per dim")
        for o, s, g in zip(self.offsets, self.shape, self.global_shape):
            if o < 0 or s < 0 or o + s > g:
                raise ValueError(f"{self.key}: block offsets {self.offsets} shape {self.shape} "
                                 f"lie outside the global shape {self.global_shape}")
        expect = self.shape if self.flat_range is None else (self.flat_range[1] - self.flat_range[0],)
        if tuple(self.data.shape) != tuple(expect):
            raise ValueError(f"{self.key}: data has shape {tuple(self.data.shape)}, the description says {expect}")

    @property
    def numel(self) -> int:
        return math.prod(self.data.shape)

    @classmethod
    def from_slices(cls, key: str, data: torch.Tensor, global_shape: Sequence[int],
                    slices: Sequence[slice | tuple[int, int]], replica_id: int = 0) -> "ShardedTensor":
        """``data == global[slices]``; one (start, stop) or slice per dim."""
        spans = [(s.start or 0, s.stop) if isinstance(s, slice) else tuple(s) for s in slices]
        return cls(key, data, tuple(global_shape), tuple(a for a, _ in spans), tuple(b - a for a, b in spans),
                   replica_id=replica_id)


def tp_sharded_tensors(key: str, data: torch.Tensor, global_shape: Sequence[int], partition_dim: Optional[int],
                       partition_sizes: Optional[Sequence[int]], tp_rank: int, tp_size: int,
                       replica_id: int = 0, row_offset: int = 0,
                       flat_range: Optional[tuple[int, int]] = None) -> list[ShardedTensor]:
    """Pieces of a weight split over TP by the ``parallel/layers.py`` rule.

    The global tensor is the parts (``partition_sizes`` along ``partition_dim``) concatenated;
    this rank's ``data`` is chunk ``tp_rank`` of every part, concatenated, so it is one block per
    part. ``partition_dim=None`` means replicated over TP (only TP rank 0 writes it).
    ``row_offset`` places the whole thing at that offset of dim 0 in a larger global tensor (the
    replicated-KV ``q`` / ``kv`` halves of the global ``qkv``). ``flat_range`` describes a 1-D
    ``data`` holding that range of this rank's flattened local tensor (ZeRO-1); it is split at
    part boundaries, which are contiguous in the flattening only for ``partition_dim == 0`` or
    a single part.
    """
    global_shape = tuple(global_shape)
    if partition_dim is None:
        # Replicated: one block, the rows [row_offset, row_offset + local rows) of the global tensor.
        shape = _local_shape(data, flat_range, global_shape, row_offset, None, None, tp_size)
        offsets = (row_offset,) + (0,) * (len(global_shape) - 1)
        return _split_flat(key, data, global_shape, [(offsets, tuple(shape))], flat_range, replica_id + tp_rank)
    if partition_sizes:
        sizes = list(partition_sizes)
    else:
        sizes = [global_shape[partition_dim] - (row_offset if partition_dim == 0 else 0)]
    if any(p % tp_size for p in sizes):
        raise ValueError(f"{key}: partition sizes {sizes} are not divisible by TP size {tp_size}")
    if len(sizes) > 1 and partition_dim != 0 and flat_range is not None:
        raise NotImplementedError(f"{key}: a flat range over several parts split along dim {partition_dim}")
    shape = _local_shape(data, flat_range, global_shape, row_offset, partition_dim, sizes, tp_size)
    blocks, start = [], 0
    for p in sizes:
        offsets = [0] * len(global_shape)
        offsets[0] = row_offset
        offsets[partition_dim] += start + tp_rank * (p // tp_size)
        block_shape = list(shape)
        block_shape[partition_dim] = p // tp_size
        blocks.append((tuple(offsets), tuple(block_shape)))
        start += p
    return _split_flat(key, data, global_shape, blocks, flat_range, replica_id, partition_dim)


def _local_shape(data, flat_range, global_shape, row_offset, partition_dim, sizes, tp_size) -> list[int]:
    if flat_range is None:
        return list(data.shape)
    shape = list(global_shape)
    shape[0] -= row_offset
    if partition_dim is not None:
        shape[partition_dim] = sum(sizes) // tp_size
    return shape


def _split_flat(key, data, global_shape, blocks, flat_range, replica_id, partition_dim=0) -> list[ShardedTensor]:
    """One ShardedTensor per block; ``data`` is the blocks concatenated along ``partition_dim``
    (or the ``flat_range`` of that concatenation's flattening)."""
    if flat_range is None:
        pieces, start = [], 0
        for offsets, shape in blocks:
            n = shape[partition_dim]
            pieces.append(ShardedTensor(key, data.narrow(partition_dim, start, n), global_shape, offsets, shape,
                                        replica_id=replica_id))
            start += n
        return pieces
    # Blocks follow each other in the flattening (dim-0 parts or a single block).
    pieces, block_start = [], 0
    lo, hi = flat_range
    for offsets, shape in blocks:
        n = math.prod(shape)
        a, b = max(lo, block_start), min(hi, block_start + n)
        if a < b:
            pieces.append(ShardedTensor(key, data[a - lo:b - lo], global_shape, offsets, shape,
                                        flat_range=(a - block_start, b - block_start), replica_id=replica_id))
        block_start += n
    return pieces
