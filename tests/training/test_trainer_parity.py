"""Trainer parity: any TP x SP x DP layout trains exactly like the single-process run.

Same global batch, same seed, fp32: the loss at every one of 20 steps must match the
single-process run. Initialization is layout-independent and the loss is the exact per-token
mean of the global batch, so the only differences are fp32 summation order (TP splits the
contraction of the row-parallel GEMMs, DP sums gradients in another order) and how Adam carries
those ~1e-7 relative differences forward.
"""

import functools

import pytest

from megatron_ds.config import config_from_args
from megatron_ds.parallel.topology import build_parallel_state, single_process_state
from megatron_ds.pretrain import run
from tests.multiproc import run_world

STEPS = 20
# A small GQA model (4 heads over 2 KV groups) so TP=4 exercises KV-head replication.
FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--vocab-size", "500", "--seq-length", "32", "--max-position-embeddings", "64",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(STEPS),
         "--lr", "3e-3", "--lr-warmup-iters", "5", "--lr-decay-style", "multistep",
         "--clip-grad", "1.0", "--mock-data", "--log-interval", "1000"]

# fp32 rounding is ~6e-8 relative per op; over 2 layers and 20 AdamW steps the curves of the
# layouts below differ from the single-process one by at most 1.7e-7 relative (measured on all
# three). 2e-6 leaves 10x margin and is far below what a wrong gradient does: leaving out the TP
# sum of the replicated KV-head grads moves step 3 by 4e-5.
RTOL = 2e-6


def _losses(tp: int, sp: bool) -> list[float]:
    flags = FLAGS + ["--tensor-model-parallel-size", str(tp)] + (["--sequence-parallel"] if sp else [])
    cfg = config_from_args(flags)
    state = build_parallel_state(tp=tp)
    res = run(cfg, state, log=False)
    return res.losses


@functools.lru_cache(maxsize=None)
def _reference() -> tuple:
    cfg = config_from_args(FLAGS)
    return tuple(run(cfg, single_process_state(), log=False).losses)


def _assert_same_curve(got, ref):
    assert len(got) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert a == pytest.approx(b, rel=RTOL), f"step {step}: {a} vs single-process {b}"


def test_reference_loss_falls():
    ref = _reference()
    assert ref[-1] < ref[0] - 0.3, ref  # the tiny model does learn the mock data's rule


@pytest.mark.parametrize("tp,sp", [(2, True), (4, False)], ids=["tp2-sp-dp2", "tp4-dp1"])
def test_loss_curve_matches_single_process(tp, sp):
    ref = _reference()
    results = run_world(4, _losses, tp=tp, sp=sp)
    for rank, losses in enumerate(results):
        _assert_same_curve(losses, ref)


def test_data_parallel_only_matches_single_process():
    ref = _reference()
    for losses in run_world(2, _losses, tp=1, sp=False):
        _assert_same_curve(losses, ref)
