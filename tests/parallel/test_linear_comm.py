"""parallel/linear_comm.py: the column-parallel GEMM with its TP communication folded in.

- It computes what the plain composition computes (``gather_from_sequence_parallel_region`` or
  ``copy_to_tensor_model_parallel_region``, then ``F.linear``): forward, dX and dW, fp32 and bf16,
  under SP and without, also when only one of X and W needs a gradient.
- Under SP it keeps only this rank's ``[s/tp, b, in]`` input for backward, not the gathered one.
- Backward issues the re-gather of X before the dX GEMM and the reduction of dX before the dW GEMM,
  and waits for each only after that GEMM: the order that lets them overlap.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_ds.parallel.topology import build_parallel_state
from tests.multiproc import run_world

S, B, IN, OUT = 8, 2, 16, 12


def _tensors(tp, rank, dtype):
    gen = torch.Generator().manual_seed(7)  # same on every rank
    x_full = torch.randn(S, B, IN, generator=gen)
    w_all = torch.randn(tp, OUT, IN, generator=gen)
    dy_all = torch.randn(tp, S, B, OUT, generator=gen)
    return x_full.to(dtype), w_all[rank].to(dtype), dy_all[rank].to(dtype)


def _run(fn, x, w, dy, x_grad, w_grad):
    x = x.clone().requires_grad_(x_grad)
    w = w.clone().requires_grad_(w_grad)
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _check_against_composition(tp):
    from megatron_ds.parallel.linear_comm import linear_with_tp_comm
    from megatron_ds.parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    cases = 0
    for dtype in (torch.float32, torch.bfloat16):
        x_full, w, dy = _tensors(tp, r, dtype)
        for sp in (True, False):
            x = x_full.chunk(tp, dim=0)[r] if sp else x_full

            def composed(x, w, sp=sp):
                x = (gather_from_sequence_parallel_region(x, g, tensor_parallel_output_grad=True) if sp
                     else copy_to_tensor_model_parallel_region(x, g))
                return F.linear(x, w)

            def folded(x, w, sp=sp):
                return linear_with_tp_comm(x, w, g, sp)

            for x_grad, w_grad in ((True, True), (True, False), (False, True)):
                want = _run(composed, x, w, dy, x_grad, w_grad)
                got = _run(folded, x, w, dy, x_grad, w_grad)
                for a, b, what in zip(got, want, ("y", "dx", "dw")):
                    if b is None:
                        assert a is None, what
                        continue
                    # The same GEMMs on the same tensors and the same collectives: bitwise equal.
                    assert a.dtype == b.dtype and torch.equal(a, b), (dtype, sp, x_grad, w_grad, what)
                cases += 1
    return cases


@pytest.mark.parametrize("tp", [2, 4])
def test_equals_the_gather_then_linear_composition(tp):
    assert run_world(tp, _check_against_composition, tp=tp) == [12] * tp


def _saved_and_order(tp):
    from torch.utils._python_dispatch import TorchDispatchMode

    import megatron_ds.parallel.linear_comm as lc

    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    x_full, w, dy = _tensors(tp, r, torch.float32)
    x = x_full.chunk(tp, dim=0)[r].clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = lc.linear_with_tp_comm(x, w, g, True)

    events = []

    class _Handle:
        def __init__(self, handle, name):
            self.handle, self.name = handle, name

        def wait(self):
            events.append("wait " + self.name)
            return self.handle.wait()

    real_gather, real_rs = lc._all_gather_single, lc._reduce_scatter_single

    def gather(out, inp, group=None, async_op=False):
        events.append("start gather")
        return _Handle(real_gather(out, inp, group=group, async_op=async_op), "gather")

    def reduce_scatter(out, inp, group=None, async_op=False):
        events.append("start reduce-scatter")
        return _Handle(real_rs(out, inp, group=group, async_op=async_op), "reduce-scatter")

    class _Gemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
                events.append("dX GEMM" if tuple(out.shape)[-1] == IN and out.shape[0] != OUT else "dW GEMM")
            return out

    lc._all_gather_single, lc._reduce_scatter_single = gather, reduce_scatter
    try:
        with _Gemms():
            y.backward(dy)
    finally:
        lc._all_gather_single, lc._reduce_scatter_single = real_gather, real_rs
    return saved, events


def test_keeps_the_local_input_and_overlaps_its_collectives():
    tp = 2
    for saved, events in run_world(tp, _saved_and_order, tp=tp):
        # The input as this rank holds it, [s/tp, b, in], and the weight: no gathered [s, b, in].
        assert sorted(saved) == sorted([(S // tp, B, IN), (OUT, IN)]), saved
        assert events == ["start gather", "dX GEMM", "wait gather", "start reduce-scatter", "dW GEMM",
                          "wait reduce-scatter"], events
