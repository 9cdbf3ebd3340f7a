"""megatron_ds/memory.py against the tensors a built model and optimizer really hold."""

import pytest
import torch

from megatron_ds import memory
from megatron_ds.optim.distributed_optimizer import MegatronOptimizer
from megatron_ds.parallel.topology import single_process_state
from tests.optim.test_distributed_optimizer import CFG, build_model


def _nbytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_params_grads_optimizer_match_the_built_model(dtype):
    model = build_model(params_dtype=dtype)
    opt = MegatronOptimizer(model, single_process_state(), bucket_size=10**9)  # one bucket: no padding
    est = memory.estimate(CFG, bf16=dtype == torch.bfloat16)
    params = list(model.parameters())
    shard = opt.shards[0]
    assert est.num_params == sum(p.numel() for p in params)
    assert est.params == sum(p.numel() * p.element_size() for p in params)
    assert est.grads == shard.grad_buffer.buffer.numel() * 4
    held = [shard.exp_avg, shard.exp_avg_sq] + ([] if shard.master_is_param_buffer else [shard.master])
    assert est.optimizer == _nbytes(held)


def test_zero1_divides_the_optimizer_state_by_dp():
    plain = memory.estimate(CFG, dp=4, bf16=True)
    zero = memory.estimate(CFG, dp=4, bf16=True, distributed_optimizer=True)
    assert zero.optimizer * 4 == pytest.approx(plain.optimizer, abs=16)
    assert zero.params == plain.params


def test_activation_estimate_is_close_to_what_autograd_saves():
    # Count the bytes of every distinct tensor autograd saves in one forward of a micro-batch.
    b, s = 2, 32
    model = build_model()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    ids = torch.randint(0, CFG.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).sum()
    params = {p.data_ptr() for p in model.parameters()}
    measured = _nbytes([t for t in saved if t.data_ptr() not in params and t.dtype.is_floating_point])
    # build_model runs the reference kernels: its cross-entropy keeps an fp32 softmax beside the logits
    est = memory.estimate(CFG, micro_batch=b, seq=s, bf16=False, fused_cross_entropy=False).activations_per_microbatch
    # The estimate counts the large tensors only (no rotary tables, norm statistics, softmax
    # log-sum-exp, loss mask): measured 5% under on this small shape, where those weigh the most.
    assert est == pytest.approx(measured, rel=0.15), (est, measured)


def test_full_recompute_keeps_less_than_selective_less_than_none():
    kw = dict(tp=2, sp=True, micro_batch=1, seq=4096)
    from megatron_ds.config import model_preset

    cfg = model_preset("deepseek-7b")
    none, sel, full = (memory.estimate(cfg, recompute=r, **kw).activations_per_microbatch
                       for r in (None, "selective", "full"))
    assert full < sel < none


def test_estimate_for_config_reads_the_layout_flags():
    from megatron_ds.config import config_from_args

    cfg = config_from_args(["--model", "deepseek-7b", "--tensor-model-parallel-size", "8", "--sequence-parallel",
                            "--bf16", "--use-distributed-optimizer", "--micro-batch-size", "1", "--seq-length", "4096"])
    est = memory.estimate_for_config(cfg, dp_size=8)
    assert est == memory.estimate(cfg.model, tp=8, dp=8, sp=True, bf16=True, distributed_optimizer=True,
                                  micro_batch=1, seq=4096)
    assert est.params == 2 * est.num_params and est.optimizer == 12 * est.num_params // 8


def _saved_at_tp2_sp():
    from megatron_ds.config import config_from_args
    from megatron_ds.parallel.topology import build_parallel_state
    from megatron_ds.pretrain import build_model

    s, b = 256, 2
    cfg = config_from_args(["--model", "tiny", "--seq-length", str(s), "--micro-batch-size", str(b),
                            "--global-batch-size", str(b), "--tensor-model-parallel-size", "2", "--sequence-parallel",
                            "--mock-data", "--bf16"])
    model = build_model(cfg, build_parallel_state(tp=2))
    model = model[0] if isinstance(model, (list, tuple)) else model
    saved = []
    ids = torch.randint(0, cfg.model.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(input_ids=ids, labels=ids).sum()
    params = {p.data_ptr() for p in model.parameters()}
    acts = [t for t in saved if t.data_ptr() not in params and t.dtype.is_floating_point]
    h = cfg.model.hidden_size
    gathered = [tuple(t.shape) for t in acts if tuple(t.shape) in ((s, b, h), (s * b, h))]
    est = memory.estimate_for_config(cfg, 1, 0).activations_per_microbatch
    return _nbytes(acts), est, gathered


def test_sequence_parallel_keeps_the_linear_inputs_sharded():
    """At TP2 with SP no layer keeps a gathered [s, b, h] input for backward (the column-parallel
    GEMMs gather it again, parallel/linear_comm.py), and the estimate, which counts those inputs as
    [s/tp, b, h], stays close to what autograd saves. Measured: 6.30 MB saved (6.89 MB when the
    gathered inputs were kept), estimate 6.49 MB: 3% over; 15% is the bound the other activation
    estimates are held to."""
    from tests.multiproc import run_world

    for measured, est, gathered in run_world(2, _saved_at_tp2_sp):
        assert gathered == [], gathered
        assert est == pytest.approx(measured, rel=0.15), (est, measured)
