"""tools/generate.py end to end on a tiny checkpoint (one process), and its one-line errors."""

import os
import subprocess
import sys

import pytest

from megatron_ds.data.tokenizer import build_tokenizer
from megatron_ds.inference import SamplingParams, generate
from megatron_ds.parallel.topology import ParallelState
from tests.inference.helpers import save_tiny_checkpoint, tiny_config, word_tokenizer
from tools.generate import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "w3 w14 w15 w9 w2 w6"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(checkpoint dir, tokenizer path, the saved single-process model): a 64-token vocabulary, all of it words."""
    d = tmp_path_factory.mktemp("gen")
    tok = word_tokenizer(str(d / "tokenizer.json"))
    model = save_tiny_checkpoint(str(d / "ckpt"), tiny_config(vocab_size=64), tokenizer_path=tok)
    return str(d / "ckpt"), tok, model


def _expected(model, tok_path, n, sampling=SamplingParams()):
    tok = build_tokenizer(tok_path)
    ids = generate(model, ParallelState(), tok.encode(PROMPT), n, sampling=sampling, eos_id=tok.eod).tokens[0].tolist()
    return tok.decode(ids[:-1] if ids and ids[-1] == tok.eod else ids)  # the CLI does not print the final EOS


def test_cli_prints_the_continuation_of_the_loaded_checkpoint(ckpt):
    root, tok, model = ckpt
    args = [sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load", root, "--tokenizer-model", tok,
            "--prompt", PROMPT, "--max-new-tokens", "10", "--no-fused-kernels"]
    greedy = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout == _expected(model, tok, 10) + "\n"
    assert "tokens/s" in greedy.stderr and "kv cache on" in greedy.stderr

    sampled = subprocess.run(args + ["--temperature", "0.9", "--top-p", "0.95", "--top-k", "20", "--seed", "5",
                                     "--no-kv-cache"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout == _expected(model, tok, 10, SamplingParams(0.9, 20, 0.95, 5)) + "\n"


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_checkpoint_directory(ckpt, tmp_path, capsys):
    _, tok, _ = ckpt
    err = _error(["--load", str(tmp_path / "nope"), "--tokenizer-model", tok, "--prompt", "w1"], capsys)
    assert "--load" in err and "nope" in err


def test_missing_tokenizer(ckpt, tmp_path, capsys):
    root, _, _ = ckpt
    err = _error(["--load", root, "--tokenizer-model", str(tmp_path / "tok.json"), "--prompt", "w1"], capsys)
    assert "--tokenizer-model" in err and "tok.json" in err


def test_a_layout_that_does_not_divide_the_heads(ckpt, capsys):
    root, tok, _ = ckpt
    err = _error(["--load", root, "--tokenizer-model", tok, "--prompt", "w1", "--tensor-model-parallel-size", "3"],
                 capsys)
    assert "--tensor-model-parallel-size 3 does not divide" in err


def test_more_stages_than_layers(ckpt, capsys):
    root, tok, _ = ckpt
    err = _error(["--load", root, "--tokenizer-model", tok, "--prompt", "w1", "--pipeline-model-parallel-size", "8"],
                 capsys)
    assert "--pipeline-model-parallel-size 8" in err


def test_a_layout_without_its_processes(ckpt, capsys):
    root, tok, _ = ckpt
    err = _error(["--load", root, "--tokenizer-model", tok, "--prompt", "w1", "--tensor-model-parallel-size", "2"],
                 capsys)
    assert "needs exactly 2 processes" in err


def test_bad_sampling_flag_and_no_prompt(ckpt, capsys):
    root, tok, _ = ckpt
    assert "--top-p" in _error(["--load", root, "--tokenizer-model", tok, "--prompt", "w1", "--top-p", "0"], capsys)
    assert "--prompt" in _error(["--load", root, "--tokenizer-model", tok], capsys)


ARCH_FLAGS = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "176", "--num-attention-heads", "4",
              "--num-query-groups", "2", "--max-position-embeddings", "64", "--vocab-size", "64",
              "--init-method-std", "0.05"]


def test_a_checkpoint_without_config_takes_the_architecture_flags(ckpt, tmp_path, capsys):
    from megatron_ds.checkpoint.model_state import model_sharded_tensors
    from megatron_ds.checkpoint.save import save_checkpoint

    _, tok, model = ckpt
    bare = str(tmp_path / "bare")
    save_checkpoint(bare, 1, model_sharded_tensors(model))  # no config recorded
    argv = ["--load", bare, "--tokenizer-model", tok, "--prompt", PROMPT, "--max-new-tokens", "6"]
    assert "records no model config" in _error(argv, capsys)
    assert main(argv + ["--model", "tiny"] + ARCH_FLAGS + ["--no-fused-kernels"]) == 0
    assert capsys.readouterr().out == _expected(model, tok, 6) + "\n"


def test_several_prompts_print_each_prompt_and_continuation_under_a_header(ckpt, capsys):
    root, tok, model = ckpt
    second = "w7 w1"
    assert main(["--load", root, "--tokenizer-model", tok, "--prompt", PROMPT, "--prompt", second,
                 "--max-new-tokens", "5", "--no-fused-kernels"]) == 0
    t = build_tokenizer(tok)

    def continuation(text):
        ids = generate(model, ParallelState(), t.encode(text), 5, eos_id=t.eod).tokens[0].tolist()
        return t.decode(ids[:-1] if ids and ids[-1] == t.eod else ids)

    assert capsys.readouterr().out == (f"===== 1/2 =====\n{PROMPT}{continuation(PROMPT)}\n"
                                       f"===== 2/2 =====\n{second}{continuation(second)}\n")
