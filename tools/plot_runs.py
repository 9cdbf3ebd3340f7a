"""Loss, learning-rate and throughput curves of one or several runs, from their TensorBoard logs, in one PNG.

    python tools/plot_runs.py tb/multistep tb/cosine --labels multistep cosine --output lr-schedules.png
    python tools/plot_runs.py tb/tp2-pp2 tb/tp4 --x time --smooth 10 --output layouts.png
    python tools/plot_runs.py tb/run --x tokens --tokens-per-step 4718592 --output run.png

Each RUN_DIR is a run's --tensorboard-dir (all its event files: a resumed run's later values win).
One panel per quantity that at least one run logged, in this order: train loss, validation loss,
learning rate, throughput (tokens/s), grad norm, model TFLOP/s per device, MFU, peak memory,
validation bits per byte. The x axis is the iteration,
the tokens consumed (iteration x --tokens-per-step, which is global batch x sequence length; one value,
or one per run), or the wall-clock seconds of the run (its logged "elapsed-s"). --smooth N draws the
trailing mean of N logged points for the noisy per-step quantities (train loss, grad norm, throughput,
TFLOP/s, MFU; never the LR or a validation value).

matplotlib is an extra: pip install 'megatron-ds[plot]'. Bad input ends in one line on stderr and exit
code 2; the PNG is written to a temporary file beside --output and renamed, so it is never half-written.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

MATPLOTLIB_MISSING = "error: tools/plot_runs.py needs matplotlib (pip install 'megatron-ds[plot]')"


class PlotError(Exception):
    """Bad input: the message is the one line the user sees."""


@dataclass(frozen=True)
class Panel:
    tags: tuple[str, ...]
    """TensorBoard scalar names, first present wins (the trainer writes "lm loss" as "lm-loss")."""
    title: str
    smooth: bool
    """Whether --smooth applies: noisy per-step quantities, not the LR or the held-out loss."""
    log_y: bool = False


# The names the trainer's RunLogger writes (a step scalar's spaces become dashes; "tokens/s" keeps
# its slash; scalars logged once per evaluation keep their spaces). DPO runs log their loss by type.
PANELS = (
    Panel(("lm-loss", "dpo-loss", "ipo-loss"), "train loss", smooth=True),
    Panel(("validation lm loss", "validation loss"), "validation loss", smooth=False),
    Panel(("lr",), "learning rate", smooth=False),
    Panel(("tokens/s",), "throughput (tokens/s)", smooth=True),
    Panel(("grad-norm",), "grad norm", smooth=True, log_y=True),
    Panel(("TFLOP/s-per-device",), "model TFLOP/s per device", smooth=True),
    Panel(("MFU",), "MFU", smooth=True),
    Panel(("peak-memory-GiB",), "peak memory (GiB)", smooth=False),
    Panel(("validation bits per byte",), "validation bits per byte", smooth=False),
)
ELAPSED_TAG = "elapsed-s"

# The figure: two panels a row, each 6 x 3.5 inches at 100 dpi (tests read the PNG size from this).
COLUMNS, PANEL_INCHES, DPI = 2, (6.0, 3.5), 100


@dataclass
class Series:
    steps: np.ndarray
    """int64 iterations, increasing, each once."""
    values: np.ndarray
    """float64, one per step."""


def figure_size_px(num_panels: int) -> tuple[int, int]:
    """(width, height) of the PNG in pixels for ``num_panels`` panels."""
    rows = math.ceil(num_panels / COLUMNS)
    return round(COLUMNS * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def read_scalars(run_dir: str) -> dict[str, Series]:
    """Every scalar of a run's TensorBoard event files, by tag.

    A resumed run writes a new event file that repeats the steps after its checkpoint; the value
    written last (by wall time) wins for each step.
    """
    if not os.path.isdir(run_dir):
        raise PlotError(f"{run_dir}: no such directory (pass a run's --tensorboard-dir)")
    if not glob.glob(os.path.join(run_dir, "*tfevents*")):
        raise PlotError(f"{run_dir}: no TensorBoard event files (events.out.tfevents.*) in it; "
                        f"pass the directory given to --tensorboard-dir")
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={SCALARS: 0})  # 0: keep every point, not a sample
    acc.Reload()
    out = {}
    for tag in acc.Tags()[SCALARS]:
        last: dict[int, tuple[float, float]] = {}  # step -> (wall time, value)
        for ev in acc.Scalars(tag):
            if ev.step not in last or ev.wall_time >= last[ev.step][0]:
                last[ev.step] = (ev.wall_time, ev.value)
        steps = sorted(last)
        out[tag] = Series(np.array(steps, dtype=np.int64), np.array([last[s][1] for s in steps], dtype=np.float64))
    return out


def trailing_mean(values: np.ndarray, n: int) -> np.ndarray:
    """Mean of each point and the n-1 before it (fewer at the start)."""
    if n <= 1 or len(values) == 0:
        return values
    c = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(1, len(values) + 1)
    lo = np.maximum(i - n, 0)
    return (c[i] - c[lo]) / (i - lo)


def x_of(steps: np.ndarray, run: dict[str, Series], x: str, tokens_per_step: int | None, run_dir: str) -> np.ndarray:
    """The x coordinate of ``steps`` of one run."""
    if x == "iteration":
        return steps.astype(np.float64)
    if x == "tokens":
        return steps.astype(np.float64) * tokens_per_step
    elapsed = run.get(ELAPSED_TAG)
    if elapsed is None or len(elapsed.steps) == 0:
        raise PlotError(f"{run_dir}: no '{ELAPSED_TAG}' scalar for --x time (written every --log-interval "
                        f"by the trainer); use --x iteration")
    # Validation points fall between logged steps: the run's clock at those steps, interpolated.
    return np.interp(steps, elapsed.steps, elapsed.values)


def panels_present(runs: list[dict[str, Series]]) -> list[tuple[Panel, list[str | None]]]:
    """The panels some run has data for, with each run's tag for it (None: that run did not log it)."""
    out = []
    for panel in PANELS:
        tags = [next((t for t in panel.tags if t in run and len(run[t].steps)), None) for run in runs]
        if any(t is not None for t in tags):
            out.append((panel, tags))
    return out


def plot(run_dirs: list[str], labels: list[str], output: str, x: str = "iteration", smooth: int = 1,
         tokens_per_step: list[int] | None = None) -> list[str]:
    """Draw the runs into ``output`` (PNG); returns the titles of the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = [read_scalars(d) for d in run_dirs]
    panels = panels_present(runs)
    if not panels:
        known = ", ".join(t for p in PANELS for t in p.tags[:1])
        raise PlotError(f"{', '.join(run_dirs)}: none of the scalars this tool plots ({known}) was logged")
    tps = tokens_per_step or [None] * len(runs)
    if len(tps) == 1:
        tps = tps * len(runs)

    rows = math.ceil(len(panels) / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, squeeze=False, dpi=DPI,
                             figsize=(COLUMNS * PANEL_INCHES[0], rows * PANEL_INCHES[1]))
    xlabel = {"iteration": "iteration", "tokens": "tokens", "time": "seconds"}[x]
    for ax, (panel, tags) in zip(axes.flat, panels):
        for run, tag, label, d, tp in zip(runs, tags, labels, run_dirs, tps):
            if tag is None:
                continue
            s = run[tag]
            y = trailing_mean(s.values, smooth) if panel.smooth else s.values
            ax.plot(x_of(s.steps, run, x, tp, d), y, label=label, marker="o" if len(s.steps) < 20 else None,
                    markersize=3)
        ax.set_title(panel.title + (f" (mean of {smooth})" if panel.smooth and smooth > 1 else ""))
        ax.set_xlabel(xlabel)
        if panel.log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()

    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise PlotError(f"--output {output}: directory {out_dir} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".plot_runs.", suffix=".png.tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return [p.title for p, _ in panels]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's --tensorboard-dir; several to compare")
    p.add_argument("--labels", nargs="+", help="one legend label per RUN_DIR (default: the directory names)")
    p.add_argument("--output", "-o", default="curves.png", help="the PNG to write (default curves.png)")
    p.add_argument("--x", choices=("iteration", "tokens", "time"), default="iteration",
                   help="x axis: iteration, tokens consumed (needs --tokens-per-step), or wall-clock seconds")
    p.add_argument("--tokens-per-step", type=int, nargs="+", metavar="N",
                   help="global batch x sequence length, for --x tokens: one value, or one per RUN_DIR")
    p.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="trailing mean over N logged points of train loss, grad norm, throughput (default 1: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(MATPLOTLIB_MISSING, file=sys.stderr)
        return 2
    try:
        labels = args.labels or [os.path.basename(os.path.normpath(d)) or d for d in args.run_dirs]
        if len(labels) != len(args.run_dirs):
            raise PlotError(f"--labels gives {len(labels)} label(s) for {len(args.run_dirs)} RUN_DIR(s); "
                            f"give one per run")
        if args.smooth < 1:
            raise PlotError(f"--smooth {args.smooth}: must be 1 (no smoothing) or more")
        tps = args.tokens_per_step
        if args.x == "tokens":
            if not tps:
                raise PlotError("--x tokens needs --tokens-per-step (global batch x sequence length)")
            if len(tps) not in (1, len(args.run_dirs)) or min(tps) < 1:
                raise PlotError(f"--tokens-per-step: give one positive value, or one per RUN_DIR "
                                f"({len(args.run_dirs)})")
        panels = plot(args.run_dirs, labels, args.output, x=args.x, smooth=args.smooth, tokens_per_step=tps)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {', '.join(panels)} of {len(args.run_dirs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
