"""Point-to-point transfers between neighbouring pipeline stages.

Activations go forward to the next stage, their gradients come back to the previous one. Every
tensor has the same shape, known ahead from the config: ``[s, b, h]`` ([s/tp, b, h] under sequence
parallelism: each TP rank sends its own sequence shard to the same TP rank of the next stage), so
no shape is ever exchanged.

With interleaving the neighbours wrap around: virtual stage c * P + P - 1 (rank P-1) feeds virtual
stage (c+1) * P (rank 0), so "next" of the last rank is rank 0 and "previous" of rank 0 is rank P-1.

Each exchange is one ``batch_isend_irecv`` of a step's sends and the next step's receives.
Receives are waited on at once (the next compute needs them); sends are not: they complete when
the peer gets round to receiving, and ``wait_sends`` collects them at the end of the step.

NCCL is stricter than gloo: it ignores tags (the k-th message from a to b is b's k-th receive
from a) and a batch only ends once its sends are received, so later batches wait behind it. The
schedules' steps are built for that (``schedules.exchange_steps``), and
tests/pipeline/test_nccl_order.py replays every rank's recorded traffic under those rules: no
rank waits in a cycle, and with 2 stages and interleaving (rank 0 sends both activations and
gradients to rank 1) every message is received as the kind it was sent as. The tags below only
label the two kinds for gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ds.parallel.topology import ParallelState

FORWARD_TAG = 1
"""Tag of activations (stage i -> i+1)."""
BACKWARD_TAG = 2
"""Tag of activation gradients (stage i+1 -> i)."""


class PipelineP2P:
    """Contract: ``exchange`` sends this rank's tensors [s(/tp), b, h] to its pipeline neighbours (global ranks
    from ``state.pp_ranks``, same TP and DP coordinates) and returns the ones it asked to receive."""

    def __init__(self, state: ParallelState, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.group = state.pp_group
        p, r = state.pp_size, state.pp_rank
        self.next_rank = state.pp_ranks[(r + 1) % p]
        self.prev_rank = state.pp_ranks[(r - 1) % p]
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []  # in flight; the tensor is kept alive until done

    def exchange(self, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                 recv_prev: bool = False, recv_next: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send activations forward / gradients backward, receive (activation from prev, gradient from next)."""
        sends, recvs = [], []
        if send_next is not None:
            sends.append(dist.P2POp(dist.isend, self._check(send_next), self.next_rank, self.group, tag=FORWARD_TAG))
        if send_prev is not None:
            sends.append(dist.P2POp(dist.isend, self._check(send_prev), self.prev_rank, self.group, tag=BACKWARD_TAG))
        from_prev = self._empty() if recv_prev else None
        from_next = self._empty() if recv_next else None
        if from_prev is not None:
            recvs.append(dist.P2POp(dist.irecv, from_prev, self.prev_rank, self.group, tag=FORWARD_TAG))
        if from_next is not None:
            recvs.append(dist.P2POp(dist.irecv, from_next, self.next_rank, self.group, tag=BACKWARD_TAG))
        if not sends and not recvs:
            return None, None
        works = dist.batch_isend_irecv(sends + recvs)
        for work, op in zip(works[:len(sends)], sends):
            self._sends.append((work, op.tensor))
        for work in works[len(sends):]:
            work.wait()
        # Drop the sends the peers have taken already, so their buffers are freed during the step.
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        return from_prev, from_next

    def wait_sends(self) -> None:
        """Block until every send of this step has been received (call once at the end of the schedule)."""
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    def _empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def _check(self, t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise RuntimeError(f"pipeline p2p: sending {tuple(t.shape)} {t.dtype}, every stage expects "
                               f"{self.shape} {self.dtype}")
        return t.contiguous()
