"""tools/checkpoint/reshard.py writes, for each rank of the target layout, exactly the blocks that
rank's model holds after the in-process loader read the original checkpoint."""

import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import load_model, model_sharded_tensors, stage_layer_range
from megatron_ds.checkpoint.save import piece_name, save_checkpoint
from megatron_ds.parallel.topology import VirtualGroup
from tests.checkpoint.helpers import config, hf_weights, model_with_weights, new_model
from megatron_ds.parallel.topology import ParallelState
from tools.checkpoint.reshard import main as reshard_main


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A TP1 checkpoint with a common state and non-init weights."""
    root = str(tmp_path_factory.mktemp("src"))
    model = model_with_weights(ParallelState(), hf_weights())
    save_checkpoint(root, 12, model_sharded_tensors(model), consumed_samples=96, config=config(),
                    common_state={"lr_step": 12}, tokenizer={"path": "tok.json", "sha256_16": "ab"})
    return root


def _loaded_by_trainer(root, tp, tp_rank, pp, pp_rank):
    model = new_model(tp_group=VirtualGroup(tp, tp_rank) if tp > 1 else None, pre_process=pp_rank == 0,
                      post_process=pp_rank == pp - 1, layer_range=stage_layer_range(config().num_layers, pp, pp_rank))
    load_model(model, CheckpointReader(root))
    return model


@pytest.mark.parametrize("tp,pp", [(4, 1), (2, 2), (1, 1)])
def test_reshard_output_equals_what_the_loader_gives_that_layout(source, tmp_path, tp, pp):
    out = str(tmp_path / "out")
    args = ["--load", source, "--save", out] + (["--unsharded"] if tp == pp == 1 else
                                                ["--target-tp", str(tp), "--target-pp", str(pp)])
    assert reshard_main(args) == 0
    ckpt = os.path.join(out, "iter_0000012")
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            stored = load_file(os.path.join(ckpt, f"rank_{pp_rank * tp + tp_rank:05d}.safetensors"))
            model = _loaded_by_trainer(source, tp, tp_rank, pp, pp_rank)
            expected = {piece_name(p): p.data for p in model_sharded_tensors(model) if p.replica_id == 0}
            assert stored.keys() == expected.keys()
            for name, t in expected.items():
                assert torch.equal(stored[name], t), name
    reader = CheckpointReader(out)
    assert (reader.iteration, reader.consumed_samples, reader.common_state()) == (12, 96, {"lr_step": 12})
    assert reader.tokenizer == {"path": "tok.json", "sha256_16": "ab"}
    assert reader.meta["layout"] == dict(tp=tp, pp=pp, dp=1)


def test_reshard_of_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert reshard_main(["--load", str(tmp_path / "nope"), "--save", str(tmp_path / "out")]) == 2
    assert "no checkpoint there" in capsys.readouterr().err


def _tree(root):
    """Every file under root with its bytes: what 'nothing written, nothing lost' compares."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


def _error(argv, capsys):
    assert reshard_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def run_dir(tmp_path):
    """A training run's --save: iter_0000012 (with a rank_00000.pt of its own) and the newer iter_0000020."""
    root = str(tmp_path / "run")
    model = new_model(seed=3)
    for it in (12, 20):
        save_checkpoint(root, it, model_sharded_tensors(model), config=config(), rank_state={"rng": it})
    return root


def test_reshard_refuses_a_save_holding_a_checkpoint(source, run_dir, capsys):
    before = _tree(run_dir)
    err = _error(["--load", source, "--save", run_dir, "--target-tp", "2"], capsys)
    assert err == (f"error: --save {run_dir} already holds a checkpoint ('latest' names iter_0000020); write to a "
                   "new directory, or pass --force to add iter_0000012 there (replacing one of that iteration; "
                   "'latest' does not move back to an older iteration)")
    assert _tree(run_dir) == before
    assert "add --force" in _error(["--load", source, "--save", run_dir, "--set-latest"], capsys)


def test_reshard_force_replaces_the_iteration_whole_and_keeps_latest_on_the_newer(source, run_dir, capsys):
    old_20 = {k: v for k, v in _tree(run_dir).items() if k.startswith("iter_0000020")}
    assert reshard_main(["--load", source, "--save", run_dir, "--target-tp", "2", "--force"]) == 0
    out = capsys.readouterr().out
    assert f"note: {os.path.join(run_dir, 'latest')} still names iter_0000020, newer than iter_0000012" in out
    assert open(os.path.join(run_dir, "latest")).read().strip() == "iter_0000020"  # --load still resumes 20
    tree = _tree(run_dir)
    assert {k: v for k, v in tree.items() if k.startswith("iter_0000020")} == old_20
    # iter_0000012 is the resharded copy, whole: its files and nothing of the old one (its rank_00000.pt).
    reader = CheckpointReader(os.path.join(run_dir, "iter_0000012"))
    assert reader.meta["layout"] == dict(tp=2, pp=1, dp=1)
    listed = set(reader.meta["files"]) | {"metadata.json", "rank_00000.json", "rank_00001.json"}
    assert {k.split("/", 1)[1] for k in tree if k.startswith("iter_0000012/")} == listed
    assert "rank_00000.pt" not in listed
    assert sorted(os.listdir(run_dir)) == ["iter_0000012", "iter_0000020", "latest"]  # no .tmp left
    # Asked for explicitly, 'latest' moves back.
    assert reshard_main(["--load", source, "--save", run_dir, "--force", "--set-latest"]) == 0
    assert open(os.path.join(run_dir, "latest")).read().strip() == "iter_0000012"
    assert CheckpointReader(run_dir).meta["layout"] == dict(tp=1, pp=1, dp=1)


def test_reshard_force_moves_latest_forward(source, tmp_path):
    root = str(tmp_path / "older")
    save_checkpoint(root, 5, model_sharded_tensors(new_model(seed=3)), config=config())
    assert reshard_main(["--load", source, "--save", root, "--force"]) == 0
    assert CheckpointReader(root).iteration == 12


def test_reshard_to_an_unwritable_save_is_one_line(source, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _error(["--load", source, "--save", str(tmp_path / "file")], capsys) == (
        f"error: --save {tmp_path / 'file'}: exists and is not a directory; pass a directory (new or existing)")
    assert "cannot be created in /proc" in _error(["--load", source, "--save", "/proc/megatron-ds-x"], capsys)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("flags,expected", [
    (["--target-tp", "3"], "error: --target-tp 3 does not divide 4 attention heads (the model's num_attention_heads)"),
    (["--target-pp", "8"], "error: --target-pp 8: every pipeline stage needs at least one layer, the split is "
                           "[1, 1, 0, 0, 0, 0, 0, 0] for the model's num_layers 2"),
    (["--target-tp", "0"], "error: --target-tp and --target-pp must be >= 1"),
])
def test_reshard_to_a_layout_the_trainer_refuses_is_one_line_naming_the_tools_flag(source, tmp_path, capsys, flags,
                                                                                   expected):
    """The trainer's own rules (config.check_model_layout), in --target-tp / --target-pp; nothing written."""
    new, existing = str(tmp_path / "new"), str(tmp_path / "existing")
    os.makedirs(existing)
    (tmp_path / "existing" / "notes.txt").write_text("x")
    assert _error(["--load", source, "--save", new] + flags, capsys) == expected
    assert not os.path.exists(new)
    assert _error(["--load", source, "--save", existing] + flags, capsys) == expected
    assert _tree(existing) == {"notes.txt": b"x"}
