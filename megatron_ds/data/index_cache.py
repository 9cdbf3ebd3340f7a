"""Index arrays cached as .npy files named by a hash of everything that determines them.

One process builds (rank 0 in the trainer), everyone else waits at a barrier and memory-maps the
files. The protocol needs only two things from the caller, so it works with or without
torch.distributed:

    is_builder   True on exactly one process per shared filesystem (or on every process when
                 there is no cache directory, or a single process);
    barrier      a callable every process calls once per cached set (dist.barrier), or None.

Files are written to a temporary name and renamed, so a reader never maps a half-written array.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Callable, Optional

import numpy as np

from megatron_ds.data.errors import DataError

# Bump when an algorithm changes what the arrays hold, so old caches are not reused.
# 2: GPT indices cover every sample of num_epochs (megatron-core's), keyed by num_epochs.
CACHE_FORMAT = 2


def cache_key(description: dict) -> str:
    """32 hex digits of the sha256 of the description's canonical JSON."""
    text = json.dumps({"cache_format": CACHE_FORMAT, **description}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def cached_arrays(cache_dir: Optional[str], kind: str, description: dict, names: tuple[str, ...],
                  build: Callable[[], dict], is_builder: bool = True,
                  barrier: Optional[Callable[[], None]] = None) -> dict:
    """{name: array} for names, built by build() or read (memory-mapped) from cache_dir.

    Without a cache_dir every process builds its own arrays in memory (the barrier is still
    called, so all processes make the same calls). With one, the builder writes
    ``{kind}-{hash}-{name}.npy`` plus a ``.json`` holding the description, and the others
    memory-map them after the barrier.
    """
    if cache_dir is None:
        arrays = build()
        if barrier is not None:
            barrier()
        return arrays
    key = cache_key(description)
    paths = {n: os.path.join(cache_dir, f"{kind}-{key}-{n}.npy") for n in names}
    if is_builder and not all(os.path.isfile(p) for p in paths.values()):
        arrays = build()
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tag = uuid.uuid4().hex[:8]
            with open(os.path.join(cache_dir, f"{kind}-{key}.json.{tag}.tmp"), "w") as f:
                json.dump(description, f, indent=1, sort_keys=True)
            os.replace(f.name, os.path.join(cache_dir, f"{kind}-{key}.json"))
            for n, p in paths.items():
                tmp = f"{p}.{tag}.tmp.npy"
                np.save(tmp, np.ascontiguousarray(arrays[n]), allow_pickle=False)
                os.replace(tmp, p)
        except OSError as e:
            raise DataError(f"--data-cache-path {cache_dir}: cannot write the index cache "
                            f"({e.strerror or e}); point --data-cache-path at a writable "
                            f"directory") from None
    if barrier is not None:
        barrier()
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{missing[0]}: index cache file missing after the builder's barrier; "
                        f"is --data-cache-path on a filesystem every rank shares?")
    return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}
