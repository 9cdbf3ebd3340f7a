"""Reading a sharded checkpoint at any layout: each request is a block of a global tensor, filled
from exactly the stored pieces that overlap it, read as slices of memory-mapped safetensors files.

    reader = CheckpointReader("ckpt/")          # ckpt/latest, or a checkpoint directory itself
    reader.read_into(piece)                     # piece: a ShardedTensor whose data is filled in place
    full = reader.read("model/final_norm.weight")

Every file is checked against its recorded size and sha256 the first time this process opens it
(``verify=False`` skips the hash: one sequential read per file). A request that the stored pieces
do not cover entirely, a global shape that differs, a missing or damaged file: each raises a
CheckpointError naming the file, before anything is copied into the request.
"""

from __future__ import annotations

import io
import math
import os
from typing import Optional, Sequence

import torch
from safetensors import safe_open

from megatron_ds.checkpoint.format import COMMON, METADATA, CheckpointError, rank_file, read_metadata, resolve
from megatron_ds.checkpoint.safetensors_io import file_sha256
from megatron_ds.checkpoint.sharded_tensor import ShardedTensor


class CheckpointReader:
    def __init__(self, path: str, verify: bool = True):
        self.dir = resolve(path)
        self.meta = read_metadata(self.dir)
        self.verify = verify
        self._open: dict[str, object] = {}
        self._checked: set[str] = set()
        for key in ("tensors", "files"):
            if not isinstance(self.meta.get(key), dict):
                raise CheckpointError(f"{self._meta_path}: no '{key}' table; the checkpoint is damaged")

    def __repr__(self) -> str:
        return self.dir

    # --- what the metadata says ---------------------------------------------------------------

    @property
    def _meta_path(self) -> str:
        return os.path.join(self.dir, METADATA)

    @property
    def iteration(self) -> int:
        return self.meta["iteration"]

    @property
    def consumed_samples(self) -> int:
        return self.meta.get("consumed_samples", 0)

    @property
    def config(self) -> Optional[dict]:
        return self.meta.get("config")

    @property
    def model_config(self) -> Optional[dict]:
        """The ModelConfig fields: ``config["model"]`` of a full Config, or ``config`` itself."""
        cfg = self.config or {}
        return cfg.get("model", cfg if "num_layers" in cfg else None)

    @property
    def tokenizer(self) -> Optional[dict]:
        return self.meta.get("tokenizer")

    def keys(self) -> list[str]:
        return list(self.meta["tensors"])

    def global_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)["global_shape"])

    def dtype(self, key: str) -> torch.dtype:
        from megatron_ds.checkpoint.safetensors_io import DTYPES_BY_NAME

        return DTYPES_BY_NAME[self._entry(key)["dtype"]]

    def _entry(self, key: str) -> dict:
        entry = self.meta["tensors"].get(key)
        if entry is None:
            raise CheckpointError(f"{self._meta_path}: no tensor {key!r} in this checkpoint; was it saved from "
                                  "another model (or without this state)?")
        return entry

    # --- files --------------------------------------------------------------------------------

    def _check_file(self, fname: str) -> str:
        path = os.path.join(self.dir, fname)
        if fname in self._checked:
            return path
        info = self.meta["files"].get(fname)
        if info is None:
            raise CheckpointError(f"{path}: not listed in {METADATA}; the checkpoint is damaged")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard file missing (listed in {METADATA}); the checkpoint was "
                                  "deleted or copied partially")
        size = os.path.getsize(path)
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, {METADATA} records {info['bytes']}; the file is "
                                  "truncated or corrupted")
        if self.verify and file_sha256(path) != info["sha256"]:
            raise CheckpointError(f"{path}: sha256 checksum mismatch; the file is corrupted")
        self._checked.add(fname)
        return path

    def _handle(self, fname: str):
        if fname not in self._open:
            path = self._check_file(fname)
            try:
                self._open[fname] = safe_open(path, framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        return self._open[fname]

    def _load_pickle(self, fname: str):
        path = self._check_file(fname)
        with open(path, "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)

    def common_state(self):
        """What rank 0 passed as ``common_state`` (LR schedule ...), or None."""
        return self._load_pickle(COMMON) if COMMON in self.meta["files"] else None

    def rank_state(self, rank: int, layout: Optional[dict] = None):
        """What ``rank`` passed as ``rank_state`` (RNG), or None: absent, or saved under another
        ``layout`` (per-rank states do not carry over to another layout)."""
        if layout is not None and self.meta.get("layout") != layout:
            return None
        fname = rank_file(rank, "pt")
        return self._load_pickle(fname) if fname in self.meta["files"] else None

    # --- tensors ------------------------------------------------------------------------------

    def read(self, key: str, offsets: Optional[Sequence[int]] = None, shape: Optional[Sequence[int]] = None,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The block ``[offsets, offsets + shape)`` of global tensor ``key`` (default: all of it)."""
        gshape = self.global_shape(key)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(gshape)
        shape = tuple(shape) if shape is not None else gshape
        out = torch.empty(shape, dtype=dtype or self.dtype(key))
        self.read_into(ShardedTensor(key, out, gshape, offsets, shape))
        return out

    def read_into(self, piece: ShardedTensor) -> None:
        """Fill ``piece.data`` (its block, or the flat range of it) from the checkpoint."""
        entry = self._entry(piece.key)
        if tuple(entry["global_shape"]) != piece.global_shape:
            raise CheckpointError(f"{self._meta_path}: {piece.key} has shape {tuple(entry['global_shape'])} in the "
                                  f"checkpoint, {piece.global_shape} in this model; it was saved from another "
                                  "model shape (check --num-layers, --hidden-size, heads, --vocab-size)")
        if piece.flat_range is None:
            self._fill_block(piece.key, entry, piece.offsets, piece.shape, piece.data)
            return
        # Flat range of a block: read the rows of dim 0 that contain it, then cut the range.
        lo, hi = piece.flat_range
        row = math.prod(piece.shape[1:]) if len(piece.shape) > 1 else 1
        r0, r1 = lo // row, -(-hi // row)
        sub_offsets = (piece.offsets[0] + r0,) + piece.offsets[1:]
        sub_shape = (r1 - r0,) + piece.shape[1:]
        buf = torch.empty(sub_shape, dtype=piece.data.dtype)
        self._fill_block(piece.key, entry, sub_offsets, sub_shape, buf)
        piece.data.copy_(buf.reshape(-1)[lo - r0 * row:hi - r0 * row])

    def _fill_block(self, key: str, entry: dict, offsets, shape, dest: torch.Tensor) -> None:
        want = math.prod(shape)
        # Plan first, so a request that cannot be met fails before any copy (no partial loads).
        plan = []
        covered = 0
        for p in entry["pieces"]:
            p_lo, p_hi = list(p["offsets"]), [o + n for o, n in zip(p["offsets"], p["shape"])]
            if p["flat_range"] is not None:
                # Only the block rows (dim 0) that the flat range touches can hold its elements.
                row = math.prod(p["shape"][1:])
                p_lo[0] = p["offsets"][0] + p["flat_range"][0] // row
                p_hi[0] = p["offsets"][0] + -(-p["flat_range"][1] // row)
            lo = [max(a, b) for a, b in zip(offsets, p_lo)]
            hi = [min(a + s, b) for a, s, b in zip(offsets, shape, p_hi)]
            if any(l >= h for l, h in zip(lo, hi)):
                continue
            if p["flat_range"] is None:
                plan.append((p, lo, hi, None))
                covered += math.prod(h - l for l, h in zip(lo, hi))
            else:
                mask = self._flat_mask(p, lo, hi)
                n = int(mask.sum())
                if n:
                    plan.append((p, lo, hi, mask))
                    covered += n
        if covered != want:
            files = sorted({p["file"] for p in entry["pieces"]})
            raise CheckpointError(f"{self._meta_path}: the stored pieces of {key} cover {covered} of the {want} "
                                  f"elements requested (files {', '.join(files)}); a shard is missing")
        for fname in sorted({p["file"] for p, _, _, _ in plan}):
            self._handle(fname)  # checks (size, checksum) every file involved before copying anything
        for p, lo, hi, mask in plan:
            f = self._handle(p["file"])
            dst = dest[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))]
            if p["flat_range"] is None:
                src = f.get_slice(p["name"])[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, p["offsets"]))]
                dst.copy_(src)
            else:
                self._copy_flat(f, p, lo, hi, mask, dst)

    @staticmethod
    def _flat_index(p: dict, lo, hi) -> torch.Tensor:
        """Row-major indices, in the stored block, of the intersection [lo, hi)."""
        strides = [math.prod(p["shape"][d + 1:]) for d in range(len(p["shape"]))]
        idx = torch.zeros((), dtype=torch.int64)
        for d, (l, h) in enumerate(zip(lo, hi)):
            r = torch.arange(l - p["offsets"][d], h - p["offsets"][d], dtype=torch.int64) * strides[d]
            idx = idx.unsqueeze(-1) + r
        return idx

    def _flat_mask(self, p: dict, lo, hi) -> torch.Tensor:
        idx = self._flat_index(p, lo, hi)
        a, b = p["flat_range"]
        return (idx >= a) & (idx < b)

    def _copy_flat(self, f, p: dict, lo, hi, mask: torch.Tensor, dst: torch.Tensor) -> None:
        a = p["flat_range"][0]
        sel = self._flat_index(p, lo, hi)[mask]
        first, last = int(sel.min()), int(sel.max()) + 1
        src = f.get_slice(p["name"])[first - a:last - a]
        dst[mask.to(dst.device)] = src[sel - first].to(dst.device, dst.dtype)
