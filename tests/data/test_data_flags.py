"""The data flags of the pretrain CLI: --data-path blends, the reset flags, the index cache."""

import numpy as np
import pytest

from megatron_ds.config import ConfigError, config_from_args
from megatron_ds.data.blending import BlendedDataset
from megatron_ds.data.errors import DataError
from megatron_ds.data.indexed_dataset import IndexedDatasetBuilder
from megatron_ds.pretrain import build_datasets, check_data_files
from tools import merge_datasets


def corpus(prefix, num_docs=40, dtype=np.uint16):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for d in range(num_docs):
        builder.add_document(np.arange(d % 7 + 5) + 3)
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_data_path_takes_a_prefix_or_weight_prefix_pairs():
    assert config_from_args(["--data-path", "a"]).data.data_path == ["a"]
    cfg = config_from_args(["--data-path", "0.3", "a", "0.7", "b", "--reset-position-ids",
                            "--reset-attention-mask", "--data-cache-path", "/tmp/x"])
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]
    assert cfg.data.reset_position_ids and cfg.data.reset_attention_mask
    assert cfg.data.data_cache_path == "/tmp/x"
    assert config_from_args([]).data.data_path is None


def test_check_data_files_names_the_missing_prefix(tmp_path):
    a = corpus(tmp_path / "a")
    check_data_files(config_from_args(["--data-path", "1", a, "1", a]))
    with pytest.raises(DataError, match=r"--data-path .*b: .*b\.bin not found"):
        check_data_files(config_from_args(["--data-path", "1", a, "1", str(tmp_path / "b")]))


def test_build_datasets_blends_and_caches_beside_the_data(tmp_path):
    a, b = corpus(tmp_path / "a"), corpus(tmp_path / "b")
    cfg = config_from_args(["--data-path", "0.5", a, "0.5", b, "--seq-length", "16",
                            "--train-iters", "3", "--global-batch-size", "4", "--micro-batch-size", "2",
                            "--split", "90,10,0"])

    class Tok:
        eod = 0

    train, valid = build_datasets(cfg, Tok())
    assert isinstance(train, BlendedDataset) and len(train) == 12 and valid is None
    assert any(p.suffix == ".npy" for p in (tmp_path / "index-cache").iterdir())
    cfg.data.reset_attention_mask = True
    with pytest.raises(ConfigError, match="--reset-attention-mask needs --tokenizer-model"):
        build_datasets(cfg, None)


def test_merge_refuses_mixed_dtypes(tmp_path, capsys):
    a = corpus(tmp_path / "a")
    b = corpus(tmp_path / "b", dtype=np.int32)
    assert merge_datasets.main(["--input", a, b, "--output-prefix", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "b: dtype int32 differs from uint16" in err[0], err
    assert not (tmp_path / "m.idx").exists() and not (tmp_path / "m.bin").exists()
    merge_datasets.main(["--input", a, a, "--output-prefix", str(tmp_path / "m")])
    assert "2 datasets, 80 documents" in capsys.readouterr().out
