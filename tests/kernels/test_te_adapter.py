"""The Transformer Engine adapters (megatron_ds/kernels/te.py) on CPU, with a stand-in for TE's API
(tests/kernels/te_double.py: its Linear is a plain local GEMM), so what is ours is checked in CI:

- routing keeps every parameter name and shares the weight Parameter with the TE module;
- at TP 2 with sequence parallelism, the routed model's loss and every gradient equal the local
  layers' bitwise (same local GEMMs; only the class that runs them changed), so the all-gather /
  reduce-scatter around the TE GEMM is right;
- FP8 autocasts reduce amaxes over the TP group, and with TP 1 not at all (never TE's "None means
  the world");
- the TE modules' FP8 state goes through a checkpoint and comes back at the same layout.
"""

import torch

from megatron_ds.checkpoint.checkpointing import load, save
from megatron_ds.config import config_from_args
from megatron_ds.parallel.topology import ParallelState, build_parallel_state, single_process_state
from megatron_ds.pretrain import build_model
from tests.kernels import te_double
from tests.multiproc import run_world

FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16", "--max-position-embeddings", "16",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--mock-data"]


def _model(state, extra=()):
    return build_model(config_from_args(FLAGS + list(extra)), state)


def _routed(state, fp8="hybrid", extra=()):
    from megatron_ds.kernels.te import use_transformer_engine

    model = _model(state, extra)
    assert use_transformer_engine(model, fp8_format=fp8) == 4 * 2  # qkv, dense, gate_up, down per layer
    return model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (2, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_routing_keeps_names_and_shares_the_weight():
    te_double.install()
    try:
        plain, routed = _model(single_process_state()), _routed(single_process_state())
        assert list(plain.state_dict()) == list(routed.state_dict())
        modules = [m for m in routed.modules() if hasattr(m, "_te_gemm")]
        assert len(modules) == 8 and all(m._te_gemm.linear.weight is m.weight for m in modules)
        assert sum(1 for _ in routed.parameters()) == sum(1 for _ in plain.parameters())
    finally:
        te_double.uninstall()


def _tp2_equal():
    te_double.install()
    try:
        state = build_parallel_state(2, 1)
        sp = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
        plain, routed = _model(state, sp), _routed(state, extra=sp)
        ids, labels = _batch()
        losses = []
        for model in (plain, routed):
            loss = model(input_ids=ids, labels=labels).mean()
            loss.backward()
            losses.append(loss.detach())
        grads_equal = all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), routed.parameters()))
        groups = {id(g) for _, g in te_double.AUTOCASTS}
        reduce = {r.reduce_amax for r, _ in te_double.AUTOCASTS}
        return (torch.equal(losses[0], losses[1]), grads_equal, groups == {id(state.tp_group)}, reduce,
                len(te_double.AUTOCASTS))
    finally:
        te_double.uninstall()


def test_tp2_sequence_parallel_routed_model_equals_the_local_layers():
    for loss_equal, grads_equal, tp_group_only, reduce, autocasts in run_world(2, _tp2_equal):
        assert loss_equal and grads_equal
        assert tp_group_only and reduce == {True} and autocasts == 8  # one per GEMM forward


def test_tp1_reduces_no_amax():
    te_double.install()
    try:
        model = _routed(single_process_state())
        ids, labels = _batch()
        model(input_ids=ids, labels=labels).mean().backward()
        assert {(r.reduce_amax, g) for r, g in te_double.AUTOCASTS} == {(False, None)}
    finally:
        te_double.uninstall()


def test_fp8_state_goes_through_a_checkpoint(tmp_path):
    te_double.install()
    try:
        model = _routed(single_process_state())
        ids, labels = _batch(1)
        for _ in range(2):  # two forwards: two entries in each layer's stand-in amax history
            model(input_ids=ids, labels=labels).mean().backward()
        save(str(tmp_path), 2, [model], ParallelState(), consumed_samples=4)
        fresh = _routed(single_process_state())
        assert load(str(tmp_path), [fresh], ParallelState()).module_states == (8, 8)
        for a, b in zip(model.modules(), fresh.modules()):
            if hasattr(a, "_te_gemm"):
                assert a._te_gemm.linear.amax_history.min() > 0
                assert torch.equal(a._te_gemm.linear.amax_history, b._te_gemm.linear.amax_history)
        bf16_te = _routed(single_process_state(), fp8=None)  # TE in BF16 keeps no FP8 state
        assert load(str(tmp_path), [bf16_te], ParallelState()).module_states == (0, 0)
    finally:
        te_double.uninstall()
