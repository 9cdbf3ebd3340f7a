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
