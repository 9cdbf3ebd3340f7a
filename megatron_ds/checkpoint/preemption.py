"""SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C) turned into a final save at a step boundary.

A signal handler must not save by itself: it runs between two bytecodes of whatever the main
thread was doing, possibly inside a collective. It only sets a flag; the training loop asks at
each step boundary, all ranks agree (a rank that missed the signal still stops with the others),
then the loop saves, waits for the writer and exits:

    preemption = PreemptionHandler().install()
    for step in ...:
        train_step()
        if preemption.agreed(group=None):             # collective: every rank, every step
            save_checkpoint(..., writer=writer); writer.wait(); break
    preemption.restore()
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist


class PreemptionHandler:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> "PreemptionHandler":
        """Install the flag-setting handler (main thread only, as Python requires)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            # A second Ctrl-C means "now": do not make the user wait for the save.
            raise KeyboardInterrupt
        self.received = signum

    @property
    def requested(self) -> bool:
        """This rank got a signal."""
        return self.received is not None

    def agreed(self, group=None, device=None) -> bool:
        """Collective: True on every rank once any rank got a signal (MAX all-reduce of the flag;
        ``device`` is the one the backend communicates on: cuda under NCCL)."""
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())


class StopTraining(Exception):
    """Raised by a training loop's step callback to end the run at this step boundary (all ranks
    agreed, e.g. on a preemption signal); the caller catches it, saves and exits cleanly."""

    def __init__(self, reason: str = "stop requested", signum: Optional[int] = None):
        super().__init__(reason)
        self.reason, self.signum = reason, signum
