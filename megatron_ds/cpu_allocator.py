"""Keep freed CPU memory for reuse, so a training step stops paying page faults for its activations.

PyTorch's CPU allocator is glibc malloc. glibc serves every block above its mmap threshold (at
most 32 MiB) with a fresh mmap and unmaps it on free, so each step's activations, gradients and
kernel outputs - tensors of tens to hundreds of MiB - arrive as untouched pages and the first
write to each 4 KiB page is a page fault that zeroes it. Measured on the 2-core development
machine: one bf16 step of a 7B-shaped layer at 1024 tokens takes ~220k minor faults, and writing
a fresh 180 MiB tensor costs ~7x writing the same bytes into reused memory (275 vs 39 ms).

``keep_freed_memory()`` tells glibc to serve large blocks from its heap too (M_MMAP_MAX = 0) and
never to return freed heap to the OS (M_TRIM_THRESHOLD = -1, mallopt(3)): after a warm-up step
or two the same sizes are handed back from memory that is already mapped, and a step takes almost
no faults (measured: 0 instead of ~250k, the step ~6% faster on an idle machine, more under load).
It is what a CUDA caching allocator does for GPU memory. The cost: the process holds its peak
heap between steps, and freed blocks that do not coalesce make that heap somewhat larger than
glibc's peak (that 1024-token step: peak resident 2.76 GB instead of 2.53, 2.76 GB held between
steps instead of 1.6-1.8). MEGATRON_DS_CPU_MALLOC=default leaves glibc
as is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"


def keep_freed_memory() -> bool:
    """Serve large CPU allocations from glibc's heap and keep freed memory mapped; True if applied.

    No effect (False) where the C library is not glibc or MEGATRON_DS_CPU_MALLOC=default. Call it
    before the first step: blocks mapped before it stay mmapped until freed.
    """
    if os.environ.get("MEGATRON_DS_CPU_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
