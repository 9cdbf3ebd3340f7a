"""Streaming safetensors writer: header first, then each tensor's bytes as it comes.

The header (names, dtypes, shapes, byte offsets) is known before any data, so a file can be
written one tensor at a time: the offline tools never hold more than one tensor, and the async
writer hashes bytes as they go out instead of reading the file back. Plain ``file.write`` of a
memoryview releases the GIL, so a writer thread does not stall the training loop.

Files are read back with ``safetensors.safe_open`` (memory-mapped; ``get_slice`` reads a slice).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Optional, Sequence

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
_CHUNK = 64 << 20  # bytes per write call: bounds the temporary byte view and keeps hashing streamed


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return DTYPE_NAMES[dtype]


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SafetensorsWriter:
    """``w = SafetensorsWriter(path, [(name, dtype, shape), ...]); w.write(name, t) ...; info = w.close()``.

    Tensors must be written in the order given. ``close`` fsyncs and returns
    ``{"bytes": size, "sha256": hex}`` of the whole file.
    """

    def __init__(self, path: str, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = path
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._order = []
        for name, dtype, shape in specs:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._order.append((name, dtype, tuple(shape), n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")
        self._next = 0
        self._emit(struct.pack("<Q", len(raw)) + raw)

    def _emit(self, buf) -> None:
        self._hash.update(buf)
        self._file.write(buf)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape, n = self._order[self._next]
        if name != want:
            raise RuntimeError(f"{self.path}: expected tensor {want!r} next, got {name!r}")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{self.path}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                               f"the header says {dtype} {shape}")
        self._next += 1
        if n == 0:
            return
        flat = tensor.detach().reshape(-1)
        if flat.device.type != "cpu":
            flat = flat.cpu()
        flat = flat.contiguous().view(torch.uint8)  # raw little-endian bytes, any dtype
        for start in range(0, n, _CHUNK):
            self._emit(memoryview(flat[start:start + _CHUNK].numpy()))

    def close(self) -> dict:
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        return {"bytes": size, "sha256": self._hash.hexdigest()}


def write_file_atomic_bytes(path: str, payload: bytes) -> dict:
    """Write ``payload`` to ``path`` and fsync it; returns its size and sha256."""
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                return h.hexdigest()
            h.update(buf)
