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


def _amax_groups():
    from megatron_ds.kernels.te import amax_reduction
    from megatron_ds.parallel.topology import build_parallel_state, group_size

    tp2 = build_parallel_state(2, 1)
    group, reduce = amax_reduction(tp2.tp_group)
    one = amax_reduction(build_parallel_state(1, 2).tp_group)
    return group is tp2.tp_group and group_size(group) == 2 and reduce, one


def test_fp8_amax_is_reduced_over_the_tp_group_never_the_world():
    """TE reads fp8_group=None as the whole world: at TP 1 the recipe must not reduce at all, and at
    TP 2 it reduces over the TP group (whose ranks run the same GEMMs), not over PP or DP ranks."""
    from tests.multiproc import run_world

    for tp2_ok, tp1 in run_world(2, _amax_groups):
        assert tp2_ok
        assert tp1 == (None, False)
