"""One gloo world per size, shared by every multi-rank test of a pytest session.

Spawning processes and importing torch costs seconds per rank; a test suite that spawned a world
per case would spend most of its time doing that. Here a world of N ranks is started once, on
first use, and each test sends it a function to run on every rank:

    results = run_world(4, check_column_parallel, tp=4)   # list, one entry per rank

The function must be importable by its module path (defined at module level in a test file).
If a rank raises, the test fails with that rank's traceback and the world is torn down, so a
hung collective in one case cannot poison the next.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import traceback

import torch.multiprocessing as mp

_WORLDS: dict[int, "_World"] = {}
DEFAULT_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, tasks, results) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    # 2 cores shared by up to 8 ranks: more threads per rank only adds contention.
    torch.set_num_threads(1)
    os.environ.setdefault("MEGATRON_DS_TEST_WORLD", str(size))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
        timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, kwargs = task
        try:
            out = fn(**kwargs)
            results.put((rank, True, out))
        except BaseException:  # noqa: BLE001 - report everything back to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class _World:
    def __init__(self, size: int):
        ctx = mp.get_context("spawn")
        self.size = size
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, size, port, self.tasks[r], self.results), daemon=True)
            for r in range(size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, timeout: float, kwargs: dict) -> list:
        for q in self.tasks:
            q.put((fn, kwargs))
        out: list = [None] * self.size
        errors = []
        for _ in range(self.size):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{fn.__name__}: no answer from every rank in {timeout}s (hung collective?)")
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break  # the others are likely blocked in a collective now
        if errors:
            raise RuntimeError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return out

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def run_world(size: int, fn, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
    """Run ``fn(**kwargs)`` on every rank of a shared gloo world of ``size``; per-rank results."""
    world = _WORLDS.get(size)
    if world is None or not all(p.is_alive() for p in world.procs):
        if world is not None:
            world.close()
        world = _WORLDS[size] = _World(size)
    try:
        return world.run(fn, timeout, kwargs)
    except BaseException:
        world.close()
        _WORLDS.pop(size, None)
        raise


@atexit.register
def _shutdown() -> None:
    for w in list(_WORLDS.values()):
        w.close()
    _WORLDS.clear()
