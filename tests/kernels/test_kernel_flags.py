"""--no-fused-kernels / --transformer-impl / --fp8-format: what a user sees, and that TE stays unimported."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from megatron_ds.pretrain import main

TINY = ["--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
        "--mock-data"]
HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def one_line_error(argv, capsys):
    assert main(TINY + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.skipif(HAS_TE and torch.cuda.is_available(), reason="TE and CUDA are present: the flag is valid")
def test_transformer_engine_without_te_or_cuda_is_one_line(capsys):
    err = one_line_error(["--transformer-impl", "transformer_engine"], capsys)
    assert "--transformer-impl transformer_engine" in err
    assert ("not installed" in err) or ("CUDA" in err)


def test_fp8_without_transformer_engine_impl_is_one_line(capsys):
    err = one_line_error(["--fp8-format", "e4m3"], capsys)
    assert "--fp8-format e4m3 needs --transformer-impl transformer_engine" in err


def test_unknown_values_are_one_line(capsys):
    assert "choose e4m3 or hybrid" in one_line_error(["--fp8-format", "e5m2"], capsys)
    assert "choose local or transformer_engine" in one_line_error(["--transformer-impl", "te"], capsys)


def test_nothing_imports_transformer_engine_at_start():
    code = ("import sys, megatron_ds.pretrain, megatron_ds.model, megatron_ds.kernels; "
            "from megatron_ds.config import config_from_args, validate; "
            "validate(config_from_args(['--mock-data']), 1); "
            "assert not any(m.startswith('transformer_engine') for m in sys.modules), 'TE imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_fused_kernels_trains(capsys):
    assert main(TINY + ["--no-fused-kernels"]) == 0

