"""Saving a sharded checkpoint: every rank writes what it owns, atomically, optionally in the background.

    writer = AsyncCheckpointWriter()            # once; None for synchronous saves
    save_checkpoint(root, iteration, tensors, consumed_samples=..., config=cfg, writer=writer, ...)
    ...
    writer.wait()                               # before exit: the last save is on disk

``save_checkpoint`` is collective (every rank calls it at the same step boundary). Its
synchronous part waits for this rank's previous save, removes stale ``.tmp`` dirs (rank 0),
copies the tensors to CPU and serializes the small states; the writing happens after it returns
when a writer is given. There are no collectives in the background: each rank writes its files
and then its ``rank_N.json`` marker into ``iter_N.tmp``; rank 0's writer waits for all markers
(the checkpoint directory is on a filesystem every rank shares), writes metadata.json, renames
the directory and moves ``latest``.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import json
import os
import shutil
import threading
import time
import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_ds.checkpoint.format import (
    COMMON, FORMAT_VERSION, METADATA, TMP_SUFFIX, CheckpointError, iter_dir_name, latest_iteration, prune,
    rank_file, remove_stale_tmp, write_latest,
)
from megatron_ds.checkpoint.safetensors_io import SafetensorsWriter, dtype_name, fsync_dir, write_file_atomic_bytes
from megatron_ds.checkpoint.sharded_tensor import ShardedTensor

# Test hook: called with a file's path after each file of a save is written (tests inject a crash here).
after_file_written: Optional[Callable[[str], None]] = None


def _file_done(path: str) -> None:
    if after_file_written is not None:
        after_file_written(path)


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _to_jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return obj


def _serialize(obj) -> Optional[bytes]:
    if obj is None:
        return None
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def piece_name(piece: ShardedTensor) -> str:
    """Name inside the safetensors file: the key and where the block sits, readable by eye."""
    name = f"{piece.key}[{','.join(map(str, piece.offsets))}]"
    if piece.flat_range is not None:
        name += f"{{{piece.flat_range[0]}:{piece.flat_range[1]}}}"
    return name


def snapshot(tensors: Sequence[ShardedTensor], buffers: Optional[dict] = None) -> list[ShardedTensor]:
    """CPU copies of the pieces this rank writes (replica 0), taken now: training may go on after.

    ``buffers`` (the async writer's, free once its previous save is done) are reused when the
    same piece comes again: fresh pages cost more than the copy itself.
    """
    out, on_cuda = [], False
    for t in tensors:
        if t.replica_id != 0:
            continue
        slot = (t.key, t.offsets, t.flat_range)
        cpu = buffers.get(slot) if buffers is not None else None
        cuda = t.data.device.type == "cuda"
        if cpu is None or cpu.shape != t.data.shape or cpu.dtype != t.data.dtype:
            # Pinned host memory lets the device copies run asynchronously; worth it only when reused.
            pin = cuda and buffers is not None
            cpu = torch.empty(tuple(t.data.shape), dtype=t.data.dtype, device="cpu", pin_memory=pin)
            if buffers is not None:
                buffers[slot] = cpu
        cpu.copy_(t.data.detach(), non_blocking=cuda and cpu.is_pinned())
        on_cuda |= cuda
        out.append(dataclasses.replace(t, data=cpu))
    if on_cuda:
        torch.cuda.synchronize()  # every device-to-host copy has landed before the writer reads
    return out


@dataclasses.dataclass
class _Job:
    root: str
    tmp: str
    final: str
    rank: int
    world_size: int
    pieces: list[ShardedTensor]
    rank_state: Optional[bytes]
    common_state: Optional[bytes]
    metadata: dict
    keep_last_n: Optional[int]
    timeout_s: float
    fetch: Optional[Callable[[ShardedTensor], torch.Tensor]] = None
    """Offline tools: produce each piece's data when it is written (pieces hold meta tensors)."""
    keep_newer_latest: bool = False
    """Offline tools: leave ``latest`` alone when it names a newer iteration than this one (an older
    checkpoint written into a run's directory must not become what the next --load resumes)."""

    def run(self) -> None:
        index = self._write_rank_files()
        if self.rank == 0:
            self._finalize(index)

    def _write_rank_files(self) -> dict:
        files, entries = {}, []
        if self.pieces:
            fname = rank_file(self.rank, "safetensors")
            names = [piece_name(p) for p in self.pieces]
            if len(set(names)) != len(names):
                raise CheckpointError(f"rank {self.rank}: two pieces describe the same block of one tensor")
            writer = SafetensorsWriter(os.path.join(self.tmp, fname),
                                       [(n, p.data.dtype, tuple(p.data.shape)) for n, p in zip(names, self.pieces)])
            for name, p in zip(names, self.pieces):
                writer.write(name, self.fetch(p) if self.fetch is not None else p.data)
                entries.append({"key": p.key, "file": fname, "name": name, "dtype": dtype_name(p.data.dtype),
                                "global_shape": list(p.global_shape), "offsets": list(p.offsets),
                                "shape": list(p.shape),
                                "flat_range": list(p.flat_range) if p.flat_range is not None else None})
            files[fname] = writer.close()
            _file_done(os.path.join(self.tmp, fname))
        for fname, payload in ((rank_file(self.rank, "pt"), self.rank_state),
                               (COMMON if self.rank == 0 else None, self.common_state)):
            if fname is not None and payload is not None:
                files[fname] = write_file_atomic_bytes(os.path.join(self.tmp, fname), payload)
                _file_done(os.path.join(self.tmp, fname))
        index = {"rank": self.rank, "files": files, "pieces": entries}
        # The marker is the last file a rank writes; tmp+rename so that it is never seen half-written.
        marker = os.path.join(self.tmp, rank_file(self.rank, "json"))
        write_file_atomic_bytes(marker + ".part", json.dumps(index).encode())
        os.replace(marker + ".part", marker)
        _file_done(marker)
        return index

    def _wait_for_markers(self) -> list[dict]:
        deadline = time.monotonic() + self.timeout_s
        markers = [os.path.join(self.tmp, rank_file(r, "json")) for r in range(self.world_size)]
        while True:
            missing = [m for m in markers if not os.path.isfile(m)]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(f"{self.tmp}: {len(missing)} ranks did not finish writing within "
                                      f"{self.timeout_s:.0f}s (first missing: {missing[0]}); the save is abandoned")
            time.sleep(0.01)
        indices = []
        for m in markers:
            with open(m) as f:
                indices.append(json.load(f))
        return indices

    def _finalize(self, own_index: dict) -> None:
        indices = self._wait_for_markers()
        tensors: dict[str, dict] = {}
        files: dict[str, dict] = {}
        for index in indices:
            files.update(index["files"])
            for e in index["pieces"]:
                entry = tensors.setdefault(e["key"], {"global_shape": e["global_shape"], "dtype": e["dtype"],
                                                      "pieces": []})
                if entry["global_shape"] != e["global_shape"]:
                    raise CheckpointError(f"{self.tmp}: ranks disagree on the global shape of {e['key']}: "
                                          f"{entry['global_shape']} vs {e['global_shape']}")
                entry["pieces"].append({k: e[k] for k in ("file", "name", "offsets", "shape", "flat_range", "dtype")})
        meta = dict(self.metadata, tensors=dict(sorted(tensors.items())), files=dict(sorted(files.items())))
        write_file_atomic_bytes(os.path.join(self.tmp, METADATA), json.dumps(meta, indent=1).encode())
        _file_done(os.path.join(self.tmp, METADATA))
        fsync_dir(self.tmp)
        if os.path.exists(self.final):
            # A checkpoint of this iteration from before a restart: the new one replaces it.
            old = self.final + ".old" + TMP_SUFFIX
            os.replace(self.final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(self.tmp, self.final)
        fsync_dir(self.root)
        _file_done(self.final)
        newer = latest_iteration(self.root)
        if not (self.keep_newer_latest and newer is not None and newer > self.metadata["iteration"]):
            write_latest(self.root, os.path.basename(self.final))
        prune(self.root, self.keep_last_n)


def _finish_at_exit(ref) -> None:
    writer = ref()
    if writer is not None and writer._thread is not None:
        writer._thread.join()


class AsyncCheckpointWriter:
    """One background thread that writes a save while training goes on; one save at a time.

    ``submit`` waits for the previous save first; ``wait`` blocks until the current one is on disk
    (and, on rank 0, committed) and re-raises any error it hit, as a CheckpointError.
    """

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self.buffers: dict = {}
        """CPU snapshot tensors, reused by the next save once this one is written."""
        self._error: Optional[BaseException] = None
        self._what = ""
        # The thread is a daemon (a hung filesystem must not hang exit forever), so an exit right
        # after a final asynchronous save would drop it: finish it first. A weak reference, so
        # that the registration does not keep the writer and its buffers alive.
        atexit.register(_finish_at_exit, weakref.ref(self))

    def submit(self, fn: Callable[[], None], what: str = "checkpoint") -> None:
        self.wait()

        def target():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = e

        self._what = what
        self._thread = threading.Thread(target=target, name="megatron-ds-checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"asynchronous save of {self._what} failed: {type(err).__name__}: {err}") from err


def save_checkpoint(root: str, iteration: int, tensors: Sequence[ShardedTensor], *,
                    consumed_samples: int = 0, config=None, tokenizer: Optional[dict] = None,
                    common_state=None, rank_state=None, layout: Optional[dict] = None,
                    keep_last_n: Optional[int] = None, writer: Optional[AsyncCheckpointWriter] = None,
                    rank: Optional[int] = None, world_size: Optional[int] = None,
                    extra_metadata: Optional[dict] = None, timeout_s: float = 3600.0) -> str:
    """Save ``tensors`` (this rank's pieces; only replica-0 pieces are written) as ``root/iter_N``.

    Collective over the default process group. ``config`` (a dataclass or JSON-able dict),
    ``tokenizer`` (e.g. ``{"path": ..., "sha256_16": ...}``), ``layout`` (e.g. ``{"tp": 2, "pp": 2,
    "dp": 2}``) and ``extra_metadata`` go into metadata.json; ``common_state`` (rank 0's: LR
    schedule, ...) and ``rank_state`` (every rank's own: RNG states) are any objects
    ``torch.load(weights_only=True)`` can read back, serialized now. Returns the final directory
    (which exists once the save is done: after ``writer.wait()`` when asynchronous).
    """
    d_rank, d_world = _dist_rank_world()
    rank = d_rank if rank is None else rank
    world_size = d_world if world_size is None else world_size
    final = os.path.join(root, iter_dir_name(iteration))
    tmp = final + TMP_SUFFIX
    if writer is not None:
        writer.wait()  # this rank's previous save; rank 0's includes its commit
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        remove_stale_tmp(root)
        os.makedirs(tmp)
    _barrier()  # nobody writes into tmp before rank 0 has cleaned and created it

    metadata = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "config": _to_jsonable(config),
        "tokenizer": tokenizer,
        "layout": layout,
        "world_size": world_size,
        "saved_at_unix": time.time(),
        **(extra_metadata or {}),
    }
    pieces = snapshot(tensors, writer.buffers if writer is not None else None)
    job = _Job(root=root, tmp=tmp, final=final, rank=rank, world_size=world_size, pieces=pieces,
               rank_state=_serialize(rank_state), common_state=_serialize(common_state) if rank == 0 else None,
               metadata=metadata, keep_last_n=keep_last_n, timeout_s=timeout_s)
    if writer is None:
        job.run()
        _barrier()  # every rank returns once the checkpoint is committed
    else:
        writer.submit(job.run, what=final)
    return final
