"""DPO at TP2 x SP x PP2 x DP2 (8 ranks) equals the DPO formula on one unsharded model.

The 8-rank side is the trainer as it runs: pairs split over 2 DP ranks in micro-batches of 2 pairs
(4 rows), the policy and the frozen reference model each sharded over TP 2 with sequence
parallelism and cut into 2 pipeline stages, the reference's forward-only 1F1B pass before the
policy's forward/backward. The reference is helpers.direct_dpo: one process, the whole batch at
once, log_softmax/gather log-probs, the formula written out, autograd. Initialization is
layout-independent, so both sides hold the same policy and reference weights (the reference from
another seed). Compared: the loss, the logged metrics and every parameter's gradient by global name
(a TP rank's shard against the matching slice).

The same world then checks that the reference model never changes and takes no part in the
optimizer over 3 steps, and that precomputing the reference log-probs gives the same loss.
"""

import functools

import pytest
import torch

from megatron_ds.config import config_from_args, validate
from megatron_ds.data.dpo_dataset import DPODataset, load_preference_pairs
from megatron_ds.data.tokenizer import build_tokenizer
from megatron_ds.dpo import DPORunConfig
from megatron_ds.parallel.topology import build_parallel_state, single_process_state
from megatron_ds.pretrain import build_model
from megatron_ds.training.dpo_trainer import DPOTrainer
from tests.dpo.helpers import direct_grads, dpo_flags, first_global_batch, reference_config
from tests.multiproc import run_world
from tests.parallel.tp_utils import shard

LAYOUT = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"]
STEPS = 3

# TP splits the contraction of the row-parallel GEMMs and the vocab-parallel softmax sums, DP and SP
# regroup fp32 sums, and the reference takes log_softmax on top: ~1e-7 relative per token on log-prob
# sums of ~40 tokens, and the loss only sees beta x their differences. Measured at this layout:
# loss |diff| 2.4e-7, max |grad diff| / max |grad| 2.0e-6 over all parameters (the pipeline parity
# test measures 9e-7 for the plain token mean at the same layout; DPO's per-pair weights
# sigmoid(-beta m) add the log-prob error once more). The tolerances leave 8-10x; dropping one of
# the 8 pairs or using the policy as its own reference moves the loss by ~1e-3.
LOSS_TOL = 2e-6
GRAD_TOL = 2e-5
# Precomputed reference log-probs come from micro-batches made of other pairs (the file order, not
# the training order); the model is row-independent, so only GEMM blocking can differ: measured 0.
PRECOMPUTE_TOL = 1e-6


def _setup(train, tok, extra, world):
    cfg = config_from_args(dpo_flags(train, tok, *LAYOUT, *extra), DPORunConfig, "megatron_ds.dpo")
    validate(cfg, world)
    p = cfg.parallel
    state = build_parallel_state(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    pairs = load_preference_pairs(train, build_tokenizer(tok), cfg.training.seq_length)
    ds = DPODataset(pairs, (STEPS + 1) * cfg.training.global_batch_size, cfg.training.seed)
    return cfg, state, ds


def _grads(trainer) -> dict:
    """main_grad of every parameter by global name, with its TP layout (None when replicated)."""
    grads = {}
    for chunk in trainer.model_chunks:
        for name, p in chunk.named_parameters():
            meta = (p.partition_dim, p.partition_sizes) if getattr(p, "tensor_model_parallel", False) else None
            grads[name] = (p.main_grad.clone(), meta)
    return grads


def _dpo_world(train: str, tok: str) -> dict:
    """On every rank: one step's loss, metrics and grads; then 3 optimizer steps with the reference watched;
    then the first step's loss again with precomputed reference log-probs."""
    cfg, state, ds = _setup(train, tok, [], 8)
    reference = build_model(reference_config(cfg), state)
    trainer = DPOTrainer(cfg, state, build_model(cfg, state), ds, reference=reference)
    batches = trainer._batches(ds, 0, STEPS + 1)
    loss = trainer._reduce_loss(trainer.forward_backward_step(next(batches)))
    metrics = trainer._means(trainer._global_metrics())
    grads = _grads(trainer)

    # The reference: frozen, outside the optimizer, bitwise unchanged by optimizer steps that do move the policy.
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    policy_before = {n: p.detach().clone() for n, p in trainer.model_chunks[0].named_parameters()}
    optimized = {id(p) for buf in trainer.grad_buffers for p in buf.params}
    opt_buffers = [(s.param_buffer.data_ptr(), s.param_buffer.numel() * s.param_buffer.element_size())
                   for s in trainer.optimizer.shards]
    in_optimizer = any(id(p) in optimized or any(lo <= p.data_ptr() < lo + n for lo, n in opt_buffers)
                       for p in reference.parameters())
    step_losses = [trainer.train_step(next(batches), i)[0] for i in range(STEPS)]
    frozen = {"requires_grad": any(p.requires_grad for p in reference.parameters()),
              "grad": any(p.grad is not None or hasattr(p, "main_grad") for p in reference.parameters()),
              "training": reference.training, "in_optimizer": in_optimizer,
              "changed": [n for n, p in reference.named_parameters() if not torch.equal(p, before[n])],
              "policy_moved": any(not torch.equal(p, policy_before[n])
                                  for n, p in trainer.model_chunks[0].named_parameters())}

    # --dpo-precompute-ref: the same first step from stored reference log-probs, reference freed.
    cfg, state, ds = _setup(train, tok, ["--dpo-precompute-ref"], 8)
    pre = DPOTrainer(cfg, state, build_model(cfg, state), ds, reference=build_model(reference_config(cfg), state))
    pre.precompute_reference([ds])
    pre_loss = pre._reduce_loss(pre.forward_backward_step(next(pre._batches(ds, 0, 1))))
    has_ref_table = ds.pairs.ref_logps is not None

    # Interleaved 1F1B: two model chunks of one layer per rank, for the policy and the reference alike.
    cfg, state, ds = _setup(train, tok, ["--num-layers-per-virtual-pipeline-stage", "1"], 8)
    inter = DPOTrainer(cfg, state, build_model(cfg, state), ds, reference=build_model(reference_config(cfg), state))
    assert len(inter.model_chunks) == 2 and len(inter.reference_chunks) == 2
    inter_loss = inter._reduce_loss(inter.forward_backward_step(next(inter._batches(ds, 0, 1))))
    interleaved = {"loss": inter_loss, "grads": _grads(inter) if state.dp_rank == 0 else None}
    return {"loss": loss, "metrics": metrics, "grads": grads if state.dp_rank == 0 else None, "tp": state.tp_size,
            "interleaved": interleaved,
            "tp_rank": state.tp_rank, "frozen": frozen, "step_losses": step_losses, "precomputed_loss": pre_loss,
            "reference_freed": pre.reference_chunks is None, "has_ref_table": has_ref_table}


@functools.lru_cache(maxsize=None)
def _results(train, tok):
    return run_world(8, _dpo_world, train=train, tok=tok)


@functools.lru_cache(maxsize=None)
def _direct(train, tok):
    cfg = config_from_args(dpo_flags(train, tok), DPORunConfig, "megatron_ds.dpo")
    state = single_process_state()
    pairs = load_preference_pairs(train, build_tokenizer(tok), cfg.training.seq_length)
    ds = DPODataset(pairs, cfg.training.global_batch_size, cfg.training.seed)
    return direct_grads(build_model(cfg, state), build_model(reference_config(cfg), state),
                        first_global_batch(ds, cfg.training.global_batch_size), cfg.model.vocab_size,
                        cfg.dpo.dpo_beta)


def _check_grads(results, ref_grads, key=None) -> float:
    """Every parameter's gradient on the DP-rank-0 ranks against the direct one (its TP slice); the worst error."""
    worst, seen = 0.0, set()
    for rank, r in enumerate(results):
        grads = (r[key] if key else r)["grads"]
        if grads is None:
            continue
        for name, (g, meta) in grads.items():
            ref = ref_grads[name]
            if meta is not None:
                ref = shard(ref, meta[0], r["tp"], r["tp_rank"], meta[1])
            assert g.shape == ref.shape, name
            err = ((g - ref).abs().max() / ref.abs().max()).item()
            assert err <= GRAD_TOL, f"{key or 'layout'} rank {rank} {name}: gradient differs by {err:.2e} of its max"
            worst = max(worst, err)
            seen.add(name)
    assert seen == set(ref_grads), sorted(set(ref_grads) ^ seen)  # every parameter was checked somewhere
    return worst


def test_loss_and_every_gradient_equal_the_formula_at_tp2_pp2_dp2(dpo_files):
    train, _, tok = dpo_files
    ref_grads, ref_metrics = _direct(train, tok)
    results = _results(train, tok)
    for rank, r in enumerate(results):
        # Every rank (every stage, every DP rank) logs the same global numbers.
        assert abs(r["loss"] - ref_metrics["loss"]) <= LOSS_TOL, (rank, r["loss"], ref_metrics["loss"])
        assert r["metrics"]["preference accuracy"] == ref_metrics["preference accuracy"]
        assert r["metrics"]["reward margin"] == pytest.approx(ref_metrics["reward margin"], abs=1e-5)
        assert r["metrics"]["chosen logps"] == pytest.approx(ref_metrics["chosen logps"], rel=1e-6)
        assert r["metrics"]["rejected logps"] == pytest.approx(ref_metrics["rejected logps"], rel=1e-6)
    worst_grad = _check_grads(results, ref_grads)
    print(f"TP2xSPxPP2xDP2: loss {results[0]['loss']:.7f} vs {ref_metrics['loss']:.7f} "
          f"(|diff| {max(abs(r['loss'] - ref_metrics['loss']) for r in results):.2e}), "
          f"max grad diff / max |grad| {worst_grad:.2e}")


def test_reference_model_is_frozen_and_never_changes(dpo_files):
    train, _, tok = dpo_files
    for rank, r in enumerate(_results(train, tok)):
        f = r["frozen"]
        assert not f["requires_grad"] and not f["grad"] and not f["training"], (rank, f)
        assert not f["in_optimizer"], rank
        assert f["changed"] == [], f"rank {rank}: reference params changed: {f['changed']}"
        assert f["policy_moved"], rank  # the steps did update the policy
        assert len(r["step_losses"]) == STEPS and all(x == x for x in r["step_losses"])


def test_precomputed_reference_gives_the_same_loss(dpo_files):
    train, _, tok = dpo_files
    for rank, r in enumerate(_results(train, tok)):
        assert r["reference_freed"] and r["has_ref_table"], rank
        assert r["precomputed_loss"] == pytest.approx(r["loss"], abs=PRECOMPUTE_TOL), rank
    print(f"precomputed vs on-the-fly reference: loss |diff| "
          f"{max(abs(r['precomputed_loss'] - r['loss']) for r in _results(train, tok)):.2e}")


def test_interleaved_pipeline_equals_the_formula(dpo_files):
    train, _, tok = dpo_files
    ref_grads, ref_metrics = _direct(train, tok)
    results = _results(train, tok)
    for rank, r in enumerate(results):
        assert abs(r["interleaved"]["loss"] - ref_metrics["loss"]) <= LOSS_TOL, rank
    worst = _check_grads(results, ref_grads, "interleaved")
    print(f"TP2xSPxPP2(interleaved, 2 chunks)xDP2: max grad diff / max |grad| {worst:.2e}")
