"""The pretrain command end to end, and what a user sees when the input is wrong.

Each case runs ``python -m megatron_ds.pretrain`` as a user would (a world of one process, or
WORLD_SIZE set as torchrun sets it), checking the exit code and what lands on stderr and disk.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4"]


def pretrain(args, env=None, timeout=300):
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "megatron_ds.pretrain", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small real corpus: tokenizer trained on it and its .bin/.idx written by our tools."""
    from tools import preprocess_data, train_tokenizer

    d = tmp_path_factory.mktemp("corpus")
    words = "def return import class self value list dict for while if else print 0 1 2 3 ( ) : , .".split()
    with open(d / "c.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(60))}) + "\n")
    assert train_tokenizer.main(["--input", str(d / "c.jsonl"), "--vocab-size", "300", "--output", str(d / "tok.json")]) == 0
    assert preprocess_data.main(["--input", str(d / "c.jsonl"), "--output-prefix", str(d / "c"),
                                 "--tokenizer-model", str(d / "tok.json"), "--append-eod"]) == 0
    return d


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for n in needles:
        assert n in err, err


def test_trains_saves_logs_and_generates(corpus, tmp_path):
    proc = pretrain(TINY + ["--vocab-size", "512", "--train-iters", "6", "--log-interval", "2",
                            "--eval-interval", "3", "--eval-iters", "1",
                            "--data-path", str(corpus / "c_text_document"), "--split", "90,10,0",
                            "--tokenizer-model", str(corpus / "tok.json"), "--save", str(tmp_path / "ckpt"),
                            "--tensorboard-dir", str(tmp_path / "tb"), "--generate-prompt", "def",
                            "--generate-tokens", "5"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "iter      6/6" in out and "validation at iter 6" in out and "sample: def" in out, out
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000006"
    assert (tmp_path / "ckpt" / "iter_0000006" / "metadata.json").is_file()
    assert (tmp_path / "ckpt" / "iter_0000006" / "rank_00000.safetensors").is_file()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))

    # --load picks the run up at iteration 6 and continues to 8.
    proc = pretrain(TINY + ["--vocab-size", "512", "--train-iters", "8", "--log-interval", "1",
                            "--data-path", str(corpus / "c_text_document"), "--split", "90,10,0",
                            "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "ckpt")])
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "iter      7/8" in proc.stdout, proc.stdout
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000008"

    # A checkpoint past --train-iters is a one-line error, and the checkpoints stay as they were.
    proc = pretrain(TINY + ["--vocab-size", "512", "--train-iters", "5",
                            "--data-path", str(corpus / "c_text_document"), "--split", "90,10,0",
                            "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "ckpt")])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --load {tmp_path / 'ckpt'} is at iteration 8, past --train-iters 5; raise --train-iters (or --epochs) "
        "to train further, or --finetune to start over"], proc.stderr
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000008"


def test_eval_interval_without_validation_data_says_so(corpus):
    proc = pretrain(TINY + ["--vocab-size", "512", "--train-iters", "2", "--eval-interval", "1",
                            "--data-path", str(corpus / "c_text_document"), "--split", "100,0,0",
                            "--tokenizer-model", str(corpus / "tok.json")])
    assert proc.returncode == 0, proc.stderr
    assert "warning: --eval-interval 1 is set but this run has no validation data" in proc.stdout, proc.stdout
    assert "validation at iter" not in proc.stdout


def test_tp_that_does_not_divide_heads_is_one_line():
    proc = pretrain(TINY + ["--mock-data", "--tensor-model-parallel-size", "3"], env={"WORLD_SIZE": "3"})
    assert_one_line_error(proc, "--tensor-model-parallel-size 3", "4 attention heads")


def test_world_size_not_a_multiple_of_tp_pp_is_one_line():
    proc = pretrain(TINY + ["--mock-data", "--tensor-model-parallel-size", "2"], env={"WORLD_SIZE": "3"})
    assert_one_line_error(proc, "world size 3", "--tensor-model-parallel-size 2")


def test_missing_data_file_is_one_line(tmp_path):
    proc = pretrain(TINY + ["--data-path", str(tmp_path / "nowhere" / "corpus_text_document")])
    assert_one_line_error(proc, "--data-path", "corpus_text_document.bin", "tools/preprocess_data.py")


def test_tokenizer_larger_than_model_vocab_is_one_line(corpus):
    proc = pretrain(TINY + ["--vocab-size", "128", "--data-path", str(corpus / "c_text_document"),
                            "--tokenizer-model", str(corpus / "tok.json")])
    assert_one_line_error(proc, "--tokenizer-model", "tok.json", "more than the model's vocabulary of 128")


def test_missing_tokenizer_file_is_one_line(corpus, tmp_path):
    proc = pretrain(TINY + ["--data-path", str(corpus / "c_text_document"),
                            "--tokenizer-model", str(tmp_path / "missing.json")])
    assert_one_line_error(proc, "missing.json")


def test_help_lists_megatron_flags_with_docs():
    proc = pretrain(["--help"])
    assert proc.returncode == 0
    for flag in ("--tensor-model-parallel-size", "--sequence-parallel", "--global-batch-size", "--lr-decay-style",
                 "--num-query-groups", "--tokenizer-model", "--init-method-std", "--eval-iters"):
        assert flag in proc.stdout
    assert "Peak learning rate" in proc.stdout  # help text comes from the field docstrings


@pytest.mark.parametrize("module,opening", [("pretrain", "Megatron-style 3D-parallel trainer"),
                                            ("sft", "Supervised fine-tuning of a DeepSeek LLM model"),
                                            ("dpo", "Direct Preference Optimization of a policy")])
def test_each_entry_point_has_its_own_help_description(module, opening, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"megatron_ds.{module}").main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: megatron_ds.{module}") and "\n" + opening in out, out[:400]
    assert ("--dpo-beta" in out) == (module == "dpo") and ("--resume-sft" in out) == (module == "sft")
