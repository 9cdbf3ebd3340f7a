"""DeepSeekModel equals Hugging Face LlamaForCausalLM with the same weights, at TP 1, 2 and 4.

Tolerances: both models run the same fp32 ops in the same order (RMSNorm in fp32, the same RoPE
tables, SDPA with the same scale, SwiGLU); the only differences are summation order inside
matmuls (fused QKV / gate_up GEMMs, GEMMs split over TP then summed by all-reduce or
reduce-scatter, vocab-parallel softmax). fp32 reassociation errors are ~1e-7 relative per op
and do not compound beyond ~1e-6 through 2 layers, so 1e-5 of the tensor's scale is a bound
with a margin that still catches any real mistake (a wrong head, rotation or norm gives O(1)).
"""

import pytest
import torch
import torch.distributed as dist

from megatron_ds.model.deepseek import DeepSeekModel
from megatron_ds.model.hf_names import load_hf_state_dict, shard_hf_state_dict_for_tp
from tests.model.hf_reference import hf_reference, max_rel_err, model_config
from tests.multiproc import run_world

TOL = 1e-5  # of the tensor's max magnitude; see the module docstring


def _grad_errors(model, hf_grads, tp_rank, tp_size, tp_group):
    """Per-parameter error of this rank's grads against the slices of HF's grads.

    Grads marked ``sequence_parallel`` (norm weights under SP) or ``sum_grad_over_tp`` (replicated
    KV projection) are partial on each rank: summed over TP first, as the trainer does.
    """
    expected = shard_hf_state_dict_for_tp(hf_grads, model.config, tp_rank, tp_size)
    errors = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if tp_size > 1 and (getattr(p, "sequence_parallel", False) or getattr(p, "sum_grad_over_tp", False)):
            dist.all_reduce(g, group=tp_group)
        errors[name] = max_rel_err(g, expected[name])
    return errors


def _run_ours(cfg, hf_sd, ids, labels, hf_grads, tp_group=None, sequence_parallel=False):
    """Our full-vocab logits (padding columns dropped), per-token loss and grad errors on this rank."""
    tp, rank = (dist.get_world_size(tp_group), dist.get_rank(tp_group)) if tp_group is not None else (1, 0)
    model = DeepSeekModel(cfg, tp_group=tp_group, sequence_parallel=sequence_parallel)
    load_hf_state_dict(model, hf_sd)
    with torch.no_grad():
        logits = model(input_ids=ids).contiguous()  # [b, s, V_padded/tp]
    if tp > 1:
        shards = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(shards, logits, group=tp_group)
        logits = torch.cat(shards, dim=-1)
    loss = model(input_ids=ids, labels=labels)  # [b, s] fp32
    loss.sum().backward()
    grad_errors = _grad_errors(model, hf_grads, rank, tp, tp_group)
    return dict(logits=logits[..., :cfg.vocab_size], loss=loss.detach(), grad_errors=grad_errors,
                padding_logits=logits[..., cfg.vocab_size:])


def _check(result, ref_logits, ref_loss):
    assert result["logits"].shape == ref_logits.shape
    assert max_rel_err(result["logits"], ref_logits) < TOL
    assert result["loss"].dtype == torch.float32
    torch.testing.assert_close(result["loss"], ref_loss, rtol=TOL, atol=TOL)
    worst = max(result["grad_errors"].items(), key=lambda kv: kv[1])
    assert worst[1] < TOL, f"gradient of {worst[0]} differs from HF's by {worst[1]:.2e} of its scale"
    # Padded vocab rows were loaded as zeros, so the padding logits are exactly zero.
    assert torch.all(result["padding_logits"] == 0)


@pytest.mark.parametrize("vocab_size", [512, 1000])
@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_tp1_logits_loss_and_grads_equal_hf(arch, vocab_size):
    cfg = model_config(arch, vocab_size)
    assert cfg.padded_vocab_size(1) == (512 if vocab_size == 512 else 1024)
    hf_sd, ids, labels, ref_logits, ref_loss, hf_grads = hf_reference(arch, vocab_size)
    _check(_run_ours(cfg, hf_sd, ids, labels, hf_grads), ref_logits, ref_loss)


def _tp_rank(arch, vocab_size, hf_sd, ids, labels, hf_grads, sequence_parallel):
    torch.manual_seed(0)
    return _run_ours(model_config(arch, vocab_size), hf_sd, ids, labels, hf_grads,
                     tp_group=dist.group.WORLD, sequence_parallel=sequence_parallel)


def _check_world(size, arch, vocab_size, sequence_parallel):
    hf_sd, ids, labels, ref_logits, ref_loss, hf_grads = hf_reference(arch, vocab_size)
    results = run_world(size, _tp_rank, arch=arch, vocab_size=vocab_size, hf_sd=hf_sd, ids=ids, labels=labels,
                        hf_grads=hf_grads, sequence_parallel=sequence_parallel)
    for result in results:
        _check(result, ref_logits, ref_loss)


@pytest.mark.parametrize("arch,vocab_size", [("mha", 512), ("gqa", 1000)])
def test_tp2_sequence_parallel_equals_hf(arch, vocab_size):
    _check_world(2, arch, vocab_size, sequence_parallel=True)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp4_replicated_kv_heads_equal_hf(sequence_parallel):
    # 2 KV heads over 4 ranks: each rank holds the full K/V projection and uses KV head rank // 2.
    assert model_config("gqa").num_kv_heads == 2
    _check_world(4, "gqa", 1000, sequence_parallel=sequence_parallel)
