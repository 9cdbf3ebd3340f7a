"""Each autograd collective does its forward collective and the adjoint one in backward."""

import pytest
import torch

from megatron_ds.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_ds.parallel.topology import build_parallel_state
from tests.multiproc import run_world

S, B, H = 8, 2, 12  # s and h divisible by tp in (2, 4)


def _exact(a, b):
    assert torch.equal(a, b), (a - b).abs().max()


def _close_sum(a, b):
    # A sum of <= 4 fp32 O(1) terms in another order than gloo's: <= 3 roundings of ~6e-8 relative.
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _leaf(t):
    return t.clone().requires_grad_(True)


def _check_mappings(tp):
    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(S, B, H, generator=gen)  # same on every rank
    # One tensor per rank, known to every rank: what rank q contributes is per_rank[q].
    per_rank = [torch.randn(S, B, H, generator=gen) for _ in range(tp)]
    seq_chunks = [t.chunk(tp, 0)[rr] for rr, t in enumerate(per_rank)]   # [s/tp, b, h] from each rank
    hid_chunks = [t.chunk(tp, -1)[rr] for rr, t in enumerate(per_rank)]  # [s, b, h/tp] from each rank
    total = sum(per_rank)

    # copy_to: fwd identity, bwd sum of every rank's grad.
    x = _leaf(full)
    y = copy_to_tensor_model_parallel_region(x, g)
    _exact(y, full)
    y.backward(per_rank[r])
    _close_sum(x.grad, total)

    # reduce_from: fwd sum, bwd identity.
    x = _leaf(per_rank[r])
    y = reduce_from_tensor_model_parallel_region(x, g)
    _close_sum(y, total)
    y.backward(full)
    _exact(x.grad, full)

    # scatter_to (last dim): fwd own chunk, bwd all-gather of the chunks' grads.
    x = _leaf(full)
    y = scatter_to_tensor_model_parallel_region(x, g)
    _exact(y, full.chunk(tp, -1)[r])
    y.backward(hid_chunks[r])
    _exact(x.grad, torch.cat(hid_chunks, -1))

    # gather_from (last dim): fwd all-gather, bwd own chunk of this rank's grad.
    x = _leaf(full.chunk(tp, -1)[r])
    y = gather_from_tensor_model_parallel_region(x, g)
    _exact(y, full)
    y.backward(per_rank[r])
    _exact(x.grad, per_rank[r].chunk(tp, -1)[r])

    # scatter_to_sequence: fwd own rows, bwd all-gather of dim 0.
    x = _leaf(full)
    y = scatter_to_sequence_parallel_region(x, g)
    _exact(y, full.chunk(tp, 0)[r])
    y.backward(seq_chunks[r])
    _exact(x.grad, torch.cat(seq_chunks, 0))

    # gather_from_sequence, TP-sharded consumer: bwd reduce-scatter of the partial grads.
    x = _leaf(full.chunk(tp, 0)[r])
    y = gather_from_sequence_parallel_region(x, g, tensor_parallel_output_grad=True)
    _exact(y, full)
    y.backward(per_rank[r])
    _close_sum(x.grad, total.chunk(tp, 0)[r])

    # gather_from_sequence, replicated consumer: bwd keeps own rows of this rank's (full) grad.
    x = _leaf(full.chunk(tp, 0)[r])
    y = gather_from_sequence_parallel_region(x, g, tensor_parallel_output_grad=False)
    y.backward(per_rank[r])
    _exact(x.grad, per_rank[r].chunk(tp, 0)[r])

    # reduce_scatter_to_sequence: fwd sum then own rows, bwd all-gather of dim 0.
    x = _leaf(per_rank[r])
    y = reduce_scatter_to_sequence_parallel_region(x, g)
    _close_sum(y, total.chunk(tp, 0)[r])
    y.backward(seq_chunks[r])
    _exact(x.grad, torch.cat(seq_chunks, 0))

    # bf16 goes through the same collectives (the trainer's activations are bf16).
    xb = full.bfloat16().chunk(tp, 0)[r]
    _exact(gather_from_sequence_parallel_region(xb, g), full.bfloat16())

    # Sizes that do not divide raise before any collective, so no rank is left hanging.
    bad = torch.zeros(tp + 1, B, tp + 1)
    for fn in (scatter_to_sequence_parallel_region, reduce_scatter_to_sequence_parallel_region,
               scatter_to_tensor_model_parallel_region):
        with pytest.raises(ValueError, match="not divisible by the tensor-parallel size"):
            fn(bad, g)


@pytest.mark.parametrize("tp", [2, 4])
def test_mappings_forward_and_adjoint_backward(tp):
    run_world(tp, _check_mappings, tp=tp)


def test_group_of_one_is_identity():
    x = torch.randn(3, 2, 4)
    for fn in (copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
               scatter_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
               scatter_to_sequence_parallel_region, gather_from_sequence_parallel_region,
               reduce_scatter_to_sequence_parallel_region):
        assert fn(x, None) is x
