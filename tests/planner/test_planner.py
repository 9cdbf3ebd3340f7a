"""The layout planner: its communication volumes against hand arithmetic, memory rejections with a reason,
and the 67B proposals at 256 and 1024 GPUs checked by building the model on the meta device."""

import contextlib
import dataclasses
import io

import pytest

from megatron_ds import planner
from megatron_ds.dpo import DPORunConfig
from megatron_ds.config import ModelConfig, config_from_args, model_preset, validate
from megatron_ds.memory import estimate
from megatron_ds.model.param_count import rank_parameter_counts
from megatron_ds.model.partition import rank_chunk_ranges, stage_layer_counts, stage_parameter_counts

PARAMS_67B = 67_425_001_472  # deepseek-67b with the vocabulary padded to 102400 (docs/deepseek-llm.md: 67.43 B)


@pytest.fixture(scope="module")
def proposals():
    """The planner's 67B pick on H100 clusters of 256 and 1024 GPUs at the paper's batch (4608 x 4096)."""
    return {n: planner.propose("deepseek-67b", n, "h100", global_batch=4608) for n in (256, 1024)}


# ---- communication formulas on a small case, by hand -----------------------------------------------------
# h = 128, s = 16, b = 2: one bf16 activation (s b h) is 16 * 2 * 128 * 2 = 8192 bytes.
SMALL = ModelConfig(num_layers=4, hidden_size=128, ffn_hidden_size=352, num_attention_heads=8, num_query_groups=4)


def test_tp_sp_bytes_per_layer():
    # 10 transfers per layer, each moving 3/4 of 8192 bytes per GPU at TP 4: forward 2 AG + 2 RS;
    # backward 2 AG (row-parallel grads) + 2 re-gathers and 2 RS (column-parallel backward)
    assert planner.tp_bytes_per_layer(SMALL, 4, 16, 2, None) == 10 * 6144
    assert planner.tp_bytes_per_layer(SMALL, 4, 16, 2, "full") == 14 * 6144  # recompute repeats the forward's 4
    assert planner.tp_bytes_per_layer(SMALL, 2, 16, 2, None) == 10 * 4096
    assert planner.tp_bytes_per_layer(SMALL, 1, 16, 2, None) == 0


def test_column_parallel_backward_comm_hides_behind_its_gemms():
    # SMALL at TP 4: one transfer is 6144 bytes; at 1 GB/s and no latency that is 6.144 us.
    c = planner.Cluster(num_gpus=4, latency_us=0.0,
                        gpu=planner.GPUSpec("test", memory_gib=80, peak_bf16_tflops=1, nvlink_gbps=1, ib_gbps=1))
    t_one = 6144 / 1e9
    # qkv rows (8 + 2 * 4) * 16 = 256, gate/up 2 * 352 = 704; one backward GEMM = 2 s b h out / rate
    gemms = [2 * 16 * 2 * 128 * out for out in (256, 704)]  # FLOPs
    fast = 1e15  # GEMMs far shorter than a transfer: all 10 transfers exposed
    assert planner.tp_time_per_layer(SMALL, c, 4, 16, 2, None, fast) == pytest.approx(
        6 * t_one + sum(2 * (t_one - g / fast) for g in gemms))
    slow = 1e6  # GEMMs longer than a transfer: the column-parallel 4 are hidden, 6 remain
    assert planner.tp_time_per_layer(SMALL, c, 4, 16, 2, None, slow) == pytest.approx(6 * t_one)
    assert planner.tp_time_per_layer(SMALL, c, 4, 16, 2, "full", slow) == pytest.approx(10 * t_one)
    half = dataclasses.replace(c, tp_overlap=0.5)  # tp_overlap applies to the 6 outside the column backward
    assert planner.tp_time_per_layer(SMALL, half, 4, 16, 2, None, slow) == pytest.approx(3 * t_one)
    assert planner.tp_time_per_layer(SMALL, c, 1, 16, 2, None, slow) == 0.0


def test_pp_bytes_per_microbatch():
    # output forward + gradient backward, each the sequence shard 8192 / 4
    assert planner.pp_bytes_per_microbatch(SMALL, 4, 16, 2) == 2 * 2048


def test_zero1_bytes():
    # 1000 params over DP 4: reduce-scatter 3/4 of 4000 fp32 bytes, all-gather 3/4 of 2000 bf16 bytes
    assert planner.zero1_bytes(1000, 4) == (3000, 1500)
    assert planner.zero1_bytes(1000, 1) == (0, 0)


def test_comm_time_is_bandwidth_plus_latency():
    c = planner.Cluster(num_gpus=8, latency_us=10)
    assert planner.comm_time(2e9, 100, c, count=3) == pytest.approx(0.02 + 30e-6)


def test_overlapped_param_gather_hides_at_most_the_first_forward():
    """--overlap-param-gather: the exposed DP time drops by param_gather_overlap of the all-gather, but
    never by more than stage 0's first forward (a third of its forward + backward of one micro-batch)."""
    import dataclasses

    config, lay = model_preset("deepseek-7b"), planner.Layout(1, 1, 64, 1, None, 1, (30,))
    without = planner.Cluster(num_gpus=64, gpu=planner.GPUS["a100"], param_gather_overlap=0.0)
    base = planner.evaluate(config, without, lay, global_batch=2304, seq=4096)
    t_ag = planner.comm_time(planner.zero1_bytes(base.memory.num_params, 64)[1], without.gpu.ib_gbps, without)
    for share in (0.5, 1.0):
        p = planner.evaluate(config, dataclasses.replace(without, param_gather_overlap=share), lay,
                             global_batch=2304, seq=4096)
        first_forward = p.compute_s / p.num_microbatches / 3
        hidden = base.dp_comm_s - p.dp_comm_s
        assert hidden == pytest.approx(min(share * t_ag, first_forward))
        assert p.step_s == pytest.approx(base.step_s - hidden)
    tiny_batch = planner.evaluate(config, dataclasses.replace(without, param_gather_overlap=1.0), lay,
                                  global_batch=64, seq=256)
    tiny_base = planner.evaluate(config, without, lay, global_batch=64, seq=256)
    assert tiny_base.dp_comm_s - tiny_batch.dp_comm_s == pytest.approx(tiny_batch.compute_s / 3)  # capped


@pytest.mark.parametrize("vpp", [1, 2])
def test_bubble_is_pipeline_fill_over_step(vpp):
    """8 layers, PP 4 x DP 2, 16 sequences of mb 1: M = 8 micro-batches; bubble (P-1)/V / (M + (P-1)/V)."""
    config = model_preset("small")
    c = planner.Cluster(num_gpus=8, gpus_per_node=8)
    lay = planner.Layout(1, 4, 2, 1, None, vpp, (2, 2, 2, 2))
    p = planner.evaluate(config, c, lay, global_batch=16, seq=256)
    assert p.feasible, p.reason
    assert p.num_microbatches == 8
    assert p.bubble == pytest.approx((3 / vpp) / (8 + 3 / vpp))


# ---- feasibility -----------------------------------------------------------------------------------------

def test_layout_over_memory_is_rejected_with_its_reason():
    """67B unsplit on 8 H100s: 67 B params x (2 + 4 + 4/8 + 12/8) bytes alone is ~470 GiB per GPU."""
    config = model_preset("deepseek-67b")
    c = planner.Cluster(num_gpus=8)
    p = planner.evaluate(config, c, planner.Layout(1, 1, 8, 1, "full", 1, (95,)), global_batch=4608, seq=4096)
    assert not p.feasible
    assert p.reason.startswith("out of memory: stage 0 needs ")
    assert "68.0 GiB budget" in p.reason and "params 125.59 GiB" in p.reason  # 67.4 B x 2 bytes
    assert p.memory.total > c.budget_bytes


def test_rule_breaking_layouts_are_rejected_with_the_trainers_message():
    config = model_preset("deepseek-67b")
    c = planner.Cluster(num_gpus=256)
    p = planner.evaluate(config, c, planner.Layout(16, 1, 16, 1, None, 1, (95,)), global_batch=4608, seq=4096)
    assert "TP 16 does not fit in a 8-GPU node" in p.reason
    p = planner.evaluate(config, c, planner.Layout(1, 1, 256, 4, None, 1, (95,)), global_batch=4608, seq=4096)
    assert p.reason == ("--global-batch-size 4608 is not a multiple of --micro-batch-size 4 x data-parallel size 256")


def test_balanced_split_lightens_the_last_stage_for_the_lm_head():
    assert planner.balanced_split(95, 8, 1.2) == [12] * 7 + [11]
    assert planner.balanced_split(95, 16, 1.2) == [6] * 15 + [5]
    assert planner.balanced_split(8, 4, 0.0) == [2, 2, 2, 2]
    assert planner.split_flags([12] * 7 + [11]) == ["--decoder-last-pipeline-num-layers", "11"]
    assert planner.split_flags([3, 4, 4, 5]) == ["--decoder-first-pipeline-num-layers", "3",
                                                 "--decoder-last-pipeline-num-layers", "5"]
    assert planner.split_flags([3, 4, 5, 4]) == ["--pipeline-layer-split", "3,4,5,4"]
    assert planner.split_flags([4, 4]) == []


def test_feasible_plans_come_first_fastest_first():
    plans = planner.plan_layouts(model_preset("deepseek-7b"), planner.Cluster(num_gpus=16), global_batch=2304)
    ok = [p for p in plans if p.feasible]
    assert ok and all(p.feasible for p in plans[: len(ok)])
    assert [p.step_s for p in ok] == sorted(p.step_s for p in ok)
    assert all(p.memory.total <= planner.Cluster(num_gpus=16).budget_bytes for p in ok)


# ---- the 67B proposals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("gpus", [256, 1024])
def test_67b_proposal_fits_by_the_memory_estimate(proposals, gpus):
    p = proposals[gpus]
    lay = p.layout
    assert lay.tp * lay.pp * lay.dp == gpus and lay.tp <= 8
    budget = planner.Cluster(num_gpus=gpus).budget_bytes
    # every stage, straight from memory.py, fits (the planner only looked at the candidates for largest)
    for r in range(lay.pp):
        e = estimate(model_preset("deepseek-67b"), tp=lay.tp, pp=lay.pp, dp=lay.dp, sp=lay.tp > 1,
                     recompute=lay.recompute, micro_batch=lay.micro_batch, seq=4096, bf16=True,
                     distributed_optimizer=True, pp_rank=r, stage_layers=list(lay.stage_layers))
        assert e.total <= p.memory.total <= budget
    assert 0 < p.bubble < 0.15 and 0.3 < p.mfu < 0.6


@pytest.mark.parametrize("gpus", [256, 1024])
def test_67b_proposal_on_the_meta_device(proposals, gpus):
    """The proposal's flags go through the trainer's CLI and checks; the model built stage by stage on the
    meta device (VirtualGroup TP shards) has the planned layers per stage and all 67,425,001,472 parameters."""
    p = proposals[gpus]
    lay = p.layout
    argv = ["--model", "deepseek-67b", *lay.flags(95), "--global-batch-size", "4608", "--seq-length", "4096"]
    cfg = config_from_args(argv)
    validate(cfg, gpus)
    # the flags carry what the memory and step-time estimates assume
    t = cfg.training
    assert t.bf16 and t.use_distributed_optimizer and t.overlap_param_gather
    assert stage_layer_counts(95, cfg.parallel) == list(lay.stage_layers)

    stages = stage_parameter_counts(cfg.model, lay.tp, cfg.parallel)
    assert [sum(len(r) for r in s["layers"]) for s in stages] == list(lay.stage_layers)
    assert stages[0]["layers"][0].start == 0 and stages[-1]["layers"][-1].stop == 95
    assert sum(s["parameters"] for s in stages) == PARAMS_67B

    # one rank per stage: TP rank 0's shard x TP + its replicated copies is the stage (equal shards, 8 KV heads
    # divide by TP), and the rank the memory estimate charged holds what it counted
    for s in stages:
        r = s["pp_rank"]
        (rng,) = rank_chunk_ranges(95, cfg.parallel, r)
        c = rank_parameter_counts(cfg.model, lay.tp, 0, layer_range=rng, pre_process=r == 0, post_process=r == lay.pp - 1)
        assert c["sharded"] * lay.tp + c["replicated"] == s["parameters"]
        if r == p.memory_stage:
            assert c["sharded"] + c["replicated"] == p.memory.num_params


def test_plan_layout_tool_prints_the_table_and_flags():
    from tools import plan_layout

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert plan_layout.main(["--model", "deepseek-7b", "--gpus", "16", "--top", "3", "--show-rejected", "1"]) == 0
    text = out.getvalue()
    assert "deepseek-7b on 16 x h100" in text and "bubble" in text and "rejected " in text
    best = planner.propose("deepseek-7b", 16, global_batch=2304)
    assert text.strip().splitlines()[-1] == "flags: " + " ".join(best.layout.flags(30))


def test_plan_layout_tool_bad_input_is_one_line(capsys):
    from tools import plan_layout

    assert plan_layout.main(["--gpus", "8", "--gpu", "v100"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert plan_layout.main(["--gpus", "8", "--model", "deepseek-67b"]) == 2  # nothing fits on 8 x 80 GB


def test_plan_layout_tool_checks_one_layout(capsys, proposals):
    from tools import plan_layout

    p = proposals[256]
    split = ",".join(map(str, p.layout.stage_layers))
    assert plan_layout.main(["--gpus", "256", "--layout", str(p.layout.tp), str(p.layout.pp), "1", "--split", split]) == 0
    assert f"est. {p.step_s:.2f} s/step" in capsys.readouterr().out
    assert plan_layout.main(["--gpus", "8", "--layout", "1", "1", "1"]) == 1  # 67B on one node: does not fit
    assert "does not fit: out of memory" in capsys.readouterr().out


def test_pruning_rejects_only_layouts_that_do_not_fit():
    """The pruned search rejects exactly what evaluating every layout rejects (and the same winner)."""
    config, c = model_preset("deepseek-67b"), planner.Cluster(num_gpus=64)
    pruned = planner.plan_layouts(config, c, global_batch=4608)
    full = planner.plan_layouts(config, c, global_batch=4608, prune=False)
    key = lambda p: (p.layout.name(), p.feasible)  # noqa: E731
    assert sorted(map(key, pruned)) == sorted(map(key, full))
    assert pruned[0].layout == full[0].layout and pruned[0].step_s == full[0].step_s
    assert any(p.reason.startswith("out of memory: needs at least what") for p in pruned)


def test_launch_scripts_default_to_the_planners_pick(proposals):
    """The 7B and 67B scripts say their default layout is the fastest the planner finds (64 and 256
    H100s), and the 67B script names the 1024-GPU pick: all three hold."""
    from tests.examples.test_launch_scripts import printed_command, run

    picks = {"67b": (32, proposals[256].layout),
             "7b": (8, planner.propose("deepseek-7b", 64, "h100", global_batch=2304).layout)}
    for script, (nnodes, lay) in picks.items():
        r = run(script, DRY_RUN=1, NNODES=nnodes, NODE_RANK=0, MASTER_ADDR="node0", MASTER_PORT=6000)
        assert r.returncode == 0, r.stderr
        _, args = printed_command(r.stdout)
        p, t = config_from_args(args).parallel, config_from_args(args).training
        assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, t.micro_batch_size,
                t.recompute_granularity) == (lay.tp, lay.pp, lay.micro_batch, lay.recompute), script
        if lay.pp > 1:
            assert stage_layer_counts(95, p) == list(lay.stage_layers)
    assert (proposals[1024].layout.tp, proposals[1024].layout.pp) == (4, 8)


def test_dpo_script_defaults_to_the_planners_pick_for_its_rows():
    """examples/dpo_deepseek_67b.sh: 512 pairs = 1024 rows, one pair (2 rows) per micro-batch."""
    from tests.examples.test_launch_scripts import dpo_command, run_dpo

    cluster = planner.Cluster(num_gpus=256, gpu=planner.GPUS["h100"])
    best = planner.plan_layouts(model_preset("deepseek-67b"), cluster, global_batch=1024, seq=4096,
                                micro_batches=(2,))[0]
    r = run_dpo(DRY_RUN=1, NNODES=32, NODE_RANK=0, MASTER_ADDR="node0")
    assert r.returncode == 0, r.stderr
    cfg = config_from_args(dpo_command(r.stdout)[1], DPORunConfig, "megatron_ds.dpo")
    p = cfg.parallel
    assert best.feasible and (best.layout.tp, best.layout.pp, best.layout.recompute) == (
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.training.recompute_granularity)
    assert 2 * cfg.training.micro_batch_size == best.layout.micro_batch
