"""Checkpoint cost on CPU: how long a save blocks the training loop, asynchronous against
synchronous, and save / load throughput, for the tiny model and one of about 100M parameters.

    python benchmarks/bench_checkpoint.py [--dir /tmp/ckpt-bench] [--repeats 3] [--models tiny,100m]

One process (TP1), fp32 weights, sha256 verification on load. "blocked" is the time from the
call of ``save_checkpoint`` to its return: for the async writer that is the CPU copy at the
step boundary plus the hand-off, and the write continues behind it ("write done" is when
``writer.wait()`` returns). Loads right after a save mostly hit the page cache; the numbers are
upper bounds for a cold read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from megatron_ds.checkpoint.load import CheckpointReader  # noqa: E402
from megatron_ds.checkpoint.model_state import load_model, model_sharded_tensors  # noqa: E402
from megatron_ds.checkpoint.save import AsyncCheckpointWriter, save_checkpoint  # noqa: E402
from megatron_ds.config import ModelConfig, count_parameters, model_preset  # noqa: E402
from megatron_ds.model.deepseek import DeepSeekModel  # noqa: E402

MODELS = {
    "tiny": lambda: model_preset("tiny"),
    # ~96M parameters: 10 layers of d 768 (MHA, 12 heads), SwiGLU 2048, vocabulary 16384.
    "100m": lambda: ModelConfig(num_layers=10, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
                                max_position_embeddings=1024, vocab_size=16384),
}


def _model(cfg: ModelConfig) -> DeepSeekModel:
    try:
        from megatron_ds.kernels import reference_kernels

        return DeepSeekModel(cfg, kernels=reference_kernels())
    except ImportError:
        return DeepSeekModel(cfg)


def bench(name: str, root: str, repeats: int) -> dict:
    cfg = MODELS[name]()
    model = _model(cfg)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sync, blocked, done, load = [], [], [], []
    writer = AsyncCheckpointWriter()
    it = 0
    for _ in range(repeats):
        it += 1
        t0 = time.perf_counter()
        save_checkpoint(root, it, model_sharded_tensors(model), config=cfg, keep_last_n=2)
        sync.append(time.perf_counter() - t0)

        it += 1
        t0 = time.perf_counter()
        save_checkpoint(root, it, model_sharded_tensors(model), config=cfg, keep_last_n=2, writer=writer)
        blocked.append(time.perf_counter() - t0)
        writer.wait()
        done.append(time.perf_counter() - t0)

        fresh = _model(cfg)
        t0 = time.perf_counter()
        load_model(fresh, CheckpointReader(root))
        load.append(time.perf_counter() - t0)
    med = statistics.median
    return dict(model=name, params_m=count_parameters(cfg, cfg.padded_vocab_size(1)) / 1e6, mb=nbytes / 2**20,
                sync_s=med(sync), async_blocked_s=med(blocked), async_done_s=med(done), load_s=med(load))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="tiny,100m")
    args = parser.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="ckpt-bench-")
    print(f"{'model':6} {'params':>8} {'MB':>7} {'sync save':>10} {'async blocked':>14} {'async done':>11} "
          f"{'save MB/s':>10} {'load':>8} {'load MB/s':>10}")
    try:
        for name in args.models.split(","):
            r = bench(name, os.path.join(base, name), args.repeats)
            print(f"{r['model']:6} {r['params_m']:7.1f}M {r['mb']:7.1f} {r['sync_s'] * 1e3:8.1f}ms "
                  f"{r['async_blocked_s'] * 1e3:12.1f}ms {r['async_done_s'] * 1e3:9.1f}ms "
                  f"{r['mb'] / r['sync_s']:10.0f} {r['load_s'] * 1e3:6.1f}ms {r['mb'] / r['load_s']:10.0f}",
                  flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    main()
