"""The work of tools/preprocess_data.py (and the block plumbing of tools/preprocess_sft.py), in
pieces a worker process can import.

The main process only does I/O: it reads each input file as raw bytes in blocks of whole lines
(gunzipping on the fly), hands each block to a worker, and appends the workers' token arrays to
the builders in input order. A worker decodes, parses and tokenizes one block and returns one
flat token array plus the document lengths per JSON key, so what crosses processes is a few
large buffers, not millions of small Python objects.
"""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import sys
import time
from dataclasses import dataclass, field

import numpy as np

BLOCK_BYTES = 1 << 20  # about 1 MB of text per job: large enough to amortize the IPC
BLOCKS_IN_FLIGHT_PER_WORKER = 4  # enough to keep workers busy; bounds memory at ~8 MB a worker


class InputError(Exception):
    """A file-level problem (unreadable, corrupt gzip); the message is one user-facing line."""


@dataclass
class EncodedBlock:
    """What a worker returns for one block of lines."""

    tokens: dict  # key -> 1-D array of the block's tokens, in the output dtype
    lengths: dict  # key -> int64 array, one length per document
    empty: int = 0  # documents with no tokens (dropped; there is no --append-eod)
    bad: list = field(default_factory=list)  # "file:line: reason" for each skipped line
    num_bytes: int = 0  # uncompressed bytes of the block


class BlockEncoder:
    """Tokenizes blocks of jsonl lines; one per process."""

    user_errors = (InputError,)

    def __init__(self, tokenizer_path: str, json_keys, append_eod: bool, dtype, skip_bad_lines: bool):
        # One core per worker: --workers N then means N cores, and the scaling is ours to measure.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from megatron_ds.data.tokenizer import build_tokenizer

        self.tokenizer = build_tokenizer(tokenizer_path)
        self.json_keys = list(json_keys)
        self.eod = [self.tokenizer.eod] if append_eod else []
        self.dtype = np.dtype(dtype)
        self.skip_bad_lines = skip_bad_lines

    def _record(self, path, line_no, raw: bytes):
        """The texts of one line, or a reason string when it is unusable."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return (f"{path}:{line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}); re-encode the file as UTF-8")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno}); fix or remove the line"
        texts = []
        for key in self.json_keys:
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, str):
                return (f"{path}:{line_no}: no string field {key!r}; pick the field with "
                        f"--json-keys")
            texts.append(value)
        return texts

    def encode(self, path: str, first_line_no: int, block: bytes) -> EncodedBlock:
        """Raises InputError on the first bad line unless skip_bad_lines, then records it."""
        lines = block.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()  # the block ends with a newline
        out = EncodedBlock({}, {}, num_bytes=len(block))
        texts = {key: [] for key in self.json_keys}
        for line_no, raw in enumerate(lines, start=first_line_no):
            if not raw.strip():
                continue  # blank lines, typically a trailing one, are not documents
            record = self._record(path, line_no, raw)
            if isinstance(record, str):
                if not self.skip_bad_lines:
                    raise InputError(record + " (or pass --skip-bad-lines)")
                out.bad.append(record)
                continue
            for key, text in zip(self.json_keys, record):
                texts[key].append(text)
        for key in self.json_keys:
            encoded = [ids + self.eod for ids in self.tokenizer.encode_batch(texts[key])]
            lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
            out.empty += int((lengths == 0).sum())
            flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64,
                               count=int(lengths.sum()))
            if flat.size and (flat.max() > np.iinfo(self.dtype).max):
                raise InputError(f"{path}: token id {int(flat.max())} does not fit {self.dtype}")
            out.tokens[key] = flat.astype(self.dtype)
            out.lengths[key] = lengths[lengths > 0]
        return out


_encoder = None  # this worker process's encoder (a BlockEncoder, or the SFT tool's)


def init_worker(encoder_cls, *args) -> None:
    global _encoder
    _encoder = encoder_cls(*args)


def encode_in_worker(path, first_line_no, block):
    """Pool entry point: (encoded block, None) or (None, the error's line); never raises a user
    error (the encoder's ``user_errors``) across the pool, so the main process raises it in order."""
    try:
        return _encoder.encode(path, first_line_no, block), None
    except _encoder.user_errors as e:
        return None, str(e)


def read_blocks(path: str, block_bytes: int = BLOCK_BYTES):
    """(first line number, bytes of whole lines, compressed bytes read so far) of one file, lazily.

    The third value is the position in the file on disk (for .gz, in the compressed stream), which
    is what the ETA is measured against.
    """
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror})") from None
    with raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
        line_no = 1
        try:
            while True:
                lines = stream.readlines(block_bytes)
                if not lines:
                    return
                block = b"".join(lines)
                if not block.endswith(b"\n"):
                    block += b"\n"
                yield line_no, block, raw.tell()
                line_no += len(lines)
        except (OSError, EOFError, gzip.BadGzipFile) as e:  # corrupt or truncated .gz
            raise InputError(f"{path}: unreadable after line {line_no - 1} "
                             f"({type(e).__name__}: {e}); inputs must be jsonl, optionally gzipped") from None


def map_blocks(files, encoder_cls, encoder_args, workers: int, block_bytes: int = BLOCK_BYTES):
    """(encoded block, disk bytes done) for every block of ``files``, in corpus order:
    ``encoder_cls(*encoder_args).encode(path, first line number, block)``. The first error line an
    encoder reports (its ``user_errors``) is raised here as InputError, in corpus order.

    With ``workers`` > 1 the encoding runs in that many spawned processes, one encoder each; at
    most ``workers * BLOCKS_IN_FLIGHT_PER_WORKER`` blocks are in flight, so memory does not grow
    with the corpus. With 1, everything runs here.
    """
    done_before = 0  # disk bytes of the files already finished

    def jobs():
        nonlocal done_before
        for path in files:
            for first, block, pos in read_blocks(path, block_bytes):
                yield (path, first, block), done_before + pos
            done_before += os.path.getsize(path)

    def checked(result):
        encoded, error = result
        if error:
            raise InputError(error)
        return encoded

    init_args = (encoder_cls, *encoder_args)
    if workers <= 1:
        init_worker(*init_args)
        for job, disk in jobs():
            yield checked(encode_in_worker(*job)), disk
        return

    def take(window):
        future, disk = window.popleft()
        try:
            return checked(future.result()), disk
        except BrokenProcessPool as e:  # a worker died (killed, out of memory) or its setup failed
            raise InputError(f"a --workers process exited unexpectedly ({e}); rerun with --workers 1 to see "
                             "where it fails") from None

    # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (or fails its setup) ends
    # the run with an error instead of leaving its result waited for forever. Submissions are
    # windowed by hand (map() would read the whole corpus ahead).
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),  # no fork of
                                   initializer=init_worker, initargs=init_args)  # a process with tokenizer threads
    window = collections.deque()
    try:
        for job, disk in jobs():
            window.append((executor.submit(encode_in_worker, *job), disk))
            if len(window) >= workers * BLOCKS_IN_FLIGHT_PER_WORKER:
                yield take(window)
        while window:
            yield take(window)
    finally:
        # After an error (or the caller stopping early) the blocks not started are dropped and the
        # running ones, at most one per worker, finish before the workers exit.
        executor.shutdown(wait=True, cancel_futures=True)


class SkippedLines:
    """The list of skipped input lines, ``path`` (``{prefix}_bad_lines.txt`` and the like), written as
    lines are skipped but published only with the outputs: ``publish`` after they are complete (a
    run that skipped nothing removes a previous run's list, which would describe other outputs),
    ``abort`` when the run fails (no list is left without its outputs)."""

    def __init__(self, path: str):
        self.path, self._tmp, self._file = path, path + ".tmp", None

    def write(self, line: str) -> None:
        if self._file is None:
            self._file = open(self._tmp, "w", encoding="utf-8")
        self._file.write(line + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            os.remove(self._tmp)
            self._file = None

    def publish(self) -> None:
        if self._file is not None:
            self._file.close()
            os.replace(self._tmp, self.path)
            self._file = None
        elif os.path.exists(self.path):
            os.remove(self.path)


class Progress:
    """One status line on stderr: documents/s, MB/s (uncompressed input) and an ETA from the
    on-disk bytes read. On a terminal it redraws in place every `interval` seconds; in a log
    file it prints a new line only every `interval` seconds (30 by default)."""

    def __init__(self, total_disk_bytes: int, interval: float = None, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 30.0)
        self.total = max(total_disk_bytes, 1)
        self.start = self._last = time.monotonic()
        self.docs = self.bytes = self.disk_done = 0

    def update(self, docs: int, num_bytes: int, disk_done: int) -> None:
        self.docs += docs
        self.bytes += num_bytes
        self.disk_done = disk_done
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(now, end="\r" if self.tty else "\n")

    def _print(self, now, end):
        elapsed = max(now - self.start, 1e-9)
        frac = min(self.disk_done / self.total, 1.0)
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        self.stream.write(f"{100 * frac:5.1f}% | {self.docs} docs | {self.docs / elapsed:,.0f} docs/s | "
                          f"{self.bytes / elapsed / 1e6:.1f} MB/s | ETA {_hms(eta)}{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._print(time.monotonic(), end="\n")


def _hms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
