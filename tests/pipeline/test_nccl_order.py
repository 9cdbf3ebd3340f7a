"""The pipeline's point-to-point traffic is valid under NCCL's rules, not only gloo's.

Gloo matches a receive to a send by (peer, tag) and buffers sends, so almost any order works on
CPU. NCCL ignores tags and runs a rank's batches of send/recv in order on one stream: a batch ends
only when every op in it, sends included, has met its peer's op, and the k-th message from rank a
to rank b is whatever b receives k-th from a. So a schedule that passes on gloo can hang on GPUs,
or, with 2 stages and interleaving (rank 0's next and previous stage are both rank 1), hand an
activation to a receive that expects a gradient.

Each rank's batches are recorded from the real ``run_schedule`` and ``PipelineP2P`` (only the
``torch.distributed`` calls it makes are replaced by a recorder), then replayed under those rules:
every batch must complete, and every message must be received as the kind it was sent as.
"""

import types

import pytest
import torch

from megatron_ds.parallel.pipeline import p2p as p2p_module
from megatron_ds.parallel.pipeline.p2p import FORWARD_TAG, PipelineP2P
from megatron_ds.parallel.pipeline.schedules import build_schedule, run_schedule
from megatron_ds.parallel.topology import ParallelState

SHAPE = (2, 3)


class _Done:
    def wait(self):
        return True

    def is_completed(self):
        return True


def _record_rank(pp: int, chunks: int, microbatches: int, rank: int, forward_only: bool) -> list[list[tuple]]:
    """This rank's batches of (op, peer, kind) as PipelineP2P issues them, in order."""
    batches = []

    def recorder(ops):
        batch = []
        for op in ops:
            kind = "act" if op.tag == FORWARD_TAG else "grad"
            if op.op == "irecv":
                op.tensor.zero_()
            batch.append(("send" if op.op == "isend" else "recv", op.peer, kind))
        batches.append(batch)
        return [_Done() for _ in ops]

    def p2p_op(op, tensor, peer, group=None, tag=0):
        return types.SimpleNamespace(op=op, tensor=tensor, peer=peer, tag=tag)

    fake_dist = types.SimpleNamespace(isend="isend", irecv="irecv", P2POp=p2p_op, batch_isend_irecv=recorder)

    state = ParallelState(pp_size=pp, pp_rank=rank, pp_ranks=list(range(pp)))
    p2p = PipelineP2P(state, SHAPE, torch.float32, torch.device("cpu"))
    weights = [torch.ones(SHAPE, requires_grad=True) for _ in range(chunks)]

    def forward_step(chunk, microbatch, x):
        x = torch.ones(SHAPE) if x is None else x
        y = x * weights[chunk]
        return y.sum() if (rank == pp - 1 and chunk == chunks - 1) else y

    original = p2p_module.dist
    p2p_module.dist = fake_dist
    try:
        with torch.set_grad_enabled(not forward_only):
            run_schedule(build_schedule(pp, chunks, microbatches, rank, forward_only), forward_step,
                         pp_rank=rank, pp_size=pp, num_chunks=chunks, p2p=p2p)
    finally:
        p2p_module.dist = original
    return batches


def replay_under_nccl_rules(batches: list[list[list[tuple]]]) -> list[str]:
    """Problems found replaying every rank's batches: [] when all complete with kinds matched.

    Rank r works on batch ``at[r]``; its ops are posted. The j-th send a -> b meets b's j-th receive
    from a. An op completes once its partner is posted too (the ops of one NCCL group progress
    independently); a batch, when all its ops have; then the rank posts its next batch. No batch
    able to complete while some remain is a hang.
    """
    n = len(batches)
    # Global index of each op among the messages of its (src, dst) pair, and its partner's position.
    where = {}  # (src, dst, j, "send"|"recv") -> (rank, batch index, kind)
    for r, rank_batches in enumerate(batches):
        count = {}
        for bi, batch in enumerate(rank_batches):
            for op, peer, kind in batch:
                pair = (r, peer) if op == "send" else (peer, r)
                j = count.get((op, pair), 0)
                count[(op, pair)] = j + 1
                where[(*pair, j, op)] = (r, bi, kind)
    problems = []
    for (src, dst, j, op), (r, bi, kind) in where.items():
        other = where.get((src, dst, j, "recv" if op == "send" else "send"))
        if other is None:
            problems.append(f"message {j} from rank {src} to {dst}: {op} on rank {r} has no partner")
        elif op == "send" and other[2] != kind:
            problems.append(f"message {j} from rank {src} to {dst}: sent as {kind}, received as {other[2]}")
    if problems:
        return problems
    at = [0] * n
    completed = set()  # ops, as (src, dst, j, "send"|"recv"), whose partner has been posted

    def current_ops(r):
        return [key for key, (rank, bi, _) in where.items() if rank == r and bi == at[r]]

    while not all(at[r] == len(batches[r]) for r in range(n)):
        posted = {key for r in range(n) if at[r] < len(batches[r]) for key in current_ops(r)}
        for src, dst, j, op in posted:
            partner = (src, dst, j, "recv" if op == "send" else "send")
            if partner in posted:
                completed.update({(src, dst, j, op), partner})
        # A rank moves on once every op of its batch has completed (a batch is one NCCL group).
        ready = [r for r in range(n) if at[r] < len(batches[r]) and all(k in completed for k in current_ops(r))]
        if not ready:
            return [f"hang: rank {r} stuck at batch {at[r]} {batches[r][at[r]]}"
                    for r in range(n) if at[r] < len(batches[r])]
        for r in ready:
            at[r] += 1
    return []


CASES = [(pp, v, m) for pp in (2, 3, 4) for v in (1, 2, 3) for m in (pp, 2 * pp, 3 * pp)] + \
        [(2, 1, 1), (2, 1, 3), (4, 1, 2), (4, 1, 7)]


@pytest.mark.parametrize("forward_only", [False, True], ids=["train", "forward-only"])
@pytest.mark.parametrize("pp,chunks,microbatches", CASES, ids=[f"pp{p}-v{v}-m{m}" for p, v, m in CASES])
def test_schedule_traffic_obeys_nccl_ordering(pp, chunks, microbatches, forward_only):
    batches = [_record_rank(pp, chunks, microbatches, r, forward_only) for r in range(pp)]
    assert sum(len(b) for b in batches) > 0
    assert replay_under_nccl_rules(batches) == []


def test_exchanging_after_every_interleaved_action_would_hang(monkeypatch):
    """Why interleaving pairs each steady forward with its backward: exchanging after every action
    (as 1F1B does) is valid on gloo but under NCCL's rules the ranks wait on each other in a cycle."""
    from megatron_ds.parallel.pipeline import schedules

    monkeypatch.setattr(schedules, "exchange_steps", lambda actions, *args: [[i] for i in range(len(actions))])
    batches = [_record_rank(3, 2, 6, r, False) for r in range(3)]
    assert replay_under_nccl_rules(batches)[0].startswith("hang")


def test_replay_finds_a_hang_and_a_swapped_kind():
    """The replay can fail: two ranks that each send first and receive in a later batch hang under
    NCCL (gloo would buffer both sends); a gradient received as an activation is caught."""
    hang = [[[("send", 1, "act")], [("recv", 1, "grad")]],
            [[("send", 0, "grad")], [("recv", 0, "act")]]]
    assert replay_under_nccl_rules(hang)[0].startswith("hang")
    swapped = [[[("send", 1, "act"), ("send", 1, "grad")]],
               [[("recv", 0, "grad"), ("recv", 0, "act")]]]
    assert "sent as act, received as grad" in replay_under_nccl_rules(swapped)[0]
