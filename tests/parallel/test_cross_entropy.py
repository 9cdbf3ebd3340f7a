"""Vocab-parallel LM head + cross-entropy against F.cross_entropy on the full, unpadded logits."""

import pytest
import torch

from megatron_ds.parallel.cross_entropy import cross_entropy_reference, vocab_parallel_cross_entropy
from megatron_ds.parallel.layers import ColumnParallelLinear
from megatron_ds.parallel.topology import build_parallel_state
from tests.multiproc import run_world
from tests.parallel.tp_utils import INIT, assert_close_fp32, generator, master_weight, shard

S, B, H = 4, 3, 16
VOCAB, PADDED = 1000, 1024  # padded to a multiple of 128 * tp, as Megatron does


def _targets():
    gen = torch.Generator().manual_seed(5)
    target = torch.randint(0, VOCAB, (S, B), generator=gen)
    target[0, 0], target[0, 1] = 0, VOCAB - 1  # owned by the first rank and by the last real column
    # Per-token loss weights (a loss mask / mean), so backward sees a non-uniform grad_loss.
    return target, torch.rand(S, B, generator=gen)


def _check_lm_head(tp):
    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    target, loss_weight = _targets()
    x = torch.randn(S, B, H, generator=torch.Generator().manual_seed(6))

    # Reference: full LM head, F.cross_entropy on the first VOCAB columns.
    w_ref = master_weight((PADDED, H), "lm_head").requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    logits_ref = torch.nn.functional.linear(x_ref, w_ref)  # [s, b, V_padded]
    logits_ref.retain_grad()
    loss_ref = cross_entropy_reference(logits_ref, target, VOCAB)
    (loss_ref * loss_weight).sum().backward()

    head = ColumnParallelLinear(H, PADDED, tp_group=g, init_method=INIT, init_generator=generator("lm_head"))
    xi = x.clone().requires_grad_(True)
    logits = head(xi)  # [s, b, V_padded/tp]
    logits.retain_grad()
    loss = vocab_parallel_cross_entropy(logits, target, g, vocab_size=VOCAB)
    assert loss.dtype == torch.float32 and loss.shape == (S, B)
    # The log-sum-exp adds 1000 exp terms in TP partial sums: reassociation, well inside 1e-5.
    assert_close_fp32(loss, loss_ref)
    (loss * loss_weight).sum().backward()
    assert_close_fp32(logits.grad, shard(logits_ref.grad, -1, tp, r))
    assert_close_fp32(xi.grad, x_ref.grad)
    assert_close_fp32(head.weight.grad, shard(w_ref.grad, 0, tp, r))

    # Padding columns (global >= VOCAB, all on the last rank) get exactly zero grad...
    first_col = r * (PADDED // tp)
    n_pad = max(0, first_col + PADDED // tp - VOCAB)
    if n_pad:
        assert torch.all(logits.grad[..., -n_pad:] == 0)
        assert torch.all(head.weight.grad[-n_pad:] == 0)
    # ...and never enter the loss, whatever the head writes there.
    poisoned = logits.detach().clone()
    if n_pad:
        poisoned[..., -n_pad:] = 1e4
    assert torch.equal(vocab_parallel_cross_entropy(poisoned, target, g, vocab_size=VOCAB), loss.detach())

    # Without vocab_size every column counts: against the reference on all PADDED columns.
    full = vocab_parallel_cross_entropy(logits.detach(), target, g)
    assert_close_fp32(full, cross_entropy_reference(logits_ref.detach(), target))

    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_cross_entropy(logits.detach(), target, g, vocab_size=PADDED + 1)


def _check_bf16_logits(tp):
    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    target, loss_weight = _targets()
    logits_full = (3 * torch.randn(S, B, PADDED, generator=torch.Generator().manual_seed(7))).bfloat16()

    ref = logits_full.clone().requires_grad_(True)
    loss_ref = cross_entropy_reference(ref, target, VOCAB)
    (loss_ref * loss_weight).sum().backward()

    local = shard(logits_full, -1, tp, r).requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, g, vocab_size=VOCAB)
    (loss * loss_weight).sum().backward()
    assert loss.dtype == torch.float32 and local.grad.dtype == torch.bfloat16
    # Both sides do fp32 math on the same bf16 values, so the loss agrees to fp32 tolerance.
    assert_close_fp32(loss, loss_ref)
    # The fp32 grads agree to ~1e-6 relative, then each is rounded to bf16: a value near a rounding
    # boundary can land one bf16 ulp apart, i.e. up to 2**-7 relative (8 significant bits).
    torch.testing.assert_close(local.grad, shard(ref.grad, -1, tp, r), rtol=2**-7, atol=1e-7)
    n_pad = max(0, (r + 1) * (PADDED // tp) - VOCAB)
    if n_pad:
        assert torch.all(local.grad[..., -n_pad:] == 0)


@pytest.mark.parametrize("tp", [2, 4])
def test_lm_head_and_vocab_parallel_cross_entropy_with_padding(tp):
    run_world(tp, _check_lm_head, tp=tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy_bf16_logits(tp):
    run_world(tp, _check_bf16_logits, tp=tp)


def test_backward_twice_is_refused():
    logits = torch.randn(2, 8, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([1, 2]), None).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
