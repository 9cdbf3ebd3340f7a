"""Records that cannot be a preference pair: one line naming file:line and the reason (exit 2 from the
command), or, with --dpo-skip-bad-pairs, left out and counted in the load report."""

import json
import os
import subprocess
import sys

import pytest

from megatron_ds.data.dpo_dataset import load_preference_pairs
from megatron_ds.data.errors import DataError
from megatron_ds.data.tokenizer import build_tokenizer
from tests.dpo.helpers import MODEL_FLAGS, REPO

GOOD = {"prompt": "count up from 1, 5 numbers", "chosen": "1 2 3 4 5", "rejected": "1 3 2 4 5"}
BAD = {
    "identical replies": ({**GOOD, "rejected": "1 2 3 4 5"}, "chosen and rejected are identical"),
    "unknown role": ({**GOOD, "prompt": [{"role": "robot", "content": "count"}]},
                     "unknown role 'robot'"),
    "missing key": ({"prompt": "p", "chosen": "a"}, "missing key 'rejected'"),
    "not JSON": ("{\"prompt\": \"p\", ", "not valid JSON"),
    "prompt ends with a reply": ({**GOOD, "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                                 "message 3"),  # the reply would be a second assistant turn in a row
    "reply not a string": ({**GOOD, "chosen": ["1", "2"]}, "'chosen' must be a string, got list"),
}


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_record_is_one_line_naming_file_and_line(dpo_files, tmp_path, kind):
    record, reason = BAD[kind]
    path = _write(tmp_path / "pairs.jsonl", [GOOD, GOOD, record, GOOD])
    with pytest.raises(DataError) as e:
        load_preference_pairs(path, build_tokenizer(dpo_files[2]), 64)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and reason in msg and "\n" not in msg, msg
    assert "--dpo-skip-bad-pairs" in msg


def test_skip_bad_pairs_counts_them(dpo_files, tmp_path):
    records = [GOOD] + [BAD[k][0] for k in BAD] + [GOOD, BAD["identical replies"][0]]
    path = _write(tmp_path / "pairs.jsonl", records)
    pairs = load_preference_pairs(path, build_tokenizer(dpo_files[2]), 64, skip_bad=True)
    assert len(pairs) == 2 and pairs.lines == [1, len(BAD) + 2]
    assert sum(pairs.skipped.values()) == len(BAD) + 1 and pairs.skipped["identical replies"] == 2
    report = pairs.report()
    assert f"skipped {len(BAD) + 1} bad record(s)" in report and f"first: {path}:2: " in report


def test_prompt_longer_than_the_sequence_is_bad(dpo_files, tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{**GOOD, "prompt": "count " * 80}])
    with pytest.raises(DataError, match=r":1: the prompt is \d+ tokens, which leaves no room for a reply in --seq-length 64"):
        load_preference_pairs(path, build_tokenizer(dpo_files[2]), 64)


def test_long_reply_is_cut_and_counted(dpo_files, tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{**GOOD, "chosen": "1 2 3 " * 30}])
    pairs = load_preference_pairs(path, build_tokenizer(dpo_files[2]), 64)
    assert pairs.truncated == 1 and len(pairs.chosen[0]) == 65
    item = pairs.item(0)
    assert item["tokens"].shape == (2, 64) and item["loss_mask"][0].sum() > 0


def _dpo(args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megatron_ds.dpo", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_command_exits_2_with_one_line(dpo_files, tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [GOOD, BAD["unknown role"][0]])
    proc = _dpo(MODEL_FLAGS + ["--dpo-data", path, "--tokenizer-model", dpo_files[2], "--train-iters", "1",
                               "--micro-batch-size", "1", "--global-batch-size", "1"])
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {path}:2: ") and "unknown role 'robot'" in err, err


@pytest.mark.parametrize("args,needle", [
    ([], "--dpo-data is required"),
    (["--dpo-data", "/nonexistent.jsonl"], "--dpo-data /nonexistent.jsonl: no such file"),
    (["--dpo-loss-type", "kto"], "--dpo-loss-type 'kto': choose one of sigmoid, ipo"),
    (["--dpo-beta", "0"], "--dpo-beta 0.0: must be > 0"),
    (["--dpo-label-smoothing", "0.5"], "--dpo-label-smoothing 0.5: must be in [0, 0.5)"),
    (["--load", "/nonexistent-ckpt"], "--load /nonexistent-ckpt: no checkpoint there"),
])
def test_bad_flags_are_one_line(dpo_files, args, needle):
    data = [] if any(a.startswith("--dpo-data") for a in args) or args == [] else ["--dpo-data", dpo_files[0]]
    proc = _dpo(MODEL_FLAGS + data + ["--tokenizer-model", dpo_files[2]] + args)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-each-step", "precomputed-reference"])
def test_token_ids_past_the_model_vocabulary_stop_the_run(dpo_files, precompute):
    """A tokenizer of 320 ids and a model of 256 (the command refuses that pairing up front, from the tokenizer's
    vocab_size; this in-process run skips that check, so the batch check is what stops it): one DataError
    before any forward, of the policy or of the reference."""
    from megatron_ds.config import config_from_args
    from megatron_ds.dpo import DPORunConfig, run
    from megatron_ds.parallel.topology import single_process_state

    flags = [f if f != "512" else "256" for f in MODEL_FLAGS]
    cfg = config_from_args(flags + ["--dpo-data", dpo_files[0], "--tokenizer-model", dpo_files[2],
                                    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "1",
                                    "--no-fused-kernels"] + (["--dpo-precompute-ref"] if precompute else []),
                           DPORunConfig, "megatron_ds.dpo")
    with pytest.raises(DataError, match=rf"^--dpo-data {dpo_files[0]}: token id \d+ is outside the model's "
                                        rf"vocabulary of 256 .*--tokenizer-model {dpo_files[2]}"):
        run(cfg, single_process_state(), build_tokenizer(dpo_files[2]), log=False)
