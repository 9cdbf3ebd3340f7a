"""``megatron_ds.dpo`` end to end as a user runs it: torchrun with 2 pipeline stages, metrics on rank 0's
log line and in TensorBoard, validation, a checkpoint that pretrain and SFT then load."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.dpo.helpers import MODEL_FLAGS, REPO

METRICS = ("dpo loss", "reward margin", "preference accuracy", "chosen logps", "rejected logps",
           "chosen reward", "rejected reward")


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(module, args, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", module, *args], capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=600)


@pytest.fixture(scope="module")
def dpo_run(dpo_files, tmp_path_factory):
    train, valid, tok = dpo_files
    out = tmp_path_factory.mktemp("dpo_run")
    proc = _run("megatron_ds.dpo", MODEL_FLAGS + [
        "--pipeline-model-parallel-size", "2", "--dpo-data", train, "--dpo-valid-data", valid,
        "--tokenizer-model", tok, "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4",
        "--lr", "1e-3", "--log-interval", "2", "--eval-interval", "4", "--eval-iters", "2",
        "--save", str(out / "ckpt"), "--tensorboard-dir", str(out / "tb")], nproc=2)
    return proc, out


def test_logs_every_metric_on_rank_0(dpo_run):
    proc, _ = dpo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("iter ")]
    assert len(lines) == 2, proc.stdout  # steps 2 and 4, printed once (rank 0 only)
    for line in lines:
        values = dict(re.findall(r"([a-z/ ]+?) (-?[0-9.e+-]+)(?: \||$)", line.split("|", 1)[1]))
        got = {k.strip(): float(v) for k, v in values.items()}
        for m in METRICS:
            assert m in got, (m, line)
        # Rank 0 is the first pipeline stage, which computes no loss: these are the last stage's, broadcast.
        assert 0.0 <= got["preference accuracy"] <= 1.0 and got["chosen logps"] < 0 and got["dpo loss"] > 0
        assert got["reward margin"] == pytest.approx(got["chosen reward"] - got["rejected reward"], abs=2e-4)
    assert "validation at iter 4 | dpo loss " in proc.stdout and "| preference accuracy " in proc.stdout
    assert proc.stdout.count("validation at iter 4") == 1  # one line: no lm loss or perplexity for pairs
    assert "DPO data" in proc.stdout and "96 pairs" in proc.stdout


def test_writes_tensorboard_scalars(dpo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = dpo_run
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for m in METRICS + ("validation preference accuracy",):
        assert m.replace(" ", "-") in tags or m in tags, (m, sorted(tags))


def test_checkpoint_loads_in_pretrain_and_sft(dpo_run, dpo_files, tmp_path):
    _, out = dpo_run
    tok = dpo_files[2]
    common = MODEL_FLAGS + ["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
                            "--tokenizer-model", tok, "--load", str(out / "ckpt")]
    proc = _run("megatron_ds.pretrain", common + ["--finetune", "--mock-data"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finetuning from the weights of" in proc.stdout and "iteration 4" in proc.stdout

    from tools import preprocess_sft

    with open(dpo_files[0]) as f, open(tmp_path / "sft.jsonl", "w") as g:
        for line in f:
            r = json.loads(line)
            g.write(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n")
    preprocess_sft.main(["--input", str(tmp_path / "sft.jsonl"), "--output-prefix", str(tmp_path / "sft"),
                         "--tokenizer-model", tok])
    proc = _run("megatron_ds.sft", common + ["--data-path", str(tmp_path / "sft")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finetuning from the weights of" in proc.stdout


def test_load_gives_policy_and_reference_the_same_weights(dpo_run, dpo_files):
    """--load: both models start from the checkpoint, so at the first step every pair's log-ratios are equal
    (m = 0): loss log 2, zero rewards, accuracy 0 (no chosen reward strictly above its rejected one)."""
    _, out = dpo_run
    train, _, tok = dpo_files
    proc = _run("megatron_ds.dpo", MODEL_FLAGS + [
        "--dpo-data", train, "--tokenizer-model", tok, "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", "1", "--log-interval", "1", "--load", str(out / "ckpt")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference model: " in proc.stdout and "iteration 4), frozen" in proc.stdout
    assert "finetuning from the weights of" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("iter "))
    assert "dpo loss 0.6931 | reward margin 0.0000 | preference accuracy 0.0000" in line, line
    assert "chosen reward 0.0000 | rejected reward 0.0000" in line, line


def test_epochs_set_the_steps_from_the_pairs(dpo_files):
    """--dpo-epochs 0.5 over 96 pairs at 8 pairs a step: ceil(48 / 8) = 6 steps, and the run does 6."""
    from megatron_ds.config import config_from_args
    from megatron_ds.data.tokenizer import build_tokenizer
    from megatron_ds.dpo import DPORunConfig, run
    from megatron_ds.parallel.topology import single_process_state

    train, _, tok = dpo_files
    cfg = config_from_args(MODEL_FLAGS + ["--dpo-data", train, "--tokenizer-model", tok, "--micro-batch-size", "4",
                                          "--global-batch-size", "8", "--dpo-epochs", "0.5", "--train-iters", "1000",
                                          "--dpo-precompute-ref"], DPORunConfig, "megatron_ds.dpo")
    res = run(cfg, single_process_state(), build_tokenizer(tok), log=False)
    assert cfg.training.train_iters == 6 and res.iteration == 6 and len(res.losses) == 6
