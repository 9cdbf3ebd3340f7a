"""The on-disk layout of a sharded checkpoint (see docs/checkpoint_format.md) and its bookkeeping.

    ROOT/latest                          "iter_0000200": the newest complete checkpoint
    ROOT/iter_0000200/metadata.json      format version, iteration, config, every tensor's pieces, file checksums
    ROOT/iter_0000200/rank_00003.safetensors   the pieces global rank 3 owns (absent if none)
    ROOT/iter_0000200/rank_00003.pt      rank 3's own state (RNG), torch.save of tensors and plain types
    ROOT/iter_0000200/rank_00003.json    rank 3's part of the index: its completion marker
    ROOT/iter_0000200/common.pt          state shared by all ranks (LR schedule ...), written by rank 0
    ROOT/iter_0000200.tmp/               a save in progress; never read, removed by the next save

A directory is complete once it carries its final name: it is renamed from ``.tmp`` after every
file in it is fsynced, and ``latest`` is replaced (tmp file + rename) only after that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

from megatron_ds.checkpoint.safetensors_io import fsync_dir

FORMAT_VERSION = 1
LATEST = "latest"
METADATA = "metadata.json"
COMMON = "common.pt"
TMP_SUFFIX = ".tmp"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or loaded; the message names the file and what to do."""


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_file(rank: int, ext: str) -> str:
    return f"rank_{rank:05d}.{ext}"


def write_latest(root: str, name: str) -> None:
    """Point ``ROOT/latest`` at ``name`` atomically: a reader sees the old name or the new one."""
    tmp = os.path.join(root, LATEST + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))
    fsync_dir(root)


def latest_iteration(root: str) -> Optional[int]:
    """The iteration ``ROOT/latest`` names, or None (no pointer, or not an ``iter_N`` name)."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        m = _ITER_RE.match(f.read().strip())
    return int(m.group(1)) if m else None


def existing_checkpoint(root: str) -> Optional[str]:
    """What says ``root`` already holds a checkpoint (for a message), or None: it is a checkpoint
    directory itself, has a ``latest`` pointer, or holds a complete ``iter_N``."""
    if os.path.isfile(os.path.join(root, METADATA)):
        return f"it is a checkpoint directory ({METADATA})"
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            return f"'{LATEST}' names {f.read().strip()}"
    ckpts = complete_checkpoints(root)
    return os.path.basename(ckpts[-1][1]) if ckpts else None


def resolve(path: str) -> str:
    """The checkpoint directory to read: ``path`` itself if it holds metadata.json, else ``path/<latest>``."""
    if os.path.isfile(os.path.join(path, METADATA)):
        return path
    pointer = os.path.join(path, LATEST)
    if not os.path.isfile(pointer):
        raise CheckpointError(f"{path}: no checkpoint there (neither {METADATA} nor a '{LATEST}' pointer); "
                              "point --load at a directory written by --save")
    with open(pointer) as f:
        name = f.read().strip()
    ckpt = os.path.join(path, name)
    if not os.path.isfile(os.path.join(ckpt, METADATA)):
        raise CheckpointError(f"{pointer} names {name!r}, but {os.path.join(ckpt, METADATA)} does not exist; "
                              "the checkpoint was removed or the directory was copied partially")
    return ckpt


def read_metadata(ckpt: str) -> dict:
    path = os.path.join(ckpt, METADATA)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); the checkpoint is damaged") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} is not one this code reads ({FORMAT_VERSION}); "
                              "convert it with the release that wrote it, or update megatron_ds")
    return meta


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(iteration, directory) of every complete checkpoint under root, oldest first."""
    out = []
    if not os.path.isdir(root):
        return out
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, METADATA)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def remove_stale_tmp(root: str, keep: Optional[str] = None) -> list[str]:
    """Delete the leftovers of interrupted saves (``*.tmp`` dirs and files); returns what was removed."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.endswith(TMP_SUFFIX) and path != keep:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
    return removed


def prune(root: str, keep_last_n: int) -> list[str]:
    """Delete complete checkpoints but the newest ``keep_last_n`` and the one ``latest`` names."""
    if keep_last_n is None or keep_last_n <= 0:
        return []
    latest = None
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            latest = os.path.join(root, f.read().strip())
    ckpts = complete_checkpoints(root)
    removed = []
    for _, path in ckpts[:-keep_last_n]:
        if path != latest:
            # Rename first so that a crash mid-delete leaves a .tmp the next save cleans, not a broken iter_N.
            doomed = path + ".deleting" + TMP_SUFFIX
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(path)
    return removed
