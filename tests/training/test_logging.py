"""What a person watching a run sees: one rank's log lines with throughput, MFU and ETA, a progress bar
on a terminal, and the same quantities in TensorBoard."""

import io

import pytest

from megatron_ds import flops
from megatron_ds.config import config_from_args
from megatron_ds.parallel.topology import single_process_state
from megatron_ds.pretrain import run
from megatron_ds.training.logger import ProgressBar, RunLogger, format_duration
from tests.training.test_trainer_parity import FLAGS


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 37.4, 153, 3600 + 5 * 60 + 9, 3 * 86400 + 4 * 3600)] == \
        ["0s", "37s", "2m33s", "1h05m", "3d04h"]


def test_progress_bar_by_hand():
    bar = ProgressBar(300, width=20)
    # 83 of 300 done; the 80 steps since the clock started (at step 3) took 56 s: 0.7 s a step,
    # 217 steps left -> 151.9 s.
    assert bar.eta_s(83, 3, 56.0) == pytest.approx(151.9)
    line = bar.render(83, 3, 56.0, loss=4.8123)
    assert line == "[#####---------------]  83/300  27.7% | 1.43 it/s | ETA 2m32s | loss 4.812"
    assert bar.render(3, 3, 0.0).endswith("1.0%")  # no rate or ETA before a step has been timed


def test_bar_on_a_terminal_is_cleared_before_each_log_line():
    out = FakeTerminal()
    log = RunLogger(True, None, 10, stream=out)
    for it in range(1, 5):
        log.progress(it, loss=1.0)
    log.step(4, {"lm loss": 1.0})
    log.close()
    text = out.getvalue()
    assert text.count("\r\033[2K[") == 3  # redrawn after each step but the first (which starts the clock)
    line = text.split("\r\033[2K")[-1]  # the log line starts on a cleared line, not after the bar
    assert line.startswith("iter      4/10 | lm loss 1.0000 | elapsed ") and "ETA " in line and line.endswith("\n")


def test_no_bar_off_a_terminal_and_nothing_from_other_ranks():
    out = io.StringIO()
    log = RunLogger(True, None, 10, stream=out)
    for it in range(1, 4):
        log.progress(it)
    log.step(3, {"lm loss": 2.0})
    assert "\r" not in out.getvalue() and out.getvalue().count("\n") == 1
    quiet = io.StringIO()
    other = RunLogger(False, None, 10, stream=quiet)
    other.progress(1)
    other.step(1, {"lm loss": 2.0})
    other.info("x")
    assert quiet.getvalue() == ""


def test_log_line_and_tensorboard_carry_throughput_mfu_and_memory(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = 4
    cfg = config_from_args([f if f != "20" else str(steps) for f in FLAGS] +
                           ["--train-iters", str(steps), "--log-interval", "2", "--peak-tflops", "0.5",
                            "--tensorboard-dir", str(tmp_path / "tb")])
    run(cfg, single_process_state(), log=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("iter")]
    assert len(lines) == 2
    fields = dict(part.rsplit(" ", 1) for part in lines[-1].split(" | ")[1:])
    tokens_per_s = float(fields["tokens/s"])
    # TFLOP/s per device = model FLOPs per token x tokens/s / devices; MFU = that / --peak-tflops.
    per_token = flops.training_flops_per_token(cfg.model, cfg.training.seq_length)
    tflops = float(fields["TFLOP/s per device"])
    assert tflops == pytest.approx(per_token * tokens_per_s / 1e12, rel=0.01)  # the line rounds to 3 digits
    assert float(fields["MFU"].rstrip("%")) / 100 == pytest.approx(tflops / 0.5, abs=0.001)
    assert float(fields["peak memory GiB"]) > 0 and "ETA" in fields

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lm-loss", "lr", "tokens/s", "TFLOP/s-per-device", "MFU", "peak-memory-GiB"} <= tags
    mfu = [e.value for e in acc.Scalars("MFU")]
    tput = [e.value for e in acc.Scalars("TFLOP/s-per-device")]
    assert len(mfu) == 2 and mfu[-1] == pytest.approx(tput[-1] / 0.5, rel=1e-5)
