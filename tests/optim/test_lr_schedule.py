"""LR schedules: exact values at warmup, milestones and decay ends; steps vs tokens; continuation."""

import math

import pytest

from megatron_ds.config import config_from_args
from megatron_ds.optim.lr_schedule import LRSchedule

PEAK = 4.2e-4


def test_linear_warmup_counts_the_update_itself():
    s = LRSchedule(lr=PEAK, warmup_iters=2000, decay_iters=100_000)
    assert s(0) == PEAK / 2000
    assert s(999) == PEAK * 1000 / 2000
    assert s(1999) == PEAK
    assert s(2000) == PEAK


def test_multistep_drops_exactly_at_80_and_90_percent():
    s = LRSchedule(lr=PEAK, warmup_iters=2000, decay_iters=100_000, style="multistep")
    assert s(79_999) == PEAK
    assert s(80_000) == PEAK * 0.316
    assert s(89_999) == PEAK * 0.316
    assert s(90_000) == PEAK * 0.1
    assert s(99_999) == PEAK * 0.1


def test_multistep_with_other_milestones_and_factors():
    # The paper also tried 70/15/15 and 60/20/20 splits.
    s = LRSchedule(lr=1.0, warmup_iters=0, decay_iters=100, milestones=(0.7, 0.85), factors=(0.5, 0.25))
    assert [s(i) for i in (69, 70, 84, 85)] == [1.0, 0.5, 0.5, 0.25]


def test_multistep_over_tokens():
    # 7B: 9.44M tokens per step, 2T tokens: the first drop is at the step whose start passes 1.6T tokens.
    tps = 2304 * 4096
    s = LRSchedule(lr=PEAK, warmup_iters=2000 * tps, decay_iters=2e12, tokens_per_step=tps)
    first_drop = math.ceil(0.8 * 2e12 / tps)
    assert s(first_drop - 1) == PEAK and s(first_drop) == PEAK * 0.316
    assert s(0) == PEAK / 2000 and s(1999) == PEAK


def test_extending_the_budget_reuses_the_first_phase():
    short = LRSchedule(lr=PEAK, warmup_iters=100, decay_iters=10_000)
    longer = short.extend(15_000)
    reused = range(int(short.first_phase_end()))
    assert all(short(i) == longer(i) for i in reused)
    assert short(8_000) != longer(8_000)  # the short run has dropped; the extended one has not
    assert longer(12_000) == PEAK * 0.316
    with pytest.raises(ValueError):
        short.extend(5_000)


def test_cosine_ends_at_min_lr_and_passes_the_midpoint():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, style="cosine")
    assert s(10) == 1.0
    assert s(60) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)


@pytest.mark.parametrize("shape,mid", [("linear", 0.55), ("cosine", 0.55), ("1-sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.5)))])
def test_wsd_holds_the_peak_then_decays(shape, mid):
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, style="wsd", wsd_decay_iters=20,
                   wsd_decay_style=shape)
    assert s(9) == 1.0 and s(50) == 1.0 and s(90) == 1.0
    assert s(100) == pytest.approx(mid)
    assert s(110) == pytest.approx(0.1)


def test_constant_after_warmup():
    s = LRSchedule(lr=1.0, warmup_iters=4, decay_iters=10, style="constant")
    assert [s(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("style", ["multistep", "cosine", "constant", "wsd"])
def test_continuation_from_a_step_equals_the_uninterrupted_run(style):
    # The schedule is a pure function of the step: a run resumed at step 37 (a fresh object, as a
    # restarted process builds it) sees the values the uninterrupted run saw.
    kw = dict(lr=1e-3, min_lr=1e-5, warmup_iters=10, decay_iters=100, style=style, wsd_decay_iters=20)
    full = [LRSchedule(**kw)(i) for i in range(100)]
    resumed = LRSchedule(**kw)
    assert [resumed(i) for i in range(37, 100)] == full[37:]


def test_from_config_reads_the_flags():
    cfg = config_from_args(["--lr", "1e-3", "--lr-warmup-iters", "5", "--train-iters", "50",
                            "--lr-decay-milestones", "0.6,0.8", "--lr-decay-factors", "0.5,0.2"])
    s = LRSchedule.from_config(cfg.training)
    assert (s(4), s(29), s(30), s(40)) == (1e-3, 1e-3, 5e-4, 2e-4)
    cfg = config_from_args(["--global-batch-size", "8", "--seq-length", "128", "--lr-decay-tokens", "102400",
                            "--lr-warmup-tokens", "2048"])
    s = LRSchedule.from_config(cfg.training)  # 1024 tokens a step: warmup 2 steps, drops at steps 80, 90
    assert s.tokens_per_step == 1024
    assert (s(0), s(1), s(79), s(80), s(90)) == (5e-4, 1e-3, 1e-3, 0.316e-3, 1e-4)


def test_bad_schedules_are_one_line_errors():
    with pytest.raises(ValueError, match="lr-decay-style"):
        LRSchedule(lr=1.0, style="linear")
    with pytest.raises(ValueError, match="same length"):
        LRSchedule(lr=1.0, milestones=(0.8,), factors=(0.3, 0.1))
    with pytest.raises(ValueError, match="wsd-decay-iters"):
        LRSchedule(lr=1.0, decay_iters=10, style="wsd", wsd_decay_iters=0)
