"""A checkpoint saved at one TP x PP x DP layout loads at any other, tensor for tensor.

The reference is computed another way: the TP shard that ``shard_hf_state_dict_for_tp`` cuts
from the HF weights the saved model was given. Loading only copies bytes, so equality is exact.
"""

import json
import os

import pytest
import torch

from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import load_model, model_sharded_tensors
from megatron_ds.checkpoint.save import AsyncCheckpointWriter, save_checkpoint
from megatron_ds.parallel.topology import ParallelState
from tests.checkpoint.helpers import build_stage, config, hf_weights, mismatches, model_with_weights, parallel_state
from tests.multiproc import run_world


def _save(root, hf_sd, tp, pp, use_async):
    state = parallel_state(tp, pp)
    model = model_with_weights(state, hf_sd)
    writer = AsyncCheckpointWriter() if use_async else None
    save_checkpoint(root, 10, model_sharded_tensors(model, dp_rank=state.dp_rank), consumed_samples=80,
                    config=config(), layout=dict(tp=tp, pp=pp, dp=state.dp_size),
                    rank_state={"cpu_rng": torch.get_rng_state()}, common_state={"lr_step": 10}, writer=writer)
    if writer is not None:
        writer.wait()


def _load(root, hf_sd, tp, pp):
    state = parallel_state(tp, pp)
    model = build_stage(state)
    load_model(model, CheckpointReader(root))
    return mismatches(model, hf_sd, state.tp_rank, tp)


@pytest.fixture(scope="module")
def saved_tp2(tmp_path_factory):
    """Saved by a world of 2 at TP2 (asynchronously, as the trainer will)."""
    root = str(tmp_path_factory.mktemp("tp2"))
    run_world(2, _save, root=root, hf_sd=hf_weights(), tp=2, pp=1, use_async=True)
    return root


def test_tp2_checkpoint_loads_at_tp1(saved_tp2):
    assert _load(saved_tp2, hf_weights(), tp=1, pp=1) == []


def test_tp2_checkpoint_loads_at_tp4_with_replicated_kv_heads(saved_tp2):
    # 2 KV heads over 4 ranks: each rank's kv weight is rows [nq d, (nq + 2 nkv) d) of the global qkv.
    assert run_world(4, _load, root=saved_tp2, hf_sd=hf_weights(), tp=4, pp=1) == [[]] * 4


def test_tp2_checkpoint_loads_at_tp2_pp2(saved_tp2):
    assert run_world(4, _load, root=saved_tp2, hf_sd=hf_weights(), tp=2, pp=2) == [[]] * 4


def test_pipeline_stages_load_their_layers_in_one_process(saved_tp2):
    reader = CheckpointReader(saved_tp2)
    for pp_rank in range(2):
        stage = build_stage(ParallelState(pp_size=2, pp_rank=pp_rank))
        load_model(stage, reader)
        assert mismatches(stage, hf_weights(), 0, 1) == []


def test_tp2_pp2_checkpoint_loads_at_tp1_and_tp4(tmp_path):
    root = str(tmp_path)
    run_world(4, _save, root=root, hf_sd=hf_weights(), tp=2, pp=2, use_async=False)
    assert _load(root, hf_weights(), tp=1, pp=1) == []
    assert run_world(4, _load, root=root, hf_sd=hf_weights(), tp=4, pp=1) == [[]] * 4


def test_only_one_copy_of_each_block_is_written(tmp_path):
    # TP2 x DP2: DP rank 1 writes no tensors; norm weights (TP-replicated) come from TP rank 0 only.
    root = str(tmp_path)
    run_world(4, _save, root=root, hf_sd=hf_weights(), tp=2, pp=1, use_async=False)
    ckpt = os.path.join(root, "iter_0000010")
    assert sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors")) == \
        ["rank_00000.safetensors", "rank_00001.safetensors"]
    with open(os.path.join(ckpt, "metadata.json")) as f:
        meta = json.load(f)
    assert len(meta["tensors"]["model/final_norm.weight"]["pieces"]) == 1
    # qkv at TP2: [q, k, v] parts each split in two -> 6 blocks; the vocabulary is stored unpadded.
    assert len(meta["tensors"]["model/layers.0.attention.qkv.weight"]["pieces"]) == 6
    assert meta["tensors"]["model/embedding.weight"]["global_shape"] == [1000, 64]
    assert (meta["iteration"], meta["consumed_samples"], meta["layout"]) == (10, 80, dict(tp=2, pp=1, dp=2))


def test_states_come_back_and_rank_state_only_at_the_same_layout(saved_tp2):
    reader = CheckpointReader(saved_tp2)
    assert reader.common_state() == {"lr_step": 10}
    assert set(reader.rank_state(1, layout=dict(tp=2, pp=1, dp=1))) == {"cpu_rng"}
    assert reader.rank_state(1, layout=dict(tp=1, pp=1, dp=1)) is None
    assert reader.model_config["num_query_groups"] == 2
