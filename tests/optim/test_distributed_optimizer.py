"""ZeRO-1 and bf16 through MegatronOptimizer, against plain data parallelism and fp32.

Each case trains a small DeepSeek model with its own loop (the per-token loss of the global batch,
split into micro-batches and DP ranks as training/schedules.py does) and compares loss curves.
"""

import inspect

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_ds.config import ModelConfig
from megatron_ds.data.mock_dataset import MockGPTDataset
from megatron_ds.model.deepseek import DeepSeekModel
from megatron_ds.optim.distributed_optimizer import MegatronOptimizer
from megatron_ds.optim.lr_schedule import LRSchedule
from megatron_ds.parallel.topology import build_parallel_state, group_size, single_process_state
from tests.multiproc import run_world

CFG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
                  vocab_size=500, max_position_embeddings=64)
# bf16 matmuls are slow on CPUs without AMX: the 100-step bf16 case uses a narrower model.
TINY = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=96, num_attention_heads=2, num_query_groups=1,
                   vocab_size=256, max_position_embeddings=64)
SEQ, GLOBAL_BATCH, MICRO_BATCH = 32, 8, 2


def build_model(cfg=CFG, **kwargs) -> DeepSeekModel:
    """The decoder with the pure-PyTorch kernels: this file tests the optimizer, not the kernels."""
    if "kernels" in inspect.signature(DeepSeekModel).parameters:
        from megatron_ds.kernels import select_kernels

        kwargs["kernels"] = select_kernels(fused=False)
    return DeepSeekModel(cfg, seed=1234, **kwargs)


def _batch(ds, step, dp_rank, dp_size, global_batch, micro_batch):
    """This DP rank's micro-batches of global batch ``step`` (contiguous slice, Megatron's sampler order)."""
    per_rank = global_batch // dp_size
    ids = range(step * global_batch + dp_rank * per_rank, step * global_batch + (dp_rank + 1) * per_rank)
    items = [ds[i] for i in ids]
    mbs = []
    for k in range(0, per_rank, micro_batch):
        chunk = items[k:k + micro_batch]
        mbs.append({key: torch.as_tensor(np.stack([it[key] for it in chunk])) for key in chunk[0]})
    return mbs


def train(steps, *, tp=1, sp=False, distributed=False, dtype=torch.float32, bucket_size=4000, lr=3e-3,
          warmup=5, state=None, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, cfg=CFG, two_chunks=False):
    """Loss of every step (global per-token mean) and the optimizer, for this rank.

    ``two_chunks`` splits the model into two chunks (embedding + layer 0 | layer 1 + head) run one
    after the other, as pipeline stages or interleaved chunks hand the optimizer several buffers.
    """
    state = state or build_parallel_state(tp=tp)
    common = dict(tp_group=state.tp_group, sequence_parallel=sp, params_dtype=dtype)
    if two_chunks:
        chunks = [build_model(cfg, layer_range=range(0, 1), post_process=False, **common),
                  build_model(cfg, layer_range=range(1, cfg.num_layers), pre_process=False, **common)]

        def model(input_ids, labels):
            return chunks[1](hidden_states=chunks[0](input_ids=input_ids), labels=labels)
    else:
        model = chunks = build_model(cfg, **common)
    opt = MegatronOptimizer(chunks, state, lr=lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=1.0,
                            bucket_size=bucket_size, distributed=distributed)
    schedule = LRSchedule(lr=lr, warmup_iters=warmup, decay_iters=steps)
    ds = MockGPTDataset(steps * global_batch, SEQ, cfg.vocab_size, seed=7)
    losses = []
    for step in range(steps):
        mbs = _batch(ds, step, state.dp_rank, state.dp_size, global_batch, micro_batch)
        tokens = float(global_batch * SEQ)  # loss_mask is all ones in the mock data
        opt.zero_grad()
        local = torch.zeros(())
        for i, mb in enumerate(mbs):
            for gb in opt.grad_buffers:
                gb.is_last_microbatch = i == len(mbs) - 1
            token_loss = model(input_ids=mb["tokens"], labels=mb["labels"])  # (b, s) fp32
            loss = (token_loss * mb["loss_mask"]).sum() / tokens
            loss.backward()
            local += loss.detach().float()
        if group_size(state.dp_group) > 1:
            dist.all_reduce(local, group=state.dp_group)
        opt.step(schedule(step))
        losses.append(local.item())
    return losses, opt


def _zero_vs_plain(tp, sp, steps, two_chunks=False):
    plain, plain_opt = train(steps, tp=tp, sp=sp, distributed=False, two_chunks=two_chunks)
    zero, zero_opt = train(steps, tp=tp, sp=sp, distributed=True, two_chunks=two_chunks)
    return dict(plain=plain, zero=zero, plain_state=plain_opt.state_numel(), zero_state=zero_opt.state_numel(),
                plain_buffer=sum(s.grad_buffer.numel for s in plain_opt.shards),
                zero_buffer=sum(s.grad_buffer.numel for s in zero_opt.shards),
                buckets=sum(len(s.grad_buffer.buckets) for s in zero_opt.shards),
                dp=zero_opt.state.dp_size)


# ZeRO-1 changes the order of two fp32 sums: the reduce-scatter's over DP (vs all-reduce) and the
# grad norm's (per-shard partial sums, then over DP). Each is ~1e-7 relative; over 20 AdamW steps
# the curves differ by at most 1.6e-7 relative (measured at DP2, DP4 and TP2xSPxDP2). 2e-6 leaves
# 10x margin, the same bound the trainer-parity tests use for layout changes.
RTOL = 2e-6


@pytest.mark.parametrize("world,tp,sp,two_chunks", [(2, 1, False, False), (4, 1, False, False), (4, 2, True, False),
                                                    (2, 1, False, True)],
                         ids=["dp2", "dp4", "tp2-sp-dp2", "dp2-two-chunks"])
def test_zero1_follows_plain_dp_for_20_steps(world, tp, sp, two_chunks):
    results = run_world(world, _zero_vs_plain, tp=tp, sp=sp, steps=20, two_chunks=two_chunks)
    for rank, r in enumerate(results):
        assert r["plain"][-1] < r["plain"][0] - 0.3, r["plain"]  # it trains
        for step, (a, b) in enumerate(zip(r["zero"], r["plain"]), start=1):
            assert a == pytest.approx(b, rel=RTOL), f"rank {rank} step {step}: ZeRO-1 {a} vs plain DP {b}"
        # Optimizer state from tensor sizes: plain DP holds both moments of every param (fp32 params
        # are their own master); ZeRO-1 holds 1/DP of them plus a 1/DP fp32 master copy. Buckets are
        # padded to a multiple of DP: at most dp - 1 extra elements each.
        dp = r["dp"]
        assert r["zero_buffer"] - r["plain_buffer"] <= r["buckets"] * (dp - 1)
        assert r["zero_state"]["moments"] * dp == r["plain_state"]["moments"] + 2 * (r["zero_buffer"] - r["plain_buffer"])
        assert r["zero_state"]["master"] * dp == r["zero_buffer"]


def test_bf16_tracks_fp32_for_100_steps():
    state = single_process_state()
    small = dict(state=state, global_batch=4, micro_batch=4, cfg=TINY)  # one micro-batch a step: 100 steps stay quick
    fp32, _ = train(100, dtype=torch.float32, **small)
    bf16, opt = train(100, dtype=torch.bfloat16, **small)
    assert opt.state_numel()["master"] == opt.shards[0].grad_buffer.numel  # fp32 master of every param
    # bf16 rounds params and activations to 8 mantissa bits (4e-3 relative per op): the curves
    # differ by noise of that size, not by drift. Measured: max |diff| 0.004 over the 100 steps on a
    # loss falling from 5.55 to 3.46, mean of the last 10 steps equal within 1e-5. Bounds with ~5x
    # margin: 0.02 per step, 0.005 on the last-10 mean.
    diffs = [abs(a - b) for a, b in zip(bf16, fp32)]
    assert fp32[-1] < fp32[0] - 1.5
    assert max(diffs) < 0.02, max(diffs)
    assert abs(sum(bf16[-10:]) - sum(fp32[-10:])) / 10 < 0.005


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))


def test_fp32_master_keeps_updates_below_bf16_resolution():
    # Near 1.0 bf16 values are 2^-8 = 0.0039 apart below 1: an AdamW update of lr = 1e-4 (Adam's
    # step is ~lr when the gradient is steady) rounds away in bf16 arithmetic every single time.
    lr, steps = 1e-4, 100
    model = _Scalar()
    opt = MegatronOptimizer(model, single_process_state(), lr=lr, weight_decay=0.0, clip_grad=0.0)
    plain = torch.ones(4, 4, dtype=torch.bfloat16, requires_grad=True)
    bf16_only = torch.optim.AdamW([plain], lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    for _ in range(steps):
        opt.zero_grad()
        model.w.main_grad.fill_(1.0)
        opt.step()
        plain.grad = torch.ones_like(plain)
        bf16_only.step()
    master = opt.shards[0].master
    assert torch.allclose(master, torch.full_like(master, 1 - lr * steps), rtol=0, atol=1e-5)  # 0.99, tracked
    assert torch.equal(plain.detach(), torch.ones_like(plain))  # bf16 alone never moved
    assert model.w.dtype == torch.bfloat16
    assert torch.equal(model.w.detach(), torch.full_like(model.w, 0.99))  # the master's value, rounded once


def test_state_dict_round_trip_continues_identically():
    # bf16 params with an fp32 master: restore weights + optimizer state into a fresh model, take
    # the same steps on both: bitwise the same params, master weights and moments.
    state = single_process_state()

    def steps(opt, n):
        for k in range(n):
            opt.zero_grad()
            for i, p in enumerate(opt.grad_buffers[0].params):
                p.main_grad.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + i)))
            opt.step(1e-3)

    model_a = build_model(TINY, params_dtype=torch.bfloat16)
    opt_a = MegatronOptimizer(model_a, state, lr=1e-3, bucket_size=4000)
    steps(opt_a, 3)
    model_b = build_model(TINY, params_dtype=torch.bfloat16)
    opt_b = MegatronOptimizer(model_b, state, lr=1e-3, bucket_size=4000)
    model_b.load_state_dict(model_a.state_dict())
    opt_b.reload_model_params()
    opt_b.load_state_dict(opt_a.state_dict())
    steps(opt_a, 2)
    steps(opt_b, 2)
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name
    for attr in ("master", "exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(opt_a.shards[0], attr), getattr(opt_b.shards[0], attr)), attr
