"""TP layers against the unsharded math (F.linear / F.embedding on the single-process weights),
forward and backward: input grads, and weight grads against the matching slice of the reference's."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_ds.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    allreduce_tp_replicated_grads,
    set_sequence_parallel_attr,
)
from megatron_ds.parallel.topology import build_parallel_state
from tests.multiproc import run_world
from tests.parallel.tp_utils import INIT, assert_close_fp32, generator, master_weight, shard

S, B, H, FFN = 8, 2, 32, 64
# A GQA fused QKV: 8 query heads, 4 KV heads of dim 4 (4 KV heads so that tp=4 divides them).
QKV = [8 * 4, 4 * 4, 4 * 4]
VOCAB = 64


def _inputs(*shapes):
    gen = torch.Generator().manual_seed(42)  # same on every rank
    return [torch.randn(*s, generator=gen) for s in shapes]


def _reference_linear(w, x, dy):
    """y = x w^T on the full weight; returns y, dx, dw."""
    w = w.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    y = F.linear(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _check_init(tp):
    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    common = dict(tp_group=g, init_method=INIT)
    cases = [
        (ColumnParallelLinear(H, sum(QKV), **common, init_generator=generator("qkv"), partition_sizes=QKV),
         master_weight((sum(QKV), H), "qkv"), 0, QKV),
        (ColumnParallelLinear(H, FFN, **common, init_generator=generator("up"), params_dtype=torch.bfloat16),
         master_weight((FFN, H), "up").bfloat16(), 0, None),
        (RowParallelLinear(FFN, H, **common, init_generator=generator("down")),
         master_weight((H, FFN), "down"), 1, None),
        (VocabParallelEmbedding(VOCAB, H, **common, init_generator=generator("emb")),
         master_weight((VOCAB, H), "emb"), 0, None),
    ]
    for layer, full, dim, parts in cases:
        w = layer.weight
        assert torch.equal(w.detach(), shard(full, dim, tp, r, parts)), layer
        assert w.tensor_model_parallel and w.partition_dim == dim
        assert w.partition_sizes == (parts or [full.shape[dim]])
        assert "tp=" in repr(layer)
    # The meta device (67B shapes) allocates nothing and draws nothing.
    meta = ColumnParallelLinear(H, FFN, **common, init_generator=generator("up"), device="meta")
    assert meta.weight.is_meta and meta.weight.shape == (FFN // tp, H)


def _check_column(tp):
    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    x, dy, dy_qkv = _inputs((S, B, H), (S, B, FFN), (S, B, sum(QKV)))
    w = master_weight((FFN, H), "up")
    y_ref, dx_ref, dw_ref = _reference_linear(w, x, dy)

    def make(**kw):
        return ColumnParallelLinear(H, FFN, tp_group=g, init_method=INIT, init_generator=generator("up"), **kw)

    # Plain: replicated x -> own output columns; dx all-reduced over TP.
    layer, xi = make(), x.clone().requires_grad_(True)
    y = layer(xi)
    assert y.shape == (S, B, FFN // tp)
    assert_close_fp32(y, shard(y_ref, -1, tp, r))
    y.backward(shard(dy, -1, tp, r))
    assert_close_fp32(xi.grad, dx_ref)
    assert_close_fp32(layer.weight.grad, shard(dw_ref, 0, tp, r))

    # gather_output: full output on every rank, its (replicated) grad split back.
    layer, xi = make(gather_output=True), x.clone().requires_grad_(True)
    y = layer(xi)
    assert_close_fp32(y, y_ref)
    y.backward(dy)
    assert_close_fp32(xi.grad, dx_ref)
    assert_close_fp32(layer.weight.grad, shard(dw_ref, 0, tp, r))

    # Sequence parallel: own rows in, all-gathered for the matmul; dx reduce-scattered back to own rows.
    layer = make(sequence_parallel=True)
    xi = x.chunk(tp, 0)[r].clone().requires_grad_(True)
    y = layer(xi)
    assert y.shape == (S, B, FFN // tp)
    assert_close_fp32(y, shard(y_ref, -1, tp, r))
    y.backward(shard(dy, -1, tp, r))
    assert_close_fp32(xi.grad, dx_ref.chunk(tp, 0)[r])
    assert_close_fp32(layer.weight.grad, shard(dw_ref, 0, tp, r))

    # Fused GQA QKV: q, k and v are each split over TP; the local output is [q/tp | k/tp | v/tp].
    w_qkv = master_weight((sum(QKV), H), "qkv")
    y_ref, dx_ref, dw_ref = _reference_linear(w_qkv, x, dy_qkv)
    layer = ColumnParallelLinear(H, sum(QKV), tp_group=g, init_method=INIT, init_generator=generator("qkv"),
                                 partition_sizes=QKV)
    assert layer.local_partition_sizes == [p // tp for p in QKV]
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    assert_close_fp32(y, shard(y_ref, -1, tp, r, QKV))
    q, k, v = y.split(layer.local_partition_sizes, dim=-1)
    assert_close_fp32(k, y_ref[..., QKV[0]:QKV[0] + QKV[1]].chunk(tp, -1)[r])
    y.backward(shard(dy_qkv, -1, tp, r, QKV))
    assert_close_fp32(xi.grad, dx_ref)
    assert_close_fp32(layer.weight.grad, shard(dw_ref, 0, tp, r, QKV))

    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(H, 8 * tp + 1, tp_group=g, init_method=INIT, init_generator=generator("x"))


def _check_row(tp):
    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    x, dy = _inputs((S, B, FFN), (S, B, H))
    w = master_weight((H, FFN), "down")
    y_ref, dx_ref, dw_ref = _reference_linear(w, x, dy)

    def make(**kw):
        return RowParallelLinear(FFN, H, tp_group=g, init_method=INIT, init_generator=generator("down"), **kw)

    # Plain: own input columns -> partial sums, all-reduced; dx stays sharded.
    layer = make()
    xi = shard(x, -1, tp, r).requires_grad_(True)
    y = layer(xi)
    assert_close_fp32(y, y_ref)
    y.backward(dy)
    assert_close_fp32(xi.grad, shard(dx_ref, -1, tp, r))
    assert_close_fp32(layer.weight.grad, shard(dw_ref, 1, tp, r))

    # input_is_parallel=False: replicated input split here, its grad all-gathered.
    layer, xi = make(input_is_parallel=False), x.clone().requires_grad_(True)
    y = layer(xi)
    assert_close_fp32(y, y_ref)
    y.backward(dy)
    assert_close_fp32(xi.grad, dx_ref)
    assert_close_fp32(layer.weight.grad, shard(dw_ref, 1, tp, r))

    # Sequence parallel: partial sums reduce-scattered to own rows; their grad all-gathered.
    layer = make(sequence_parallel=True)
    xi = shard(x, -1, tp, r).requires_grad_(True)
    y = layer(xi)
    assert y.shape == (S // tp, B, H)
    assert_close_fp32(y, y_ref.chunk(tp, 0)[r])
    y.backward(dy.chunk(tp, 0)[r])
    assert_close_fp32(xi.grad, shard(dx_ref, -1, tp, r))
    assert_close_fp32(layer.weight.grad, shard(dw_ref, 1, tp, r))


def _check_embedding(tp):
    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    ids[0, :2] = torch.tensor([0, VOCAB - 1])  # both ends of the vocab: first and last rank's rows
    (dy,) = _inputs((S, B, H))
    w = master_weight((VOCAB, H), "emb").requires_grad_(True)
    y_ref = F.embedding(ids, w).transpose(0, 1)  # [s, b, h]
    y_ref.backward(dy)

    for sp in (False, True):
        layer = VocabParallelEmbedding(VOCAB, H, tp_group=g, init_method=INIT, init_generator=generator("emb"),
                                       sequence_parallel=sp)
        y = layer(ids)
        # Each token's row comes whole from one rank (the others add zeros): exact.
        expect, grad = (y_ref.chunk(tp, 0)[r], dy.chunk(tp, 0)[r]) if sp else (y_ref, dy)
        assert torch.equal(y, expect.detach())
        y.backward(grad)
        assert_close_fp32(layer.weight.grad, shard(w.grad, 0, tp, r))

    with pytest.raises(ValueError, match="padded vocabulary size"):
        VocabParallelEmbedding(VOCAB + 1, H, tp_group=g, init_method=INIT, init_generator=generator("emb"))


class _SPBlock(nn.Module):
    """norm-scale -> column -> row with a residual: the shape of every sub-layer of the decoder."""

    def __init__(self, g, sp):
        super().__init__()
        self.scale = nn.Parameter(master_weight((H,), "scale"))
        if sp:
            set_sequence_parallel_attr(self.scale)
        common = dict(tp_group=g, init_method=INIT, sequence_parallel=sp)
        self.up = ColumnParallelLinear(H, FFN, init_generator=generator("up"), **common)
        self.down = RowParallelLinear(FFN, H, init_generator=generator("down"), **common)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x * self.scale)))


def _check_sequence_parallel_block(tp):
    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    x, dy = _inputs((S, B, H), (S, B, H))
    ref = _SPBlock(None, sp=False)  # tp_group None: the single-process model
    x_ref = x.clone().requires_grad_(True)
    ref(x_ref).backward(dy)

    for use_main_grad in (False, True):
        block = _SPBlock(g, sp=True)
        xi = x.chunk(tp, 0)[r].clone().requires_grad_(True)
        y = block(xi)
        assert_close_fp32(y, ref(x).detach().chunk(tp, 0)[r])
        y.backward(dy.chunk(tp, 0)[r])
        if use_main_grad:  # what the trainer's grad buffers look like
            for p in block.parameters():
                p.main_grad, p.grad = p.grad.clone(), None
        # Before the reduction the norm weight saw only this rank's s/tp tokens.
        allreduce_tp_replicated_grads(block, g)
        grad = (lambda p: p.main_grad) if use_main_grad else (lambda p: p.grad)
        assert_close_fp32(grad(block.scale), ref.scale.grad)
        assert_close_fp32(grad(block.up.weight), shard(ref.up.weight.grad, 0, tp, r))  # untouched: TP-sharded
        assert_close_fp32(grad(block.down.weight), shard(ref.down.weight.grad, 1, tp, r))
        assert_close_fp32(xi.grad, x_ref.grad.chunk(tp, 0)[r])


@pytest.mark.parametrize("tp", [2, 4])
def test_initialization_is_identical_whatever_the_layout(tp):
    run_world(tp, _check_init, tp=tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_column_parallel_linear(tp):
    run_world(tp, _check_column, tp=tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_linear(tp):
    run_world(tp, _check_row, tp=tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_embedding(tp):
    run_world(tp, _check_embedding, tp=tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_block_with_replicated_norm_grads(tp):
    run_world(tp, _check_sequence_parallel_block, tp=tp)


def test_single_process_layers_are_plain_linear_and_embedding():
    x = torch.randn(S, B, H)
    col = ColumnParallelLinear(H, FFN, tp_group=None, init_method=INIT, init_generator=generator("up"))
    assert torch.equal(col.weight.detach(), master_weight((FFN, H), "up"))
    assert_close_fp32(col(x), F.linear(x, master_weight((FFN, H), "up")))
    row = RowParallelLinear(FFN, H, tp_group=None, init_method=INIT, init_generator=generator("down"),
                            sequence_parallel=True)
    assert_close_fp32(row(col(x)), F.linear(col(x), master_weight((H, FFN), "down")))
    emb = VocabParallelEmbedding(VOCAB, H, tp_group=None, init_method=INIT, init_generator=generator("emb"))
    ids = torch.randint(0, VOCAB, (B, S))
    assert torch.equal(emb(ids), F.embedding(ids.t(), master_weight((VOCAB, H), "emb")))
