"""The memory estimate the planner uses, held against what a run of the tiny model really allocates.

Each case trains the ``--model tiny`` preset for a few steps through ``pretrain.run`` (mock data) on
the shared gloo worlds, and measures on every rank the peak of the tensor bytes allocated on CPU
from model construction to the last step (``memory.measure_peak_cpu_tensor_bytes``). The estimate of
that rank's stage (``memory.estimate_for_config``) must be within 15% of it.

Sequences of 256 tokens in micro-batches of 2 make the activations a real share of the peak: about
half of it in fp32 without pipelining (params, grads and Adam state are ~29 MB, one micro-batch's
activations ~26 MB, a third of them the logits).
"""

import threading

import pytest
import torch

from megatron_ds import memory
from megatron_ds.config import config_from_args
from megatron_ds.parallel.topology import build_parallel_state, single_process_state
from megatron_ds.pretrain import run
from tests.multiproc import run_world

STEPS = 3  # the peak comes in a backward; the later steps show it does not grow once the loop is steady
BASE = ["--model", "tiny", "--seq-length", "256", "--micro-batch-size", "2", "--train-iters", str(STEPS),
        "--mock-data", "--log-interval", "1000", "--eval-interval", "0"]

# Issue 9's bar. Measured estimate/peak on these layouts: 0.96-1.02. What the estimate leaves out
# (the embedding's output, rotary tables, norm statistics, gloo's staging copies) or rounds (the
# per-layer saved set is derived for the reference kernels; the fused rotary works in place) stays
# within 4% here; a term missing from memory.py shows as more: before the fused cross-entropy's
# logits were counted right the first two layouts read 1.12 and 1.16, and without the backward
# transient the last pipeline stages read 0.91.
RTOL = 0.15


def _flags(tp: int, pp: int, dp: int, microbatches: int, bf16: bool, zero1: bool, reference: bool) -> list[str]:
    flags = BASE + ["--global-batch-size", str(2 * dp * microbatches),
                    "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if tp > 1:
        flags.append("--sequence-parallel")
    if bf16:
        flags.append("--bf16")
    if zero1:
        flags.append("--use-distributed-optimizer")
    if reference:
        flags.append("--no-fused-kernels")
    return flags


def measure_rank(tp: int, pp: int, microbatches: int, bf16: bool, zero1: bool, reference: bool = False) -> dict:
    """On one rank (of a gloo world, or the only process): train, return its measured peak and estimate."""
    single = not torch.distributed.is_initialized()
    state = single_process_state() if single else build_parallel_state(tp=tp, pp=pp)
    cfg = config_from_args(_flags(tp, pp, state.dp_size, microbatches, bf16, zero1, reference))
    result, peak = memory.measure_peak_cpu_tensor_bytes(lambda: run(cfg, state, log=False))
    est = memory.estimate_for_config(cfg, state.dp_size, state.pp_rank)
    return dict(peak=peak, estimate=est.total, summary=est.summary(), pp_rank=state.pp_rank,
                tp_rank=state.tp_rank, dp_rank=state.dp_rank, losses=result.losses)


# (id, world size, kwargs of measure_rank)
LAYOUTS = [
    ("tp1-fp32", 1, dict(tp=1, pp=1, microbatches=2, bf16=False, zero1=False)),
    ("tp1-bf16", 1, dict(tp=1, pp=1, microbatches=2, bf16=True, zero1=False)),
    # the pure-PyTorch kernels: their cross-entropy keeps an fp32 softmax beside the logits
    ("tp1-fp32-reference-kernels", 1, dict(tp=1, pp=1, microbatches=2, bf16=False, zero1=False, reference=True)),
    ("dp2-zero1-bf16", 2, dict(tp=1, pp=1, microbatches=2, bf16=True, zero1=True)),
    ("tp2-sp-fp32", 2, dict(tp=2, pp=1, microbatches=2, bf16=False, zero1=False)),
    ("pp2-1f1b-fp32", 2, dict(tp=1, pp=2, microbatches=4, bf16=False, zero1=False)),
    ("tp2-sp-pp2-bf16", 4, dict(tp=2, pp=2, microbatches=4, bf16=True, zero1=False)),
]


@pytest.mark.parametrize("world,kwargs", [(w, k) for _, w, k in LAYOUTS], ids=[i for i, _, _ in LAYOUTS])
def test_estimate_within_15_percent_of_measured_peak(world, kwargs):
    ranks = [measure_rank(**kwargs)] if world == 1 else run_world(world, measure_rank, **kwargs)
    for r in ranks:
        assert all(x == x for x in r["losses"]) and len(r["losses"]) == STEPS  # it did train
        ratio = r["estimate"] / r["peak"]
        print(f"pp {r['pp_rank']} tp {r['tp_rank']} dp {r['dp_rank']}: estimate {r['estimate']} / measured "
              f"{r['peak']} = {ratio:.3f}")
        assert ratio == pytest.approx(1.0, rel=RTOL), (
            f"pp_rank {r['pp_rank']} tp_rank {r['tp_rank']}: estimate {r['estimate']} vs measured peak "
            f"{r['peak']} ({ratio:.3f}); {r['summary']}")


# ---- the measurement itself -------------------------------------------------------------------------------

def test_measured_peak_is_the_largest_live_set_exactly():
    # 4 MB, then 2 MB beside it (6 MB live), then 4 MB freed and 1 MB more: the peak is 6 MB, not 7.
    def f():
        a = torch.empty(1_000_000)
        b = torch.empty(500_000)
        del a
        c = torch.empty(250_000)
        return b, c

    (b, c), peak = memory.measure_peak_cpu_tensor_bytes(f)
    assert peak == 6_000_000


def test_measured_peak_ignores_tensors_from_before_the_call():
    older = torch.empty(1_000_000)

    def f():
        nonlocal older
        older = None  # its free must not lower the count below what the call allocates
        return torch.empty(250_000)

    _, peak = memory.measure_peak_cpu_tensor_bytes(f)
    assert peak == 1_000_000


def test_measured_peak_counts_a_free_on_another_thread():
    # A process-group thread may drop the last reference to a tensor (gloo's work objects do): the
    # 4 MB freed there must leave the count, so the 1 MB after it peaks at 4 MB, not 5.
    def f():
        held = [torch.empty(1_000_000)]
        t = threading.Thread(target=held.clear)
        t.start()
        t.join()
        return torch.empty(250_000)

    _, peak = memory.measure_peak_cpu_tensor_bytes(f)
    assert peak == 4_000_000


def test_measured_peak_sees_autograd_backward():
    # y = x * w (1 MB) saves x and w (older); backward allocates w's grad (1 MB) while y is alive (the
    # grad of y.sum() reaches y as an expanded scalar, a view): 2 MB, plus the sum and its grad (4 B each).
    x = torch.randn(250_000)
    w = torch.randn(250_000, requires_grad=True)

    def f():
        y = x * w
        y.sum().backward()

    _, peak = memory.measure_peak_cpu_tensor_bytes(f)
    assert peak == 2_000_008
