"""Transformer Engine: a few training steps of a small model in TE BF16 and TE FP8 beside the local BF16 path,
and the FP8 scaling state through a checkpoint.

Skips without CUDA or without TE. FP8 rounds every GEMM input to 3-4 mantissa bits, so its curve
is not the BF16 one; over 10 steps of a small model it stays within 5% of it and keeps falling.
"""

import importlib.util
import os
import pickle

import pytest
import torch

from megatron_ds.checkpoint.checkpointing import load, module_states
from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.config import config_from_args
from megatron_ds.parallel.topology import single_process_state
from megatron_ds.pretrain import build_model, run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                                reason="Transformer Engine is not installed")

FLAGS = ["--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "768", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--vocab-size", "1024", "--seq-length", "128", "--max-position-embeddings", "128",
         "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "10", "--lr", "1e-3",
         "--lr-warmup-iters", "2", "--mock-data", "--log-interval", "1000"]
BF16 = ["--bf16"]
CUDA = torch.device("cuda")


def _losses(extra):
    cfg = config_from_args(FLAGS + BF16 + extra)
    return run(cfg, single_process_state(CUDA), log=False).losses


def test_te_keeps_parameter_names():
    local = build_model(config_from_args(FLAGS + BF16), single_process_state(CUDA))
    te = build_model(config_from_args(FLAGS + BF16 + ["--transformer-impl", "transformer_engine"]),
                     single_process_state(CUDA))
    assert list(local.state_dict()) == list(te.state_dict())


@pytest.mark.parametrize("fp8", [None, "e4m3", "hybrid"])
def test_te_training_follows_local_bf16(fp8):
    ref = _losses([])
    got = _losses(["--transformer-impl", "transformer_engine"] + (["--fp8-format", fp8] if fp8 else []))
    tol = 0.01 if fp8 is None else 0.05
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert a == pytest.approx(b, rel=tol), f"step {step}: TE {fp8 or 'bf16'} {a} vs local bf16 {b}"
    assert got[-1] < got[0]


def _fp8_tensors(serialized: torch.Tensor) -> dict:
    """The tensors in TE's serialized FP8 meta (scales, amax histories), by name."""
    state = pickle.loads(serialized.numpy().tobytes())
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_fp8_scaling_state_survives_a_checkpoint(tmp_path):
    fp8 = ["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid"]
    root = str(tmp_path)
    full = _losses(fp8 + ["--save", root, "--save-interval", "5"])
    ckpt = os.path.join(root, "iter_0000005")

    # Saved: one non-empty state per routed GEMM (4 per layer), with amaxes recorded.
    saved = CheckpointReader(ckpt).rank_state(0)["modules"]
    assert len(saved) == 4 * 2
    for key, s in saved.items():
        tensors = _fp8_tensors(s)
        assert tensors["amax_history_fwd"].abs().max() > 0, key

    # Restored: TE's get_extra_state after our load gives back the saved scales and histories.
    state = single_process_state(CUDA)
    model = build_model(config_from_args(FLAGS + BF16 + fp8), state)
    assert load(ckpt, [model], state, load_rng=False).module_states == (8, 8)
    for key, s in module_states([model]).items():
        got, want = _fp8_tensors(s), _fp8_tensors(saved[key])
        assert got.keys() == want.keys(), key
        for name in want:
            assert torch.equal(got[name], want[name]), f"{key}: {name}"

    # Resumed: steps 6-10 follow the uninterrupted run. Same weights, Adam moments, data position and
    # FP8 scales; what may differ is the order of GPU reductions (SDPA backward), well under 1e-3.
    resumed = _losses(fp8 + ["--load", ckpt])
    assert resumed == pytest.approx(full[5:], rel=1e-3)
