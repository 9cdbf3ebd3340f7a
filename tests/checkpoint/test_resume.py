"""Resuming a training run through ``pretrain.run``: exact at the same layout, within fp32 tolerance at
another one, optimizer state included; a preemption signal ends the run with a final save.

Reference: 20 uninterrupted steps at TP2 x PP2 x DP2 with ZeRO-1 (--use-distributed-optimizer),
with a periodic asynchronous save at step 10. The run under test is the same command, stopped at
step 10 by a SIGTERM that only rank 0 receives (all ranks agree, save and return); fresh ``run()``
calls with --load then continue it:

- same layout: the losses of steps 11-20 are bitwise equal to the reference's (fp32, CPU);
- TP1 x PP4 x DP2 and TP4 x PP1 x DP1: equal within RTOL (the layout regroups fp32 sums, as in
  tests/pipeline/test_pipeline_parity.py; the optimizer state is read back at the other split);
- --no-load-optim: step 11 (computed before any update) is bitwise equal, step 12 is not (fresh
  Adam moments); --finetune: weights only, the run starts at iteration 0 from the trained model.

One world per size runs all its cases in one call (spawning worlds is the slow part).
"""

import os
import shutil
import signal
import tempfile

import pytest

from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.config import config_from_args, validate
from megatron_ds.parallel.topology import build_parallel_state
from tests.multiproc import run_world

STEPS, STOP = 20, 10
FLAGS = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--vocab-size", "500", "--seq-length", "32", "--max-position-embeddings", "64",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "3",
         "--clip-grad", "1.0", "--mock-data", "--log-interval", "1000", "--use-distributed-optimizer"]
TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
TP1_PP4 = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "4"]
TP4_PP1 = ["--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "1"]
# Another layout regroups fp32 sums (TP GEMM partial sums, the grad-norm all-reduce, ZeRO shard
# boundaries), which Adam carries forward: tests/pipeline measured <= 7.8e-7 relative over 20 steps.
# The largest relative difference this test sees is printed (pytest -s); 1e-5 leaves a wide margin.
RTOL = 1e-5


def _run(extra, world, sigterm_after=None):
    """pretrain.run on every rank; rank 0 alone gets SIGTERM after step ``sigterm_after``."""
    import torch.distributed as dist

    from megatron_ds.pretrain import run
    from megatron_ds.training.trainer import Trainer

    cfg = config_from_args(FLAGS + extra)
    validate(cfg, world)
    p = cfg.parallel
    state = build_parallel_state(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    original = Trainer.train_step
    if sigterm_after is not None and dist.get_rank() == 0:
        def train_step(self, micro_batches, iteration):
            out = original(self, micro_batches, iteration)
            if iteration + 1 == sigterm_after:
                os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's preemption, on one rank only
            return out

        Trainer.train_step = train_step
    try:
        res = run(cfg, state, log=False)
    finally:
        Trainer.train_step = original
    return {"losses": res.losses, "iteration": res.iteration, "consumed": res.consumed_train_samples}


def _eight(ref_dir, run_dir):
    steps = ["--train-iters", str(STEPS)]
    out = {"reference": _run(TP2_PP2 + steps + ["--save", ref_dir, "--save-interval", str(STOP)], 8)}
    out["stopped"] = _run(TP2_PP2 + steps + ["--save", run_dir], 8, sigterm_after=STOP)
    out["resumed"] = _run(TP2_PP2 + steps + ["--load", run_dir], 8)
    out["tp1_pp4_dp2"] = _run(TP1_PP4 + steps + ["--load", run_dir], 8)
    out["no_load_optim"] = _run(TP2_PP2 + ["--train-iters", str(STOP + 2), "--load", run_dir, "--no-load-optim"], 8)
    out["finetune"] = _run(TP2_PP2 + ["--train-iters", "2", "--load", run_dir, "--finetune"], 8)
    return out


def _four(run_dir):
    return {"tp4_pp1_dp1": _run(TP4_PP1 + ["--train-iters", str(STEPS), "--load", run_dir], 4)}


@pytest.fixture(scope="module")
def results():
    ref_dir, run_dir = tempfile.mkdtemp(prefix="resume_ref_"), tempfile.mkdtemp(prefix="resume_run_")
    try:
        out = run_world(8, _eight, ref_dir=ref_dir, run_dir=run_dir)[0]
        out.update(run_world(4, _four, run_dir=run_dir)[0])
        ref_reader, run_reader = CheckpointReader(os.path.join(ref_dir, "iter_0000010")), CheckpointReader(run_dir)
        out["checkpoints"] = (ref_reader, run_reader, run_reader.common_state())
        yield out
    finally:
        shutil.rmtree(ref_dir, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_sigterm_on_one_rank_stops_every_rank_with_a_final_save(results):
    ref, stopped = results["reference"]["losses"], results["stopped"]
    assert stopped["iteration"] == STOP and stopped["losses"] == ref[:STOP]
    _, run_reader, common = results["checkpoints"]
    assert run_reader.iteration == STOP and run_reader.consumed_samples == STOP * 8
    assert common["lr_schedule"]["iteration"] == STOP
    assert common["optimizer"]["kind"] == "zero1" and common["optimizer"]["step"] == STOP
    assert run_reader.meta["layout"] == {"tp": 2, "pp": 2, "dp": 2}


def test_periodic_async_save_equals_the_final_save_of_a_stopped_run(results):
    """The reference's asynchronous save at step 10 (training went on while it was written) holds
    exactly what the stopped run saved at step 10: weights, fp32 master weights, Adam moments."""
    import torch

    ref_reader, run_reader, _ = results["checkpoints"]
    keys = ref_reader.keys()
    assert keys == run_reader.keys()
    assert any(k.startswith("optimizer/master/") for k in keys) and any(k.startswith("optimizer/exp_avg_sq/")
                                                                         for k in keys)
    for k in keys:
        assert torch.equal(ref_reader.read(k), run_reader.read(k)), k


def test_resume_at_the_same_layout_is_bitwise_exact(results):
    ref, resumed = results["reference"]["losses"], results["resumed"]
    assert resumed["iteration"] == STEPS and resumed["consumed"] == STEPS * 8
    assert resumed["losses"] == ref[STOP:]  # bitwise: Python floats of the fp32 losses


@pytest.mark.parametrize("layout", ["tp1_pp4_dp2", "tp4_pp1_dp1"])
def test_resume_at_another_layout_within_fp32_tolerance(results, layout):
    ref, got = results["reference"]["losses"][STOP:], results[layout]["losses"]
    assert len(got) == STEPS - STOP
    rel = max(abs(a - b) / abs(a) for a, b in zip(got, ref))
    print(f"{layout}: max relative loss difference over steps 11-20: {rel:.2e}")
    assert rel <= RTOL, (layout, got, ref)


def test_no_load_optim_and_finetune_start_from_the_weights_only(results):
    ref = results["reference"]["losses"]
    nlo = results["no_load_optim"]
    assert nlo["iteration"] == STOP + 2
    assert nlo["losses"][0] == ref[STOP]  # step 11's loss comes before any update: same weights, same batch
    assert nlo["losses"][1] != ref[STOP + 1]  # fresh Adam moments change the first update
    ft = results["finetune"]
    assert ft["iteration"] == 2 and ft["consumed"] == 16  # iteration and data position start afresh
    assert ft["losses"][0] < ref[0] - 0.05  # batch 1 under the trained weights, not the init's


def test_sigterm_to_the_pretrain_process_saves_and_exits_cleanly(tmp_path):
    """A real process, as a scheduler preempts it: SIGTERM mid-training -> final save, exit code 0;
    a new process resumes from that checkpoint. Time-based saves and --keep-last-n on the way."""
    import subprocess
    import sys

    from megatron_ds.checkpoint.format import LATEST

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    ckpt = str(tmp_path / "ckpt")
    args = [sys.executable, "-m", "megatron_ds.pretrain", *[f for f in FLAGS if f != "--use-distributed-optimizer"],
            "--log-interval", "1", "--save", ckpt, "--load", ckpt]
    # A save whenever 0.0001 minutes passed: every step, each waiting for the previous; 2 kept.
    periodic = ["--save-interval-minutes", "0.0001", "--keep-last-n", "2"]
    proc = subprocess.Popen(args + periodic + ["--train-iters", "100000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=repo)
    try:
        for line in proc.stdout:
            if line.lstrip().startswith("iter") and "3/100000" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopping early: signal 15" in out and "saved checkpoint" in out, out
    with open(os.path.join(ckpt, LATEST)) as f:
        stopped_at = int(f.read().strip()[len("iter_"):])
    assert 3 <= stopped_at < 100000
    assert sorted(os.listdir(ckpt)) == sorted([LATEST, f"iter_{stopped_at - 1:07d}", f"iter_{stopped_at:07d}"])
    again = subprocess.run(args + ["--train-iters", str(stopped_at + 1)], capture_output=True, text=True, env=env,
                           cwd=repo, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"at iteration {stopped_at}" in again.stdout and f"{stopped_at + 1}/{stopped_at + 1}" in again.stdout, \
        again.stdout
