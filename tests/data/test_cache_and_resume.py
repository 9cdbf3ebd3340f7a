"""Index arrays cached by hash, built by one process and memory-mapped by the others; and a run
resumed at step k sees exactly the batches the uninterrupted run saw from step k on."""

import os

import numpy as np
import pytest

from megatron_ds.data.blending import build_train_valid_test_datasets
from megatron_ds.data.errors import DataError
from megatron_ds.data.gpt_dataset import GPTDataset
from megatron_ds.data.index_cache import cached_arrays
from megatron_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_ds.data.sampler import MegatronPretrainingSampler, collate


def make_corpus(prefix, num_docs, seed):
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for _ in range(num_docs):
        builder.add_document(rng.integers(1, 500, size=int(rng.integers(0, 40))))
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_builder_writes_and_others_memory_map_after_barrier(tmp_path):
    prefix = make_corpus(tmp_path / "c", 50, 0)
    cache = tmp_path / "cache"
    events = []
    ds0 = GPTDataset(IndexedDataset(prefix), np.arange(50), 30, 16, seed=3, cache_dir=str(cache),
                     is_builder=True, barrier=lambda: events.append("barrier"))
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and sum(f.endswith(".npy") for f in files) == 3
    assert events == ["barrier"]
    ds1 = GPTDataset(IndexedDataset(prefix), np.arange(50), 30, 16, seed=3, cache_dir=str(cache),
                     is_builder=False, barrier=lambda: events.append("barrier"))
    assert isinstance(ds1.document_index, np.memmap) and isinstance(ds1.shuffle_index, np.memmap)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(ds0, name), getattr(ds1, name))
    # Another seed is another hash: new files, not a stale reuse.
    GPTDataset(IndexedDataset(prefix), np.arange(50), 30, 16, seed=4, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 8


def test_cache_key_is_what_determines_the_indices_not_the_sample_count(tmp_path):
    """The indices depend on the sample count only through num_epochs and the separate-last-epoch
    flag, and so does the key: a longer run in the same epochs (an extended --train-iters) maps the
    shorter run's files; another epoch count builds its own."""
    prefix = make_corpus(tmp_path / "c", 50, 0)
    cache = tmp_path / "cache"
    short = GPTDataset(IndexedDataset(prefix), np.arange(50), 10, 16, seed=3, cache_dir=str(cache))
    assert short.num_epochs == 1 and len(os.listdir(cache)) == 4
    longer = GPTDataset(IndexedDataset(prefix), np.arange(50), short.num_indexed_samples, 16,
                        seed=3, cache_dir=str(cache), is_builder=False)
    assert len(os.listdir(cache)) == 4 and len(longer) == short.num_indexed_samples
    np.testing.assert_array_equal(short.shuffle_index, longer.shuffle_index)
    two = GPTDataset(IndexedDataset(prefix), np.arange(50), short.num_indexed_samples + 1, 16,
                     seed=3, cache_dir=str(cache))
    assert two.num_epochs == 2 and len(os.listdir(cache)) == 8
    # Built in memory, the same arrays: the cache holds what build() gives.
    fresh = GPTDataset(IndexedDataset(prefix), np.arange(50), short.num_indexed_samples + 1, 16,
                       seed=3)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(two, name), getattr(fresh, name))


def test_non_builder_without_files_says_so(tmp_path):
    with pytest.raises(DataError, match="filesystem every rank shares"):
        cached_arrays(str(tmp_path), "gpt", {"x": 1}, ("a",), lambda: {"a": np.zeros(1)},
                      is_builder=False)


def test_builder_does_not_rebuild_a_cached_set(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5)}

    for _ in range(2):
        out = cached_arrays(str(tmp_path), "k", {"x": 1}, ("a",), build)
    assert calls == [1] and out["a"].tolist() == [0, 1, 2, 3, 4]


def batches(dataset, consumed, steps, mbs, dp_rank, dp_size):
    sampler = MegatronPretrainingSampler(len(dataset), consumed, mbs, dp_rank, dp_size)
    it = iter(sampler)
    return [collate([dataset[i] for i in next(it)]) for _ in range(steps)]


@pytest.mark.parametrize("k", [0, 3, 7])
def test_resume_at_step_k_replays_nothing_and_skips_nothing(tmp_path, k):
    a = make_corpus(tmp_path / "a", 60, 1)
    b = make_corpus(tmp_path / "b", 40, 2)
    mbs, dp, steps = 2, 2, 10
    global_batch = mbs * dp
    build = dict(data_path=["0.6", a, "0.4", b], split="95,5,0", seq_length=16, seed=99,
                 num_samples=(steps * global_batch, 0, 0), reset_position_ids=True,
                 reset_attention_mask=True, eod_id=0, cache_dir=str(tmp_path / "cache"))
    first, _, _ = build_train_valid_test_datasets(**build)
    uninterrupted = [batches(first, 0, steps, mbs, r, dp) for r in range(dp)]
    # The "restart": a new process rebuilds everything (now from the cache) and starts at k.
    second, _, _ = build_train_valid_test_datasets(**build, is_builder=False)
    resumed = [batches(second, k * global_batch, steps - k, mbs, r, dp) for r in range(dp)]
    for r in range(dp):
        assert len(resumed[r]) == steps - k
        for got, want in zip(resumed[r], uninterrupted[r][k:]):
            assert got.keys() == want.keys() == {"tokens", "labels", "loss_mask", "position_ids",
                                                 "document_ids"}
            for key in got:
                assert got[key].equal(want[key]), key
