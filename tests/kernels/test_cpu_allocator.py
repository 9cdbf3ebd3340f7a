"""keep_freed_memory: a step's freed large tensors give their pages to the next step's, not faulted in again.

Each case runs in a subprocess: mallopt changes the whole process's allocator. A "step" writes
four live tensors of 8 to 96 MiB (an activation-like mix) and frees them; the measure is the
minor page faults of four steps after eight warm-up steps. glibc's default maps every one of them
afresh (200 MiB / 4 KiB = 51200 faults a step); a kept heap hands back pages already mapped. The
warm-up steps grow the heap to its steady size: small allocations landing between steps fragment
it, so for the first few steps the 96 MiB block may still find no hole and extend the heap
(measured: fresh pages in steps 2-5, never after step 5, over 20 runs).
"""

import os
import platform
import subprocess
import sys


def test_this_platform_has_glibc():
    # keep_freed_memory is a no-op off glibc (musl, macOS); the tests below need the glibc it tunes, and the
    # machines this project builds and tests on (Linux CI, GPU clusters) have it, so its absence fails here.
    assert platform.libc_ver()[0] == "glibc", platform.libc_ver()

CHILD = """
import resource, torch
from megatron_ds.cpu_allocator import keep_freed_memory
kept = keep_freed_memory()
def faults_of_a_step():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = [torch.empty(mib * 2**18).fill_(1.0) for mib in (64, 32, 96, 8)]  # fp32: 2**18 per MiB
    del live
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
for _ in range(8):
    faults_of_a_step()
print(kept, sum(faults_of_a_step() for _ in range(4)))
"""


def run_child(**env) -> tuple[bool, int]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), **env}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True, timeout=120)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


def test_kept_heap_reuses_freed_pages():
    kept, faults = run_child()
    assert kept
    assert faults < 1000  # fresh 4 KiB pages would be 4 x 51200


def test_env_default_leaves_glibc_alone():
    kept, faults = run_child(MEGATRON_DS_CPU_MALLOC="default")
    assert not kept
    assert faults >= 100  # fresh mmaps again: at least one fault per 2 MiB even with transparent huge pages
