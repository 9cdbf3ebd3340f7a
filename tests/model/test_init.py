"""Initialization does not depend on the layout: every TP shard and pipeline stage built with
seed s holds exactly (bit for bit) the slices of the single-process model built with seed s."""

import pytest
import torch

from megatron_ds.model.deepseek import DeepSeekModel
from megatron_ds.model.hf_names import shard_hf_state_dict_for_tp, to_hf_state_dict
from megatron_ds.parallel.topology import VirtualGroup
from tests.model.hf_reference import model_config

SEED = 4321


@pytest.mark.parametrize("arch,tp", [("mha", 2), ("gqa", 2), ("gqa", 4)])
def test_tp_shards_are_slices_of_the_single_process_model(arch, tp):
    # vocab 512 pads to 512 at TP 1, 2 and 4, so the embedding masters have the same shape.
    cfg = model_config(arch)
    full = to_hf_state_dict(DeepSeekModel(cfg, seed=SEED))
    for rank in range(tp):
        # A VirtualGroup is enough: building a shard draws the master and slices it, no collective.
        shard = DeepSeekModel(cfg, tp_group=VirtualGroup(size=tp, rank=rank), seed=SEED, sequence_parallel=True)
        expected = shard_hf_state_dict_for_tp(full, cfg, rank, tp)
        ours = dict(shard.named_parameters())
        assert set(ours) == set(expected)
        for name, p in ours.items():
            assert torch.equal(p.detach(), expected[name]), f"rank {rank}: {name} differs"


def test_replicated_kv_is_the_full_kv_master_on_every_rank():
    cfg = model_config("gqa")  # 2 KV heads at TP 4
    full = DeepSeekModel(cfg, seed=SEED)
    nq_rows = cfg.num_attention_heads * cfg.head_dim
    kv_master = full.layers["0"].attention.qkv.weight.detach()[nq_rows:]
    for rank in range(4):
        attn = DeepSeekModel(cfg, tp_group=VirtualGroup(4, rank), seed=SEED).layers["0"].attention
        assert torch.equal(attn.kv.weight.detach(), kv_master)
        assert attn.kv.weight.sum_grad_over_tp is True
        assert attn.kv.kv_head == rank // 2


def test_pipeline_stages_hold_the_single_process_weights():
    cfg = model_config("gqa")
    full = dict(DeepSeekModel(cfg, seed=SEED).named_parameters())
    first = DeepSeekModel(cfg, seed=SEED, post_process=False, layer_range=range(0, 1))
    last = DeepSeekModel(cfg, seed=SEED, pre_process=False, layer_range=range(1, 2))
    names = [n for stage in (first, last) for n, _ in stage.named_parameters()]
    assert sorted(names) == sorted(full)  # global names, each in exactly one stage
    for stage in (first, last):
        for name, p in stage.named_parameters():
            assert torch.equal(p, full[name]), name


def test_different_seeds_give_different_weights():
    cfg = model_config("mha")
    a = DeepSeekModel(cfg, seed=1).layers["0"].mlp.down.weight
    b = DeepSeekModel(cfg, seed=2).layers["0"].mlp.down.weight
    assert not torch.equal(a, b)


def test_weight_matrices_have_the_configured_std_and_norms_are_ones():
    cfg = model_config("mha")
    cfg.init_method_std = 0.006
    model = DeepSeekModel(cfg, seed=SEED)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            # >= 16k samples each: the sample std is within a few percent of 0.006.
            assert abs(p.std().item() - 0.006) < 0.0006, name
