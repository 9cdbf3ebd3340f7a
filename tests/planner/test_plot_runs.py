"""tools/plot_runs.py: the series it reads back from TensorBoard logs, the PNG it writes, its one-line errors.

Two synthetic runs written with torch's SummaryWriter under the trainer's scalar names stand in for a
multi-step and a cosine schedule run of the same model.
"""

import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from tools import plot_runs


STEPS = list(range(1, 41))
TOKENS_PER_STEP = 8 * 256
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def multistep_lr(step):
    return 1e-3 * (0.316 ** ((step >= 24) + (step >= 32)))


def cosine_lr(step):
    return 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * step / STEPS[-1]))


def _write_run(path, lr, loss_scale, validation=False, filename_suffix=""):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(path), filename_suffix=filename_suffix)
    for s in STEPS:  # the names RunLogger writes ("lm loss" -> "lm-loss"; "tokens/s" keeps its slash)
        w.add_scalar("lm-loss", loss_scale * (8.0 - math.log(s)), s)
        w.add_scalar("lr", lr(s), s)
        w.add_scalar("tokens/s", 1000.0 + 10 * (s % 3), s)
        w.add_scalar("elapsed-s", 0.5 * s, s)
        if validation and s % 10 == 0:
            w.add_scalar("validation lm loss", loss_scale * (8.1 - math.log(s)), s)
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    return (_write_run(root / "multistep", multistep_lr, 1.0, validation=True),
            _write_run(root / "cosine", cosine_lr, 0.98))


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", head[16:24])


# ---- reading the logs ------------------------------------------------------------------------------------

def test_read_scalars_returns_the_written_series(runs):
    got = plot_runs.read_scalars(runs[0])
    assert {"lm-loss", "lr", "tokens/s", "elapsed-s", "validation lm loss"} <= set(got)
    assert got["lr"].steps.tolist() == STEPS
    # TensorBoard stores float32: the values come back as the float32 of what was written
    np.testing.assert_array_equal(got["lr"].values, np.float32([multistep_lr(s) for s in STEPS]))
    np.testing.assert_array_equal(got["lm-loss"].values, np.float32([8.0 - math.log(s) for s in STEPS]))
    assert got["validation lm loss"].steps.tolist() == [10, 20, 30, 40]


def test_a_resumed_runs_later_values_win(tmp_path):
    # A run resumed from its step-20 checkpoint logs steps 21.. again into a second event file.
    _write_run(tmp_path, multistep_lr, 1.0, filename_suffix=".first")
    _write_run(tmp_path, cosine_lr, 1.0, filename_suffix=".resumed")
    lr = plot_runs.read_scalars(str(tmp_path))["lr"]
    assert lr.steps.tolist() == STEPS  # each step once
    np.testing.assert_array_equal(lr.values, np.float32([cosine_lr(s) for s in STEPS]))


def test_trailing_mean_is_the_mean_of_the_last_n_points():
    v = np.array([1.0, 2.0, 6.0, 3.0, 8.0])
    want = [np.mean(v[max(0, i - 2): i + 1]) for i in range(len(v))]
    np.testing.assert_allclose(plot_runs.trailing_mean(v, 3), want, rtol=1e-15)
    assert plot_runs.trailing_mean(v, 1) is v


def test_reads_what_the_trainer_logged(tmp_path, capsys):
    """A real run's TensorBoard log: the train loss of every step read back equals the run's losses."""
    from megatron_ds.config import config_from_args
    from megatron_ds.parallel.topology import single_process_state
    from megatron_ds.pretrain import run

    tb = tmp_path / "tb"
    cfg = config_from_args(["--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
                            "--num-attention-heads", "2", "--num-query-groups", "2", "--vocab-size", "128",
                            "--seq-length", "16",
                            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
                            "--lr", "1e-3", "--mock-data", "--log-interval", "1", "--eval-interval", "2",
                            "--eval-iters", "1", "--tensorboard-dir", str(tb)])
    res = run(cfg, single_process_state(), log=True)
    capsys.readouterr()
    got = plot_runs.read_scalars(str(tb))
    assert got["lm-loss"].steps.tolist() == [1, 2, 3, 4]
    np.testing.assert_array_equal(got["lm-loss"].values, np.float32(res.losses))
    assert got["validation lm loss"].steps.tolist() == [2, 4]
    drawn = [p.title for p, _ in plot_runs.panels_present([got])]
    assert drawn[:5] == ["train loss", "validation loss", "learning rate", "throughput (tokens/s)", "grad norm"]
    out = tmp_path / "run.png"
    assert plot_runs.main([str(tb), "--x", "time", "--output", str(out)]) == 0
    assert _png_size(out) == plot_runs.figure_size_px(len(drawn))


# ---- the PNG -------------------------------------------------------------------------------------------

def test_two_runs_make_a_png_of_the_expected_size(runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    rc = plot_runs.main(list(runs) + ["--labels", "multistep", "cosine", "--output", str(out)])
    assert rc == 0
    # train loss, validation loss (only the multistep run has it), LR, tokens/s: 2 rows of 2
    assert capsys.readouterr().out.strip() == (
        f"wrote {out}: train loss, validation loss, learning rate, throughput (tokens/s) of 2 run(s)")
    assert _png_size(out) == plot_runs.figure_size_px(4) == (1200, 700)
    assert os.listdir(tmp_path) == ["curves.png"]  # the temporary file was renamed, none left behind


@pytest.mark.parametrize("x", ["time", "tokens"])
def test_other_x_axes_and_smoothing(runs, tmp_path, x):
    out = tmp_path / f"{x}.png"
    extra = ["--tokens-per-step", str(TOKENS_PER_STEP)] if x == "tokens" else []
    assert plot_runs.main(list(runs) + ["--x", x, "--smooth", "5", "--output", str(out)] + extra) == 0
    assert _png_size(out) == plot_runs.figure_size_px(4)


def test_x_coordinates_follow_the_axis(runs):
    run = plot_runs.read_scalars(runs[0])
    steps = np.array([10, 20])
    assert plot_runs.x_of(steps, run, "tokens", TOKENS_PER_STEP, runs[0]).tolist() == [10 * 2048, 20 * 2048]
    assert plot_runs.x_of(steps, run, "time", None, runs[0]).tolist() == [5.0, 10.0]  # elapsed-s = 0.5 s a step


def test_a_single_run_without_validation_draws_three_panels(runs, tmp_path):
    out = tmp_path / "one.png"
    assert plot_runs.main([runs[1], "--output", str(out)]) == 0
    assert _png_size(out) == plot_runs.figure_size_px(3) == (1200, 700)


# ---- bad input: one line, exit 2 ------------------------------------------------------------------------

def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_directory_without_event_files(runs, tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert plot_runs.main([runs[0], str(empty), "--output", str(tmp_path / "x.png")]) == 2
    assert str(empty) in _one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


def test_missing_directory(tmp_path, capsys):
    assert plot_runs.main([str(tmp_path / "nope"), "--output", str(tmp_path / "x.png")]) == 2
    assert "nope: no such directory" in _one_error_line(capsys)


def test_labels_must_match_the_runs(runs, tmp_path, capsys):
    assert plot_runs.main(list(runs) + ["--labels", "only-one", "--output", str(tmp_path / "x.png")]) == 2
    assert "--labels gives 1 label(s) for 2 RUN_DIR(s)" in _one_error_line(capsys)


def test_tokens_axis_needs_tokens_per_step(runs, tmp_path, capsys):
    assert plot_runs.main([runs[0], "--x", "tokens", "--output", str(tmp_path / "x.png")]) == 2
    assert "--tokens-per-step" in _one_error_line(capsys)


def test_without_matplotlib_the_tool_says_how_to_install_it(runs, tmp_path):
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as if not installed.
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['tools/plot_runs.py', {runs[0]!r}, '--output', {str(tmp_path / 'x.png')!r}]; "
            "runpy.run_path('tools/plot_runs.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr == plot_runs.MATPLOTLIB_MISSING + "\n"
    assert not (tmp_path / "x.png").exists()
