"""The DPO loss and its gradients, single process, against the formula written out in helpers.direct_dpo.

The trainer computes each response's log-probability from the model's fused vocab-parallel
cross-entropy on the last stage, splits the rows into pairs and applies DPOLoss; the reference
takes the model's logits through torch.log_softmax and gather and writes the loss out by hand.
Policy and reference model are different (two seeds), so m != 0 and a swapped or moving
reference shows.
"""

import pytest
import torch

from megatron_ds.config import config_from_args
from megatron_ds.data.dpo_dataset import DPODataset, load_preference_pairs
from megatron_ds.data.tokenizer import build_tokenizer
from megatron_ds.dpo import DPORunConfig
from megatron_ds.parallel.topology import single_process_state
from megatron_ds.pretrain import build_model
from megatron_ds.training.dpo_loss import preference_loss
from megatron_ds.training.dpo_trainer import DPOTrainer
from tests.dpo.helpers import direct_grads, dpo_flags, first_global_batch, reference_config

# Same weights, same tokens; the two sides differ in how a token's log-prob is computed (the fused
# kernel's max-subtracted exp-sum vs torch.log_softmax) and in fp32 summation order: ~1e-7 relative
# per token, on sums of ~40 tokens of |log p| ~ 3. Measured over the four variants: loss |diff| <=
# 8e-8 of max(1, |loss|) (IPO's loss is ~25), gradients max |diff| / max |grad| <= 3.5e-6. The
# tolerances leave 5x or more; a wrong reference (the policy's own log-probs: m = 0) moves the DPO
# loss by 1.3e-3, a dropped pair by ~1e-3.
LOSS_TOL = 1e-6  # relative to max(1, |loss|)
GRAD_TOL = 2e-5


def _trainer_and_direct(dpo_files, *extra):
    train, _, tok = dpo_files
    cfg = config_from_args(dpo_flags(train, tok, *extra), DPORunConfig, "megatron_ds.dpo")
    state = single_process_state()
    pairs = load_preference_pairs(train, build_tokenizer(tok), cfg.training.seq_length)
    ds = DPODataset(pairs, 8 * cfg.training.global_batch_size, cfg.training.seed)
    trainer = DPOTrainer(cfg, state, build_model(cfg, state), ds,
                         reference=build_model(reference_config(cfg), state))
    loss = trainer._reduce_loss(trainer.forward_backward_step(next(trainer._batches(ds, 0, 1))))
    metrics = trainer._means(trainer._global_metrics())
    grads = {n: p.main_grad.clone() for n, p in trainer.model_chunks[0].named_parameters()}
    d = cfg.dpo
    ref_grads, ref_metrics = direct_grads(
        build_model(cfg, state), build_model(reference_config(cfg), state),
        first_global_batch(ds, cfg.training.global_batch_size), cfg.model.vocab_size, d.dpo_beta,
        loss_type=d.dpo_loss_type, label_smoothing=d.dpo_label_smoothing)
    return loss, metrics, grads, ref_metrics, ref_grads


@pytest.mark.parametrize("extra", [[], ["--dpo-label-smoothing", "0.2"], ["--dpo-loss-type", "ipo"],
                                   ["--dpo-beta", "0.5"]],
                         ids=["dpo", "cdpo-label-smoothing", "ipo", "beta-0.5"])
def test_loss_and_grads_equal_the_formula(dpo_files, extra):
    loss, metrics, grads, ref_metrics, ref_grads = _trainer_and_direct(dpo_files, *extra)
    assert abs(loss - ref_metrics["loss"]) <= LOSS_TOL * max(1.0, abs(loss)), (loss, ref_metrics["loss"])
    # The logged mean sums the pair losses in fp64, the backpropagated one in fp32: a few fp32 ulps.
    assert metrics["loss"] == pytest.approx(loss, rel=1e-6)
    for k in ("reward margin", "chosen reward", "rejected reward"):
        assert metrics[k] == pytest.approx(ref_metrics[k], abs=1e-5), k  # beta x (logp differences ~1e-5)
    for k in ("chosen logps", "rejected logps"):  # sums of ~40 log-probs: relative
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-6), k
    assert metrics["preference accuracy"] == ref_metrics["preference accuracy"]
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        err = ((g - ref_grads[name]).abs().max() / ref_grads[name].abs().max()).item()
        assert err <= GRAD_TOL, f"{name}: gradient differs by {err:.2e} of its max"
    print(f"{extra}: loss {loss:.6f} |diff| {abs(loss - ref_metrics['loss']):.2e}, max grad err "
          f"{max(((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item() for n, g in grads.items()):.2e}")


def test_preference_loss_values_by_hand():
    """Numbers worked out on paper: m = (pc - rc) - (pr - rr) = (-1 - -2) - (-3 - -2.5) = 1.5."""
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.5))
    beta = 0.1
    sig = lambda x: 1 / (1 + torch.exp(-torch.tensor(x)))  # noqa: E731
    loss, cr, rj = preference_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(-torch.log(sig(0.15)).item(), rel=1e-6)
    assert (cr.item(), rj.item()) == pytest.approx((0.1, -0.05))
    loss, _, _ = preference_loss(pc, pr, rc, rr, beta, label_smoothing=0.25)
    assert loss.item() == pytest.approx(-(0.75 * torch.log(sig(0.15)) + 0.25 * torch.log(sig(-0.15))).item(), rel=1e-6)
    loss, _, _ = preference_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    assert loss.item() == pytest.approx((1.5 - 5.0) ** 2, rel=1e-6)
