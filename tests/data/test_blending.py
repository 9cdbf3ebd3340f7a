import numpy as np
import pytest

from megatron_ds.data.blending import (BlendedDataset, build_blending_indices,
                                       build_train_valid_test_datasets, parse_data_path)
from megatron_ds.data.errors import DataError
from megatron_ds.data.gpt_dataset import GPTDataset
from megatron_ds.data.indexed_dataset import IndexedDatasetBuilder


def make_corpus(prefix, num_docs, first_token, length=12):
    """Every token of corpus k is first_token + position, so a sample tells its corpus."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.int32)
    for d in range(num_docs):
        builder.add_document(np.full(length, first_token + d, dtype=np.int32))
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.7, 0.3], [0.9, 0.05, 0.05], [1, 2, 3, 4],
                                     [0.01, 0.49, 0.2, 0.15, 0.1, 0.05], list(range(1, 17))])
def test_every_prefix_within_one_sample_of_its_share(weights):
    """|taken_d(n) - w_d n| < 1 for every prefix n, i.e. each share is within 1/n of its weight."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    n = 4000
    dataset_index, dataset_sample_index = build_blending_indices(w, n)
    taken = np.cumsum(np.eye(len(w), dtype=np.int64)[dataset_index], axis=0)  # (n, k)
    prefix = np.arange(1, n + 1)[:, None]
    assert np.abs(taken - prefix * w).max() < 1.0
    assert np.all(np.abs(taken / prefix - w) < 1.0 / prefix)
    # Each dataset's samples are taken in order 0, 1, 2, ...
    for d in range(len(w)):
        assert dataset_sample_index[dataset_index == d].tolist() == list(range(taken[-1, d]))


def test_random_weights_within_one_sample():
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = rng.random(int(rng.integers(2, 12))) ** 3
        w /= w.sum()
        dataset_index, _ = build_blending_indices(w, 2000)
        taken = np.cumsum(np.eye(len(w), dtype=np.int64)[dataset_index], axis=0)
        assert np.abs(taken - np.arange(1, 2001)[:, None] * w).max() < 1.0


def test_zero_weight_is_never_drawn():
    dataset_index, _ = build_blending_indices([0.0, 1.0, 0.0], 50)
    assert set(dataset_index.tolist()) == {1}


@pytest.mark.parametrize("given,expected", [
    ("c", ([1.0], ["c"])),
    (["c"], ([1.0], ["c"])),
    (["3", "a", "1", "b"], ([0.75, 0.25], ["a", "b"])),
])
def test_parse_data_path(given, expected):
    assert parse_data_path(given) == expected


@pytest.mark.parametrize("bad,match", [(["a", "0.5"], "not a weight"), (["1", "a", "2"], "pairs"),
                                       (["-1", "a", "2", "b"], "non-negative"),
                                       (["0", "a", "0", "b"], "positive sum")])
def test_parse_data_path_rejects(bad, match):
    with pytest.raises(DataError, match=match):
        parse_data_path(bad)


def test_blended_datasets_draw_each_corpus_by_weight(tmp_path):
    a = make_corpus(tmp_path / "a", 30, 1000)
    b = make_corpus(tmp_path / "b", 20, 2000)
    train, valid, test = build_train_valid_test_datasets(["0.75", a, "0.25", b], "90,10,0", 8,
                                                         1234, (200, 40, 0))
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset) and test is None
    assert len(train) == 200 and len(valid) == 40
    corpus_of = [train[i]["tokens"][0] // 1000 for i in range(200)]
    assert corpus_of.count(1) == 150 and corpus_of.count(2) == 50
    # Each corpus was built with exactly the samples the blend takes from it.
    assert [len(d) for d in train.datasets] == [150, 50]
    # Splits stay apart per corpus: train sees docs 0..26 of a, valid docs 27..29.
    assert {int(t) - 1000 for i in range(200) for t in train[i]["tokens"] if t < 2000} <= set(range(27))
    assert {int(t) - 1000 for i in range(40) for t in valid[i]["tokens"] if t < 2000} <= {27, 28, 29}


def test_single_prefix_gives_a_plain_gpt_dataset(tmp_path):
    a = make_corpus(tmp_path / "a", 10, 1000)
    train, _, _ = build_train_valid_test_datasets([a], "1", 8, 1, (5, 0, 0))
    assert isinstance(train, GPTDataset)


def test_corpus_without_documents_in_a_split_is_an_error(tmp_path):
    a = make_corpus(tmp_path / "a", 30, 1000)
    b = make_corpus(tmp_path / "b", 2, 2000)  # 90/10 of 2 documents: no valid documents
    with pytest.raises(DataError, match=r"b has no valid documents"):
        build_train_valid_test_datasets(["1", a, "1", b], "90,10,0", 8, 1, (10, 10, 0))
