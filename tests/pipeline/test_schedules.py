"""The schedules themselves, read from the action lists (not from timing)."""

import pytest

from megatron_ds.parallel.pipeline.schedules import (
    Action, build_schedule, interleaved_1f1b_schedule, no_pipelining_schedule, one_f_one_b_schedule,
)


def _parse(text: str) -> list[Action]:
    """'F0 F1.1 B0' -> actions; '.c' is the model chunk (0 when absent)."""
    out = []
    for tok in text.split():
        mb, _, chunk = tok[1:].partition(".")
        out.append(Action(tok[0], int(mb), int(chunk or 0)))
    return out


# P = 4, M = 8, written out by hand: rank r warms up with P - r - 1 forwards, then one forward and
# one backward in turn, then the remaining backwards.
EXPECTED_1F1B = {
    0: "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
    1: "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
    2: "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
    3: "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
}

# P = 4, V = 2 chunks, M = 8. Forwards take micro-batches in groups of P per chunk:
# (0-3, chunk 0) (0-3, chunk 1) (4-7, chunk 0) (4-7, chunk 1); backwards the same groups from the
# last chunk down. Rank r warms up with 2 (P - r - 1) + (V - 1) P forwards (10, 8, 6, 4).
FWD = "F0 F1 F2 F3 F0.1 F1.1 F2.1 F3.1 F4 F5 F6 F7 F4.1 F5.1 F6.1 F7.1".split()
BWD = "B0.1 B1.1 B2.1 B3.1 B0 B1 B2 B3 B4.1 B5.1 B6.1 B7.1 B4 B5 B6 B7".split()


def _interleaved_expectation(warmup: int) -> str:
    steady = len(FWD) - warmup
    order = FWD[:warmup]
    for i in range(steady):
        order += [FWD[warmup + i], BWD[i]]
    return " ".join(order + BWD[steady:])


EXPECTED_INTERLEAVED = {0: _interleaved_expectation(10), 1: _interleaved_expectation(8),
                        2: _interleaved_expectation(6), 3: _interleaved_expectation(4)}
# Spelled out for one rank, so the helper above is not the only statement of the order:
assert EXPECTED_INTERLEAVED[3] == ("F0 F1 F2 F3 F0.1 B0.1 F1.1 B1.1 F2.1 B2.1 F3.1 B3.1 F4 B0 F5 B1 F6 B2 F7 B3 "
                                   "F4.1 B4.1 F5.1 B5.1 F6.1 B6.1 F7.1 B7.1 B4 B5 B6 B7")


@pytest.mark.parametrize("rank", range(4))
def test_1f1b_order_p4_m8(rank):
    actions = one_f_one_b_schedule(4, 8, rank)
    assert actions == _parse(EXPECTED_1F1B[rank])
    # P - rank - 1 warm-up forwards before the first backward.
    assert [a.kind for a in actions].index("B") == 4 - rank


@pytest.mark.parametrize("rank", range(4))
def test_interleaved_order_p4_v2_m8(rank):
    actions = interleaved_1f1b_schedule(4, 2, 8, rank)
    assert actions == _parse(EXPECTED_INTERLEAVED[rank])
    assert [a.kind for a in actions].index("B") == 2 * (4 - rank - 1) + 4 + 1


def test_no_pipelining_is_gradient_accumulation():
    assert no_pipelining_schedule(3) == _parse("F0 B0 F1 B1 F2 B2")
    assert build_schedule(1, 1, 3, 0, forward_only=True) == _parse("F0 F1 F2")


def test_interleaved_needs_a_multiple_of_p_microbatches():
    with pytest.raises(ValueError, match="multiple of the pipeline size"):
        interleaved_1f1b_schedule(4, 2, 6, 0)


def _simulate(p: int, v: int, m: int) -> None:
    """Run every rank's list against the pipeline's data dependencies, with sends that never block
    (as in PipelineP2P): an action may run once its input exists. Fails on a deadlock."""
    lists = [build_schedule(p, v, m, r) for r in range(p)]
    done, pos = set(), [0] * p

    def ready(r: int, a: Action) -> bool:
        stage = a.chunk * p + r  # virtual stage
        if a.kind == "F":
            return stage == 0 or ("F", a.microbatch, stage - 1) in done
        own_forward = ("F", a.microbatch, stage) in done
        return own_forward and (stage == p * v - 1 or ("B", a.microbatch, stage + 1) in done)

    while any(pos[r] < len(lists[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            if pos[r] < len(lists[r]) and ready(r, lists[r][pos[r]]):
                a = lists[r][pos[r]]
                done.add((a.kind, a.microbatch, a.chunk * p + r))
                pos[r] += 1
                progressed = True
        assert progressed, f"P={p} V={v} M={m}: deadlock at {[lists[r][pos[r]] if pos[r] < len(lists[r]) else None for r in range(p)]}"
    assert len(done) == 2 * p * v * m  # every micro-batch forward and backward on every virtual stage


@pytest.mark.parametrize("p,v,m", [(2, 1, 1), (2, 1, 5), (4, 1, 2), (4, 1, 8), (3, 1, 7),
                                   (2, 2, 2), (2, 2, 6), (4, 2, 4), (4, 2, 8), (4, 3, 12), (3, 2, 9)])
def test_every_schedule_runs_to_completion(p, v, m):
    _simulate(p, v, m)


class _FakeP2P:
    """Stage 0 of 2 without a peer: records what is sent, hands back a fixed output gradient."""

    def __init__(self, grad: "torch.Tensor", outputs: list):
        self.grad, self.outputs, self.sent = grad, outputs, []

    def exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        if send_next is not None:
            # The activation just sent is freed on this side (its autograd graph stays alive).
            assert self.outputs[-1].numel() == 1 and send_next.shape == self.grad.shape
            self.sent.append(send_next.clone())
        assert not recv_prev and send_prev is None  # stage 0 has no previous stage
        return None, (self.grad.clone() if recv_next else None)

    def wait_sends(self):
        pass


def test_executor_frees_sent_outputs_and_backpropagates_through_them():
    import torch

    from megatron_ds.parallel.pipeline.schedules import run_schedule

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    inputs = [torch.randn(3, 4) for _ in range(3)]
    grad = torch.randn(3, 4)
    outputs, calls = [], []

    def forward_step(chunk, m, x):
        assert x is None  # the first stage reads its micro-batch itself
        calls.append(m)
        outputs.append(layer(inputs[m]))
        return outputs[-1]

    p2p = _FakeP2P(grad, outputs)
    actions = one_f_one_b_schedule(2, 3, 0)
    run_schedule(actions, forward_step, pp_rank=0, pp_size=2, p2p=p2p)
    assert calls == [0, 1, 2] and len(p2p.sent) == 3
    for m, sent in enumerate(p2p.sent):
        assert torch.equal(sent, torch.nn.functional.linear(inputs[m], layer.weight, layer.bias).detach())
    # d/dW sum_m <grad, W x_m + b> = sum_m grad^T x_m
    expected = sum(grad.t() @ x for x in inputs)
    torch.testing.assert_close(layer.weight.grad, expected)
