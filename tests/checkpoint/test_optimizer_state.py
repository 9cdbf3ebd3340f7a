"""Optimizer state through the layout-free format, single process: MegatronOptimizer (ZeRO-1 flat
shards, with separate fp32 master weights) and torch AdamW describe it under the same keys, so a
checkpoint of one loads into the other; a checkpoint without optimizer state is a clear error."""

import pytest
import torch

from megatron_ds.checkpoint.checkpointing import load, save
from megatron_ds.checkpoint.format import CheckpointError
from megatron_ds.checkpoint.optimizer_state import (
    load_optimizer_state, optimizer_common_state, optimizer_sharded_tensors,
)
from megatron_ds.optim.distributed_optimizer import MegatronOptimizer
from megatron_ds.optim.optimizer import build_adamw
from tests.checkpoint.helpers import build_stage, parallel_state


def _zero_optimizer_with_state(state):
    model = build_stage(state, seed=3)
    opt = MegatronOptimizer([model], state, distributed=True)
    g = torch.Generator().manual_seed(0)
    for s in opt.shards:
        s.exp_avg.copy_(torch.randn(s.exp_avg.shape, generator=g))
        s.exp_avg_sq.copy_(torch.rand(s.exp_avg_sq.shape, generator=g))
        s.master.add_(torch.randn(s.master.shape, generator=g) * 1e-3)  # differs from the params
    opt.iteration = 7
    return model, opt


def _by_param(model, opt, what):
    """{param name: this optimizer's state ``what`` shaped like the param}."""
    s = opt.shards[0]
    flat = getattr(s, what)
    out = {}
    for name, p in model.named_parameters():
        off = s.grad_buffer.param_offsets[id(p)]
        out[name] = flat[off:off + p.numel()].view(p.shape)  # DP1: shard offsets = buffer offsets
    return out


def test_zero1_state_loads_into_zero1_and_into_torch_adamw(tmp_path):
    state = parallel_state(1, 1)
    model, opt = _zero_optimizer_with_state(state)
    save(str(tmp_path), 7, [model], state, consumed_samples=56, optimizer_tensors=optimizer_sharded_tensors(
        opt, [model], state), common_state={"optimizer": optimizer_common_state(opt)})

    fresh = build_stage(state, seed=9)
    fresh_opt = MegatronOptimizer([fresh], state, distributed=True)
    ckpt = load(str(tmp_path), [fresh], state)
    load_optimizer_state(fresh_opt, [fresh], state, ckpt.reader, ckpt.common_state)
    assert fresh_opt.iteration == 7
    for what in ("exp_avg", "exp_avg_sq", "master"):
        want, got = _by_param(model, opt, what), _by_param(fresh, fresh_opt, what)
        for name in want:
            if name in ("embedding.weight", "lm_head.weight"):  # vocab padding rows are not stored
                n = fresh.config.vocab_size
                assert torch.equal(got[name][:n], want[name][:n]), (what, name)
            else:
                assert torch.equal(got[name], want[name]), (what, name)

    plain = build_stage(state, seed=9)
    adamw = build_adamw(plain, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    ckpt = load(str(tmp_path), [plain], state)
    load_optimizer_state(adamw, [plain], state, ckpt.reader, ckpt.common_state)
    want = _by_param(model, opt, "exp_avg_sq")
    for name, p in plain.named_parameters():
        st = adamw.state[p]
        assert int(st["step"]) == 7
        n = plain.config.vocab_size if name in ("embedding.weight", "lm_head.weight") else p.shape[0]
        assert torch.equal(st["exp_avg_sq"][:n], want[name][:n]), name


def test_checkpoint_without_optimizer_state_names_the_flag(tmp_path):
    state = parallel_state(1, 1)
    model = build_stage(state)
    save(str(tmp_path), 1, [model], state, consumed_samples=0)
    opt = MegatronOptimizer([model], state, distributed=True)
    ckpt = load(str(tmp_path), [model], state)
    with pytest.raises(CheckpointError, match="--no-load-optim"):
        load_optimizer_state(opt, [model], state, ckpt.reader, ckpt.common_state)
