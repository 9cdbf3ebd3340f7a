"""A checkpoint that cannot be loaded fails with one CheckpointError naming the file, never a partial load."""

import json
import os

import pytest
import torch

from megatron_ds.checkpoint.format import CheckpointError
from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import load_model, model_sharded_tensors
from megatron_ds.checkpoint.save import save_checkpoint
from tests.checkpoint.helpers import config, new_model
from tests.model.hf_reference import model_config


@pytest.fixture
def ckpt(tmp_path):
    save_checkpoint(str(tmp_path), 5, model_sharded_tensors(new_model(seed=1)), config=config())
    return str(tmp_path), os.path.join(str(tmp_path), "iter_0000005")


def _edit_metadata(ckpt_dir, fn):
    path = os.path.join(ckpt_dir, "metadata.json")
    with open(path) as f:
        meta = json.load(f)
    fn(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def _load_fails(root, match, model=None):
    model = model if model is not None else new_model(seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=match):
        load_model(model, CheckpointReader(root))
    return model, before


def test_another_model_shape_names_the_tensor_and_metadata(ckpt):
    root, d = ckpt
    other = new_model(model_config("mha", 1000))  # 4 KV heads instead of 2: qkv has more rows
    model, before = _load_fails(root, r"metadata\.json: model/layers\.0\.attention\.qkv\.weight has shape", other)
    # The shapes are checked for every tensor before the first copy: nothing was loaded.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_missing_shard_file(ckpt):
    root, d = ckpt
    os.remove(os.path.join(d, "rank_00000.safetensors"))
    _load_fails(root, r"rank_00000\.safetensors: shard file missing")


def test_pieces_that_do_not_cover_a_tensor(ckpt):
    root, d = ckpt
    _edit_metadata(d, lambda m: m["tensors"]["model/final_norm.weight"].update(pieces=[]))
    _load_fails(root, r"metadata\.json: the stored pieces of model/final_norm\.weight cover 0 of the 64")


def test_corrupted_file_fails_its_checksum(ckpt):
    root, d = ckpt
    path = os.path.join(d, "rank_00000.safetensors")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    _load_fails(root, r"rank_00000\.safetensors: sha256 checksum mismatch")


def test_truncated_file(ckpt):
    root, d = ckpt
    path = os.path.join(d, "rank_00000.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    _load_fails(root, r"rank_00000\.safetensors: \d+ bytes, metadata\.json records \d+")


def test_unknown_format_version(ckpt):
    root, d = ckpt
    _edit_metadata(d, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match=r"metadata\.json: format version 99 is not one this code reads"):
        CheckpointReader(root)


def test_no_checkpoint_in_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint there"):
        CheckpointReader(str(tmp_path))


def test_latest_naming_a_removed_checkpoint(ckpt):
    root, d = ckpt
    os.rename(d, d + "-moved")
    with pytest.raises(CheckpointError, match=r"latest names 'iter_0000005'"):
        CheckpointReader(root)
