"""Run logs for people and for TensorBoard, from one rank (rank 0; every other rank's logger is off).

- Every --log-interval steps: one line with the step, the logged quantities, the elapsed time and
  the ETA of the run (remaining steps at the mean step time since the first step of this process).
- On a terminal, between those lines, a progress bar redrawn in place after every step:
      [########--------------------]  83/300  27.7% | 1.42 it/s | ETA 2m33s | loss 4.812
  Log lines are printed over it and it is redrawn under them, so the two never interleave. When
  stdout is not a terminal (a log file, CI) the bar is left out and only the lines are written.
- TensorBoard scalars for every logged quantity (names with spaces -> dashes) when --tensorboard-dir.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Optional, TextIO

# How each logged quantity reads best; others get 4 decimals.
_FORMATS = {"lr": "{:.3e}", "grad norm": "{:.3f}", "tokens/s": "{:.0f}", "TFLOP/s per device": "{:.3g}",
            "MFU": "{:.1%}", "peak memory GiB": "{:.2f}"}


def format_duration(seconds: float) -> str:
    """37s, 2m33s, 1h05m, 3d04h: two units at most, as a person reads an ETA."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class ProgressBar:
    """The run's progress as one terminal line; ``render`` is pure so tests read it directly."""

    def __init__(self, total: int, width: int = 28):
        self.total, self.width = max(total, 1), width

    def eta_s(self, done: int, start: int, seconds: float) -> Optional[float]:
        """Remaining time at the mean step time of the ``done - start`` steps run in ``seconds``."""
        if done <= start:
            return None
        return (self.total - done) * seconds / (done - start)

    def render(self, done: int, start: int, seconds: float, loss: Optional[float] = None) -> str:
        filled = self.width * min(done, self.total) // self.total
        parts = [f"[{'#' * filled}{'-' * (self.width - filled)}] {done:>{len(str(self.total))}d}/{self.total} "
                 f"{100.0 * done / self.total:5.1f}%"]
        eta = self.eta_s(done, start, seconds)
        if eta is not None:
            parts.append(f"{(done - start) / max(seconds, 1e-9):.2f} it/s")
            parts.append(f"ETA {format_duration(eta)}")
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        return " | ".join(parts)


class RunLogger:
    """Prints and writes scalars only where ``enabled`` (one rank); elsewhere every call is a no-op."""

    def __init__(self, enabled: bool, tensorboard_dir: str | None, total_iters: int, stream: TextIO | None = None,
                 progress_bar: Optional[bool] = None):
        self.enabled = enabled
        self.total_iters = total_iters
        self.stream = stream or sys.stdout
        # The bar only where a person watches: a terminal, unless told otherwise.
        self.show_bar = enabled and (progress_bar if progress_bar is not None else self.stream.isatty())
        self.bar = ProgressBar(total_iters)
        self.start = time.time()
        self._first_step: Optional[tuple[int, float]] = None  # (iteration, time) of the first step seen
        self._bar_shown = False
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: costs ~1 s

            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    # -- terminal ------------------------------------------------------------------------------

    def _print(self, line: str) -> None:
        if self._bar_shown:  # clear the bar's line first, so the log line does not mix with it
            self.stream.write("\r\033[2K")
            self._bar_shown = False
        self.stream.write(line + "\n")
        self.stream.flush()

    def _eta(self, iteration: int) -> Optional[float]:
        if self._first_step is None:
            return None
        start_iter, start_time = self._first_step
        return self.bar.eta_s(iteration, start_iter, time.time() - start_time)

    def info(self, msg: str) -> None:
        if self.enabled:
            self._print(msg)

    def progress(self, iteration: int, loss: Optional[float] = None) -> None:
        """After every step: start the ETA clock at the first one, redraw the bar on a terminal."""
        if not self.enabled:
            return
        if self._first_step is None:
            # The ETA counts from the end of the first step: it excludes start-up and the first
            # step's one-off costs (allocator warm-up, lazy initialization).
            self._first_step = (iteration, time.time())
            return
        if self.show_bar:
            start_iter, start_time = self._first_step
            line = self.bar.render(iteration, start_iter, time.time() - start_time, loss)
            cols = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r\033[2K" + line[:cols - 1])
            self.stream.flush()
            self._bar_shown = True

    # -- periodic lines and TensorBoard ----------------------------------------------------------

    def step(self, iteration: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        parts = [f"iter {iteration:>6d}/{self.total_iters}"]
        for k, v in scalars.items():
            parts.append(f"{k} {_FORMATS.get(k, '{:.4f}').format(v)}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        eta = self._eta(iteration)
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        self._print(" | ".join(parts))
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k.replace(" ", "-"), v, iteration)
            self.writer.add_scalar("elapsed-s", elapsed, iteration)

    def scalar(self, name: str, value: float, iteration: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.enabled:
            self.stream.flush()
