"""Pipeline schedules as data, and the executor that runs one.

A schedule is a pure function of (P stages, V chunks per rank, M micro-batches, this rank) that
returns the rank's ordered list of actions, ``Action("F", microbatch, chunk)`` or
``Action("B", microbatch, chunk)``; tests read the order from it directly. ``run_schedule``
executes such a list, moving activations and gradients with ``PipelineP2P``.

- No pipelining (P = 1): F0 B0 F1 B1 ... (gradient accumulation, one activation set alive).
- 1F1B: rank r runs P - r - 1 warm-up forwards, then alternates one forward and one backward,
  then drains the remaining backwards. At most P - r micro-batches are in flight on rank r,
  instead of M with all-forwards-then-all-backwards (GPipe); the bubble is (P-1)/(M+P-1).
- Interleaved 1F1B: each rank holds V chunks (virtual stages c * P + r). Forwards go through the
  micro-batches in groups of P per chunk: (mb 0..P-1, chunk 0), (mb 0..P-1, chunk 1), ...,
  (mb P..2P-1, chunk 0), ...; backwards do the same from the last chunk down. Rank r warms up with
  (P - r - 1) * 2 + (V - 1) * P forwards. The bubble shrinks by V; M must be a multiple of P.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from megatron_ds.parallel.pipeline.p2p import PipelineP2P


class Action(NamedTuple):
    kind: str
    """'F' (forward) or 'B' (backward)."""
    microbatch: int
    """Index of the micro-batch in the global batch of this DP rank."""
    chunk: int = 0
    """Model chunk on this rank (virtual stage chunk * P + rank); 0 without interleaving."""

    def __repr__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def no_pipelining_schedule(num_microbatches: int, forward_only: bool = False) -> list[Action]:
    """Each micro-batch forward then backward: plain gradient accumulation."""
    out = []
    for m in range(num_microbatches):
        out.append(Action("F", m))
        if not forward_only:
            out.append(Action("B", m))
    return out


def one_f_one_b_schedule(pp_size: int, num_microbatches: int, pp_rank: int, forward_only: bool = False) -> list[Action]:
    """1F1B (PipeDream-Flush) on stage ``pp_rank`` of ``pp_size``."""
    m_total = num_microbatches
    if forward_only:
        return [Action("F", m) for m in range(m_total)]
    warmup = min(pp_size - pp_rank - 1, m_total)
    out = [Action("F", m) for m in range(warmup)]
    for i in range(m_total - warmup):  # steady state: the forward of one micro-batch, the backward of the oldest
        out += [Action("F", warmup + i), Action("B", i)]
    out += [Action("B", m) for m in range(m_total - warmup, m_total)]  # cool-down
    return out


def interleaved_warmup(pp_size: int, num_chunks: int, num_microbatches: int, pp_rank: int) -> int:
    """Forwards rank ``pp_rank`` runs before its first backward in the interleaved schedule."""
    total = num_microbatches * num_chunks
    if num_microbatches == pp_size:  # too few micro-batches to overlap anything: all forwards, then all backwards
        return total
    return min((pp_size - pp_rank - 1) * 2 + (num_chunks - 1) * pp_size, total)


def interleaved_1f1b_schedule(pp_size: int, num_chunks: int, num_microbatches: int, pp_rank: int,
                              forward_only: bool = False) -> list[Action]:
    """Interleaved 1F1B with ``num_chunks`` virtual stages per rank (Megatron's order)."""
    p, v, m_total = pp_size, num_chunks, num_microbatches
    if m_total % p != 0:
        raise ValueError(f"the interleaved schedule needs the micro-batch count ({m_total}) to be a multiple of "
                         f"the pipeline size ({p})")
    total = m_total * v

    def forward_action(k: int) -> Action:
        # k-th forward: groups of P micro-batches, cycling over the chunks.
        in_group = k % (p * v)
        return Action("F", (k // (p * v)) * p + in_group % p, in_group // p)

    def backward_action(k: int) -> Action:
        f = forward_action(k)
        return Action("B", f.microbatch, v - 1 - f.chunk)  # backwards walk the chunks last to first

    if forward_only:
        return [forward_action(k) for k in range(total)]
    warmup = interleaved_warmup(p, v, m_total, pp_rank)
    out = [forward_action(k) for k in range(warmup)]
    for i in range(total - warmup):
        out += [forward_action(warmup + i), backward_action(i)]
    out += [backward_action(k) for k in range(total - warmup, total)]
    return out


def build_schedule(pp_size: int, num_chunks: int, num_microbatches: int, pp_rank: int,
                   forward_only: bool = False) -> list[Action]:
    """The schedule the trainer runs: no pipelining, 1F1B, or interleaved 1F1B when there are several chunks."""
    if pp_size == 1:
        if num_chunks != 1:
            raise ValueError("model chunks (interleaving) need more than one pipeline stage")
        return no_pipelining_schedule(num_microbatches, forward_only)
    if num_chunks == 1:
        return one_f_one_b_schedule(pp_size, num_microbatches, pp_rank, forward_only)
    return interleaved_1f1b_schedule(pp_size, num_chunks, num_microbatches, pp_rank, forward_only)


def _backward(output: torch.Tensor, output_grad: Optional[torch.Tensor]) -> None:
    if output_grad is None:  # the last stage: output is the scalar loss share
        output.backward()
        return
    # output.data was freed after sending (see run_schedule), so torch.autograd.backward's shape
    # check would fail; the engine itself checks output_grad against the shape recorded in grad_fn.
    torch.autograd.Variable._execution_engine.run_backward(
        (output,), (output_grad,), False, False, (), True, True)  # keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad


def exchange_steps(actions: list[Action], pp_size: int = 1, num_chunks: int = 1, pp_rank: int = 0) -> list[list[int]]:
    """Indices of ``actions`` grouped into steps; the ranks exchange tensors once after each step.

    Without interleaving every action is a step: 1F1B sends each result at once and receives what
    the next action needs (Megatron's send_forward_recv_backward / send_backward_recv_forward).
    With interleaving each steady-state forward and the backward after it form one step, whose
    sends and receives go out as one batch (Megatron's send_forward_backward_recv_forward_backward).
    Exchanging after each of the two instead is fine for gloo, which buffers sends, but under NCCL,
    where a batch only ends once its sends are received, the ranks then wait on each other in a
    cycle (tests/pipeline/test_nccl_order.py replays the traffic under NCCL's rules). The last
    warm-up forward stays alone even when a backward follows it (all-warm-up schedules): that
    backward's gradient depends on the forward, so the two cannot share a step.
    """
    steps: list[list[int]] = [[i] for i in range(len(actions))]
    forwards = sum(a.kind == "F" for a in actions)
    if num_chunks == 1 or forwards == len(actions):
        return steps
    warmup = interleaved_warmup(pp_size, num_chunks, forwards // num_chunks, pp_rank)
    steady = forwards - warmup  # (F, B) pairs after the warm-up forwards
    paired = [[warmup + 2 * k, warmup + 2 * k + 1] for k in range(steady)]
    if any(actions[f].kind != "F" or actions[b].kind != "B" for f, b in paired):
        raise ValueError(f"not an interleaved 1F1B order (no F/B alternation after {warmup} warm-up forwards): "
                         f"{actions}")
    return steps[:warmup] + paired + steps[warmup + 2 * steady:]


def run_schedule(actions: list[Action], forward_step: Callable[[int, int, Optional[torch.Tensor]], torch.Tensor], *,
                 pp_rank: int = 0, pp_size: int = 1, num_chunks: int = 1, p2p: Optional[PipelineP2P] = None,
                 before_backward: Optional[Callable[[int, bool], None]] = None) -> torch.Tensor:
    """Run ``actions`` on this rank; returns the sum of the loss shares computed here (zero off the last stage).

    ``forward_step(chunk, microbatch, input)`` runs one chunk on one micro-batch: ``input`` is the
    received activation (None on the first virtual stage) and it returns the activation to send,
    or on the last virtual stage the scalar loss share to back-propagate.
    ``before_backward(chunk, is_last)`` runs before each backward; ``is_last`` marks the chunk's
    last backward of the step (where its DP gradient reduction may start).
    """
    def first(chunk: int) -> bool:
        return pp_rank == 0 and chunk == 0

    def last(chunk: int) -> bool:
        return pp_rank == pp_size - 1 and chunk == num_chunks - 1

    if pp_size > 1 and p2p is None:
        raise ValueError("a pipeline schedule needs a PipelineP2P")
    last_backward = {a.chunk: i for i, a in enumerate(actions) if a.kind == "B"}
    inputs: dict[tuple[int, int], Optional[torch.Tensor]] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    total_loss = None
    steps = exchange_steps(actions, pp_size, num_chunks, pp_rank)

    def exchange(send_next=None, send_prev=None, upcoming: Optional[list[int]] = None):
        """Send this step's results and receive what the ``upcoming`` step needs, in one batch."""
        if p2p is None:
            return None, None
        step = [actions[j] for j in upcoming] if upcoming is not None else []
        recv_prev = any(a.kind == "F" and not first(a.chunk) for a in step)
        recv_next = any(a.kind == "B" and not last(a.chunk) for a in step)
        return p2p.exchange(send_next, send_prev, recv_prev, recv_next)

    act_in, grad_in = exchange(upcoming=steps[0] if steps else None)
    for s, step in enumerate(steps):
        send_next = send_prev = None
        for i in step:
            action = actions[i]
            key = (action.microbatch, action.chunk)
            if action.kind == "F":
                x, act_in = act_in, None
                if x is not None and torch.is_grad_enabled():
                    x.requires_grad_()
                y = forward_step(action.chunk, action.microbatch, x)
                if last(action.chunk):
                    total_loss = y.detach() if total_loss is None else total_loss + y.detach()
                else:
                    send_next = y.detach()
                if y.requires_grad:
                    inputs[key], outputs[key] = x, y
                    if send_next is not None:
                        # Free the activation: backward needs only y's grad_fn, and the send keeps its own
                        # reference to the storage until the next stage has it.
                        y.data = torch.empty((1,), dtype=y.dtype, device=y.device)
            else:
                if before_backward is not None:
                    before_backward(action.chunk, last_backward[action.chunk] == i)
                x, y = inputs.pop(key), outputs.pop(key)
                output_grad, grad_in = grad_in, None
                _backward(y, None if last(action.chunk) else output_grad)
                send_prev = x.grad if not first(action.chunk) else None
                del x, y, output_grad
        act_in, grad_in = exchange(send_next, send_prev, upcoming=steps[s + 1] if s + 1 < len(steps) else None)
    if p2p is not None:
        p2p.wait_sends()
    assert not outputs, f"schedule left forwards without backwards: {sorted(outputs)}"
    if total_loss is None:
        return torch.zeros((), dtype=torch.float32)
    return total_loss.float()
