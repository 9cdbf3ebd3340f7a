"""The fused cross-entropy under tensor parallelism: each rank's loss and in-place gradient against
F.cross_entropy on the full, unsharded 102400-column vocabulary (the last rank holding padding)."""

import pytest
import torch

from megatron_ds.kernels.cross_entropy import fused_vocab_parallel_cross_entropy
from megatron_ds.parallel.cross_entropy import cross_entropy_reference
from megatron_ds.parallel.topology import build_parallel_state
from tests.multiproc import run_world
from tests.parallel.tp_utils import shard

S, B = 3, 2
VOCAB, PADDED = 102300, 102400  # the last 100 columns are padding, all on the last rank


def _check(tp, dtype):
    st = build_parallel_state(tp=tp)
    g, r = st.tp_group, st.tp_rank
    gen = torch.Generator().manual_seed(11)
    logits_full = (4 * torch.randn(S, B, PADDED, generator=gen)).to(dtype)
    target = torch.randint(0, VOCAB, (S, B), generator=gen)
    target[0, 0], target[0, 1] = 0, VOCAB - 1  # first rank's first column, last real column
    weight = torch.rand(S, B, generator=gen)

    # The reference runs in float64: torch's own fp32 cross-entropy is no closer to the exact values
    # than ours (torch 2.14.1: 2e-5 relative on this vocabulary, ours 2e-6), so an fp32 reference
    # would test torch's rounding, not the kernel's.
    ref = logits_full.double().requires_grad_(True)
    loss_ref = cross_entropy_reference(ref, target, VOCAB)
    (loss_ref * weight.double()).sum().backward()

    local = shard(logits_full, -1, tp, r).clone()
    y = local.requires_grad_(True) * 1  # a non-leaf, as the LM head's output
    loss = fused_vocab_parallel_cross_entropy(y, target, g, vocab_size=VOCAB)
    # fp32 math against float64; the TP partial sums reassociate 102400 exp terms.
    torch.testing.assert_close(loss, loss_ref.float(), rtol=1e-5, atol=1e-5)
    (loss * weight).sum().backward()
    grad = y.detach()  # the logits' storage now holds the gradient
    assert grad.dtype == dtype
    expected = shard(ref.grad, -1, tp, r).to(dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    else:  # fp32 values rounded once to bf16 on each side: one bf16 ulp apart at most
        torch.testing.assert_close(grad, expected, rtol=2 ** -7, atol=1e-7)
    torch.testing.assert_close(local.grad, grad)
    n_pad = max(0, (r + 1) * (PADDED // tp) - VOCAB)
    if n_pad:
        assert torch.all(grad[..., -n_pad:] == 0)


@pytest.mark.parametrize("tp", [2, 4])
def test_fused_cross_entropy_tp_fp32_and_bf16(tp):
    run_world(tp, _check, tp=tp, dtype=torch.float32)
    run_world(tp, _check, tp=tp, dtype=torch.bfloat16)
