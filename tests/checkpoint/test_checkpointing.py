"""The trainer-facing save/load: counters, shared state and RNG streams come back at the same
layout; at another layout the weights load and the RNG is left as seeded."""

import torch

from megatron_ds.checkpoint.checkpointing import load, save
from megatron_ds.checkpoint.save import AsyncCheckpointWriter
from megatron_ds.parallel.random import model_parallel_manual_seed
from megatron_ds.parallel.topology import ParallelState
from tests.checkpoint.helpers import (
    build_stage, config, hf_weights, mismatches, model_with_weights, new_model, parallel_state,
)
from tests.multiproc import run_world


def test_resume_restores_counters_state_and_rng_streams(tmp_path):
    state = ParallelState()
    tracker = model_parallel_manual_seed(5, 0, 0)
    model = model_with_weights(state, hf_weights())
    torch.rand(3)
    with tracker.fork():
        torch.rand(3)
    writer = AsyncCheckpointWriter()
    save(str(tmp_path), 20, [model], state, consumed_samples=160, config=config(), rng_tracker=tracker,
         common_state={"lr_schedule": {"last_step": 20}}, writer=writer)
    writer.wait()
    expect_default = torch.rand(4)
    with tracker.fork():
        expect_tp = torch.rand(4)

    fresh_tracker = model_parallel_manual_seed(99, 0, 0)
    fresh = new_model(seed=7)
    ckpt = load(str(tmp_path), [fresh], state, rng_tracker=fresh_tracker)
    assert (ckpt.iteration, ckpt.consumed_samples, ckpt.common_state) == (20, 160, {"lr_schedule": {"last_step": 20}})
    assert ckpt.rng_restored and mismatches(fresh, hf_weights(), 0, 1) == []
    assert torch.equal(torch.rand(4), expect_default)
    with fresh_tracker.fork():
        assert torch.equal(torch.rand(4), expect_tp)


def test_load_at_another_layout_leaves_rng_as_seeded(tmp_path):
    model = model_with_weights(ParallelState(), hf_weights())
    save(str(tmp_path), 1, [model], ParallelState(), consumed_samples=8)
    other = ParallelState(pp_size=2, pp_rank=1)
    stage = new_model(pre_process=False, layer_range=range(1, 2))
    assert not load(str(tmp_path), [stage], other).rng_restored


def _save_then_load(root, hf_sd, save_tp, load_tp):
    state = parallel_state(save_tp, 1)
    writer = AsyncCheckpointWriter()
    save(root, 5, [model_with_weights(state, hf_sd)], state, consumed_samples=40, config=config(), writer=writer)
    writer.wait()
    torch.distributed.barrier()  # rank 0 returns from wait() only once the checkpoint is committed
    state = parallel_state(load_tp, 1)
    model = build_stage(state)
    ckpt = load(root, [model], state)
    return ckpt.rng_restored, mismatches(model, hf_sd, state.tp_rank, load_tp)


def test_world_saves_at_tp2_dp2_and_resumes_at_tp4(tmp_path):
    results = run_world(4, _save_then_load, root=str(tmp_path), hf_sd=hf_weights(), save_tp=2, load_tp=4)
    assert results == [(False, [])] * 4
