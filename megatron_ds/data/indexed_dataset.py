"""Megatron's binarized corpus: `PREFIX.bin` (tokens) + `PREFIX.idx` (where each sequence is).

Byte layout (docs/formats.md), all little-endian:
    magic b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 S sequences | u64 D = docs+1
    | int32[S] lengths | int64[S] byte offsets into .bin | int64[D] document boundaries (seq indices)
Files written by Megatron-LM, GPT-NeoX and Megatron-DeepSpeed read here unchanged, and vice versa.
"""

import os
import struct
from array import array

import numpy as np

from megatron_ds.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D -> 34 bytes

DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype Megatron uses for this vocabulary: uint16 under 65500, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


class _SpilledInt64:
    """An append-only int64 array that keeps at most `buffer` values in memory and spills the rest
    to a temporary file, so a builder's memory does not grow with the number of documents."""

    def __init__(self, path: str, buffer: int = 1 << 20):
        self.path, self.buffer = path, buffer
        self._file = open(path, "wb")
        self._pending = array("q")
        self.count = 0

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=np.int64)
        self._pending.frombytes(values.tobytes())
        self.count += len(values)
        if len(self._pending) >= self.buffer:
            self._flush()

    def append(self, value: int) -> None:
        self._pending.append(value)
        self.count += 1
        if len(self._pending) >= self.buffer:
            self._flush()

    def _flush(self) -> None:
        self._file.write(self._pending.tobytes())
        self._pending = array("q")

    def blocks(self, size: int = 1 << 20):
        """The values in order, as int64 arrays of at most `size`."""
        self._flush()
        self._file.flush()
        with open(self.path, "rb") as f:
            while True:
                raw = f.read(8 * size)
                if not raw:
                    return
                yield np.frombuffer(raw, dtype=np.int64)

    def close(self) -> None:
        self._file.close()
        if os.path.exists(self.path):
            os.remove(self.path)


class IndexedDatasetBuilder:
    """Appends documents to `bin_path`; `finalize(idx_path)` writes the index and publishes both.

    Both files are written as `*.tmp` and renamed only in finalize, .bin first and .idx last (after
    removing any old .idx), so a crash leaves at worst a .bin without .idx, which readers reject.
    Sequence lengths and document boundaries are spilled to temporary files as they come, so
    memory stays bounded whatever the corpus size.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(f"{bin_path}: dtype {self.dtype} has no Megatron code; use one of "
                            f"{', '.join(str(d) for d in DTYPE_CODES.values())}")
        self.bin_path = bin_path
        self._bin_tmp = bin_path + ".tmp"
        self._idx_tmp = None
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = _SpilledInt64(bin_path + ".lengths.tmp")
        self._doc_boundaries = _SpilledInt64(bin_path + ".docs.tmp")
        self._doc_boundaries.append(0)

    def _check_values(self, arr: np.ndarray) -> None:
        if arr.size and self.dtype.kind in "iu" and arr.dtype != self.dtype:
            info = np.iinfo(self.dtype)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise DataError(f"{self.bin_path}: token values [{lo}, {hi}] do not fit "
                                f"{self.dtype}; use a wider dtype (int32 for vocabularies "
                                f">= 65500)")

    def add_document(self, tokens) -> None:
        """Append one document as one sequence (no sentence splitting)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"{self.bin_path}: a document must be a 1-D token array, "
                            f"got shape {arr.shape}")
        self.add_documents(arr, [arr.size])

    def add_documents(self, tokens, lengths) -> None:
        """Append len(lengths) documents, one sequence each, whose tokens lie back to back in the
        1-D array `tokens` (the bulk path of tools/preprocess_data.py)."""
        arr = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if arr.ndim != 1 or int(lengths.sum()) != arr.size:
            raise DataError(f"{self.bin_path}: {arr.size} tokens do not match the document "
                            f"lengths (sum {int(lengths.sum())})")
        if len(lengths) and lengths.max() >= 2**31:
            raise DataError(f"{self.bin_path}: a document of {int(lengths.max())} tokens exceeds "
                            f"the int32 length field; split it")
        self._check_values(arr)
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        first = self._lengths.count
        self._lengths.extend(lengths)
        self._doc_boundaries.extend(np.arange(first + 1, first + len(lengths) + 1))

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (its sequences and document boundaries), streaming its
        .bin; the dtypes must match."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DataError(f"{prefix}: dtype {other.dtype} differs from {self.dtype} of the "
                            f"datasets before it; merge only datasets of one tokenizer")
        first = self._lengths.count
        self._lengths.extend(other.sequence_lengths)
        self._doc_boundaries.extend(np.asarray(other.document_indices[1:]) + first)
        needed = (int(other.sequence_pointers[-1]) + int(other.sequence_lengths[-1])
                  * other.dtype.itemsize) if len(other) else 0
        with open(bin_path(prefix), "rb") as f:
            while needed:
                block = f.read(min(needed, 64 << 20))
                self._bin.write(block)
                needed -= len(block)

    def __len__(self):
        return self._lengths.count

    @property
    def num_documents(self) -> int:
        return self._doc_boundaries.count - 1

    def finalize(self, idx_path: str) -> None:
        self._bin.close()
        num_seqs, num_bounds = self._lengths.count, self._doc_boundaries.count
        self._idx_tmp = idx_path + ".tmp"
        with open(self._idx_tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], num_seqs, num_bounds))
            for block in self._lengths.blocks():
                f.write(block.astype("<i4").tobytes())
            # Byte offsets, accumulated in int64: corpora pass 2**31 bytes early.
            offset = 0
            for block in self._lengths.blocks():
                ends = np.cumsum(block * self.dtype.itemsize) + offset
                f.write((ends - block * self.dtype.itemsize).astype("<i8").tobytes())
                offset = int(ends[-1])
            for block in self._doc_boundaries.blocks():
                f.write(block.astype("<i8").tobytes())
        self._lengths.close()
        self._doc_boundaries.close()
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, idx_path)

    def abort(self) -> None:
        """Close and delete the temporary files; nothing is published."""
        self._bin.close()
        self._lengths.close()
        self._doc_boundaries.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if path and os.path.exists(path):
                os.remove(path)


class IndexedDataset:
    """Read-only, memory-mapped view of PREFIX.bin/.idx; item i is sequence i as a numpy array."""

    def __init__(self, prefix: str):
        self.prefix = os.fspath(prefix)
        idx_file, bin_file = idx_path(self.prefix), bin_path(self.prefix)
        for path in (idx_file, bin_file):
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file; binarize the corpus with "
                                f"tools/preprocess_data.py (prefix is the path without .bin/.idx)")

        idx_size = os.path.getsize(idx_file)
        with open(idx_file, "rb") as f:
            header = f.read(HEADER.size)
        if len(header) < HEADER.size or header[:9] != MAGIC:
            raise DataError(f"{idx_file}: not a Megatron .idx file (bad magic); rebuild it with "
                            f"tools/preprocess_data.py")
        _, version, code, num_seqs, num_bounds = HEADER.unpack(header)
        if version != VERSION:
            raise DataError(f"{idx_file}: index version {version}, only version {VERSION} is "
                            f"supported")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx_file}: unknown dtype code {code} (valid: 1..8)")
        expected = HEADER.size + 12 * num_seqs + 8 * num_bounds
        if idx_size != expected:
            raise DataError(f"{idx_file}: {idx_size} bytes, header says {expected}; the file is "
                            f"truncated or corrupt, rebuild it")
        self.dtype = DTYPE_CODES[code]

        self._idx = np.memmap(idx_file, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(self._idx, dtype="<i4", count=num_seqs,
                                              offset=HEADER.size)
        self.sequence_pointers = np.frombuffer(self._idx, dtype="<i8", count=num_seqs,
                                               offset=HEADER.size + 4 * num_seqs)
        self.document_indices = np.frombuffer(self._idx, dtype="<i8", count=num_bounds,
                                              offset=HEADER.size + 12 * num_seqs)

        bin_size = os.path.getsize(bin_file)
        needed = (int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1])
                  * self.dtype.itemsize) if num_seqs else 0
        if bin_size < needed:
            raise DataError(f"{bin_file}: {bin_size} bytes but {idx_file} indexes {needed}; the "
                            f".bin is truncated or belongs to another .idx, rebuild both")
        # np.memmap refuses empty files; an empty corpus is still a valid dataset.
        if bin_size:
            self._bin = np.memmap(bin_file, dtype=np.uint8, mode="r")
        else:
            self._bin = np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, i: int, offset: int = 0, length: int = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        i = int(i) % n
        seq_len = int(self.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} "
                             f"of {self.prefix} ({seq_len} tokens)")
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(i)

    # Workers of a DataLoader get the prefix and map the files themselves, not a copy of them.
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])
