"""``python -m megatron_ds.sft`` end to end: --epochs sets the iterations from the packed samples and
the epoch is logged; a second stage starts from the first stage's weights (at another layout, on
another data mix); bad input is one line and exit code 2."""

import os
import re
import subprocess
import sys

import pytest

from megatron_ds.data.sft_dataset import ConversationCorpus, SFTDataset
from tests.sft.conftest import make_conversations, write_jsonl
from tools import preprocess_sft

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ, GBS = 64, 4
TINY = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--vocab-size", "300", "--seq-length", str(SEQ), "--micro-batch-size", "2",
        "--global-batch-size", str(GBS), "--lr", "3e-3", "--log-interval", "1", "--seed", "7"]


def sft(args, nproc=1, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "megatron_ds.sft", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


def losses(stdout):
    return [float(m) for m in re.findall(r"lm loss ([0-9.]+)", stdout)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, chat_tokenizer):
    d = tmp_path_factory.mktemp("sft_cli")
    for name, n, seed in (("a", 24, 0), ("b", 12, 1)):
        write_jsonl(d / f"{name}.jsonl", make_conversations(n, seed=seed))
        assert preprocess_sft.main(["--input", str(d / f"{name}.jsonl"), "--output-prefix", str(d / name),
                                    "--tokenizer-model", str(chat_tokenizer)]) == 0
    return d


def test_epochs_set_the_iterations_and_a_second_stage_loads_the_first(data, chat_tokenizer, tmp_path):
    a, b = str(data / "a"), str(data / "b")
    packed = SFTDataset(ConversationCorpus(a), SEQ, 7).num_packed
    iters = 2 * packed // GBS  # floor(epochs x packed samples / global batch)
    base = TINY + ["--tokenizer-model", str(chat_tokenizer)]
    proc = sft(base + ["--data-path", a, "--epochs", "2", "--save", str(tmp_path / "stage1")])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"24 conversations -> {packed} packed samples of {SEQ} tokens" in out
    assert f"SFT: {iters} iterations x global batch {GBS} = " in out and "(--epochs 2)" in out
    assert f"iter {iters:>6d}/{iters}" in out
    epochs = [float(e) for e in re.findall(r"\| epoch ([0-9.]+)", out)]
    assert len(epochs) == iters and epochs[-1] == pytest.approx(iters * GBS / packed, abs=1e-4)
    assert os.path.isdir(tmp_path / "stage1" / f"iter_{iters:07d}")
    stage1 = losses(out)
    assert stage1[-1] < stage1[0]

    # --resume-sft continues stage 1 from its own checkpoint (iteration, data position) to a third epoch.
    iters3 = 3 * packed // GBS
    proc = sft(base + ["--data-path", a, "--epochs", "3", "--load", str(tmp_path / "stage1"), "--resume-sft",
                       "--save", str(tmp_path / "stage1")])
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {tmp_path / 'stage1'}/iter_{iters:07d}" in proc.stdout and f"at iteration {iters}" in proc.stdout
    assert f"iter {iters + 1:>6d}/{iters3}" in proc.stdout and os.path.isdir(tmp_path / "stage1" / f"iter_{iters3:07d}")

    # Stage 2 on another mix (both prefixes) at TP 2: weights only, iteration 0, its own epoch count.
    packed2 = SFTDataset(ConversationCorpus([b, a]), SEQ, 7).num_packed
    iters2 = packed2 // GBS
    proc = sft(base + ["--data-path", b, a, "--epochs", "1", "--load", str(tmp_path / "stage1"),
                       "--save", str(tmp_path / "stage2"), "--tensor-model-parallel-size", "2"], nproc=2)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"finetuning from the weights of {tmp_path / 'stage1'}/iter_{iters3:07d}" in out
    assert f"36 conversations -> {packed2} packed samples" in out and f"iter {1:>6d}/{iters2}" in out
    assert os.path.isdir(tmp_path / "stage2" / f"iter_{iters2:07d}")
    # It starts from what stage 1 learned, not from a fresh initialization's loss.
    assert losses(out)[0] < stage1[0] - 0.2


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err


def test_missing_sft_files_name_the_flag_and_the_tool(data, tmp_path):
    assert_one_line_error(sft(TINY + ["--data-path", str(tmp_path / "nope"), "--epochs", "1"]),
                          f"--data-path {tmp_path / 'nope'}: {tmp_path / 'nope'}_tokens.bin not found",
                          "tools/preprocess_sft.py")


@pytest.mark.parametrize("extra,needle", [
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--epochs", "1", "--global-batch-size", "4000", "--micro-batch-size", "1"],
     "is less than one --global-batch-size 4000"),
    (["--eval-interval", "2"], "--eval-interval needs --valid-data-path"),
    (["--mock-data"], "--mock-data: megatron_ds.sft trains on conversations"),
    (["--resume-sft"], "--resume-sft needs --load"),
    (["--chat-template", "alpaca"], "--chat-template 'alpaca' is not known; choose one of deepseek, chatml"),
], ids=["zero-epochs", "fewer-samples-than-a-batch", "eval-without-valid", "mock-data", "resume-without-load",
        "unknown-template"])
def test_bad_flags_are_one_line(data, extra, needle):
    assert_one_line_error(sft(TINY + ["--data-path", str(data / "a"), *extra]), needle)


def test_token_ids_past_the_model_vocabulary_are_one_line(data, capsys):
    """Conversations binarized with the 300-token tokenizer, a model of 128: the run stops before any forward."""
    from megatron_ds.sft import main

    assert main(TINY[:TINY.index("--vocab-size")] + ["--vocab-size", "128"] + TINY[TINY.index("--vocab-size") + 2:]
                + ["--data-path", str(data / "a"), "--train-iters", "2", "--no-fused-kernels"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --data-path {data / 'a'}: token id "), err
    assert "outside the model's vocabulary of 128 (--vocab-size)" in err[0] and "--tokenizer-model" in err[0]
