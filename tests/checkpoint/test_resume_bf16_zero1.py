"""A bf16 run with ZeRO-1 resumes at another TP x PP x DP layout with its fp32 master weights and Adam
moments, not with master weights re-derived from the bf16 params.

Under bf16 the fp32 master weights are the real model: the bf16 params are only their rounding. A
loader that rebuilt the masters from the bf16 params would lose the low 16 bits of every weight and
still train, so the loss alone would hide it. Hence two checks, through ``pretrain.run``:

- round trip: a checkpoint saved at TP2 x DP2 (ZeRO-1, bf16), loaded at TP1 x PP2 x DP2 and at
  TP1 x DP4 and saved again there before any step, holds bitwise the same global tensors (weights,
  fp32 masters, both moments), the same iteration, data position and LR-schedule state;
- continuation: steps 11-14 at those layouts follow the same-layout continuation within bf16
  tolerance (the layouts regroup bf16 GEMM sums), a tolerance that fresh Adam moments exceed.

One world of 4 ranks runs every case in one call.
"""

import os
import shutil
import tempfile

import pytest

from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.config import config_from_args, validate
from megatron_ds.parallel.topology import build_parallel_state
from tests.multiproc import run_world

STEPS, STOP = 14, 10
FLAGS = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--vocab-size", "500", "--seq-length", "32", "--max-position-embeddings", "64",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "3",
         "--clip-grad", "1.0", "--mock-data", "--log-interval", "1000", "--use-distributed-optimizer", "--bf16"]
LAYOUTS = {
    "tp2_pp1_dp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1"],
    "tp1_pp2_dp2": ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"],
    "tp1_pp1_dp4": ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"],
}
# Another layout rounds bf16 GEMM partial sums and reductions at other places (2^-9 relative per
# rounding), and 4 Adam steps carry that into the weights; the loss itself is an fp32 mean over 256
# tokens, which averages the roundings out. Measured here: at most 2.1e-5 relative over steps 11-14.
# 1e-3 leaves a 50x margin and still fails a resume with fresh Adam moments (1e-2, the last test).
# Lost master weights move the loss by about as little as the layout does (1.5e-5, tried by
# disabling their load): the bitwise round trip is the check that catches those.
BF16_RTOL = 1e-3


def _run(layout, *extra):
    from megatron_ds.pretrain import run

    cfg = config_from_args(FLAGS + LAYOUTS[layout] + list(extra))
    validate(cfg, 4)
    p = cfg.parallel
    res = run(cfg, build_parallel_state(p.tensor_model_parallel_size, p.pipeline_model_parallel_size), log=False)
    return {"losses": res.losses, "iteration": res.iteration, "consumed": res.consumed_train_samples}


def _cases(root):
    saved = os.path.join(root, "saved")
    out = {"first": _run("tp2_pp1_dp2", "--train-iters", str(STOP), "--save", saved)}
    for layout in LAYOUTS:
        # Loaded and saved again before any step: --train-iters equals the loaded iteration.
        _run(layout, "--train-iters", str(STOP), "--load", saved, "--save", os.path.join(root, layout))
        out[layout] = _run(layout, "--train-iters", str(STEPS), "--load", saved)
    out["no_load_optim"] = _run("tp1_pp1_dp4", "--train-iters", str(STEPS), "--load", saved, "--no-load-optim")
    return out


@pytest.fixture(scope="module")
def results():
    root = tempfile.mkdtemp(prefix="resume_bf16_")
    try:
        out = run_world(4, _cases, root=root)[0]
        out["readers"] = {name: CheckpointReader(os.path.join(root, name)) for name in ["saved", *LAYOUTS]}
        yield out
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loaded_and_saved_again_at_any_layout_is_bitwise_the_same_checkpoint(results, layout):
    import torch

    saved, again = results["readers"]["saved"], results["readers"][layout]
    keys = saved.keys()
    assert keys == again.keys()
    masters = [k for k in keys if k.startswith("optimizer/master/")]
    assert masters and any(k.startswith("optimizer/exp_avg/") for k in keys)
    for k in keys:
        a, b = saved.read(k), again.read(k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
    # The masters really are more than the bf16 weights: a loader that re-derived them would differ.
    w = next(k for k in keys if k.startswith("model/") and k.endswith("mlp.gate_up.weight"))
    m = saved.read("optimizer/master/" + w)
    assert saved.read(w).dtype == torch.bfloat16 and m.dtype == torch.float32
    assert not torch.equal(m, m.to(torch.bfloat16).float())
    assert again.meta["layout"]["dp"] == {"tp2_pp1_dp2": 2, "tp1_pp2_dp2": 2, "tp1_pp1_dp4": 4}[layout]
    assert (again.iteration, again.consumed_samples) == (STOP, STOP * 8)
    assert again.common_state()["lr_schedule"] == saved.common_state()["lr_schedule"]


@pytest.mark.parametrize("layout", ["tp1_pp2_dp2", "tp1_pp1_dp4"])
def test_continues_at_another_layout_within_bf16_tolerance(results, layout):
    ref, got = results["tp2_pp1_dp2"], results[layout]
    assert got["iteration"] == STEPS and got["consumed"] == STEPS * 8 and len(got["losses"]) == STEPS - STOP
    rel = max(abs(a - b) / abs(a) for a, b in zip(got["losses"], ref["losses"]))
    print(f"{layout}: max relative loss difference over steps 11-14: {rel:.2e}")
    assert rel <= BF16_RTOL, (layout, got["losses"], ref["losses"])


def test_the_tolerance_is_tight_enough_to_see_lost_optimizer_state(results):
    """Fresh Adam moments (--no-load-optim) move steps 12-14 by more than BF16_RTOL: the comparison
    above would catch a resume that dropped the optimizer state."""
    ref, fresh = results["tp2_pp1_dp2"]["losses"], results["no_load_optim"]["losses"]
    rel = max(abs(a - b) / abs(a) for a, b in zip(fresh[1:], ref[1:]))
    print(f"--no-load-optim: max relative loss difference over steps 12-14: {rel:.2e}")
    assert rel > BF16_RTOL
