import numpy as np
import pytest

from megatron_ds.data.errors import DataError
from megatron_ds.data.blending import build_train_valid_test_datasets
from megatron_ds.data.gpt_dataset import GPTDataset, parse_split, split_document_ids
from megatron_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

EOD = 0


def make_corpus(path, lengths, seed=0):
    """Documents of the given lengths, tokens unique per position so any misalignment shows."""
    rng = np.random.RandomState(seed)
    builder = IndexedDatasetBuilder(f"{path}.bin", np.int32)
    docs = []
    for n in lengths:
        doc = list(rng.randint(1, 1000, size=n)) if n else []
        if n:
            doc[-1] = EOD
        docs.append(doc)
        builder.add_document(doc)
    builder.finalize(f"{path}.idx")
    return IndexedDataset(str(path)), docs


def reference_samples(docs, document_index, shuffle_index, seq_length):
    """Plain Python: concatenate documents in document-index order, cut overlapping windows."""
    stream = []
    for d in document_index:
        stream.extend(docs[d])
    samples = [stream[i * seq_length: i * seq_length + seq_length + 1]
               for i in range(len(shuffle_index))]
    return [samples[j] for j in shuffle_index]


# Short (1-3 tokens), empty, exactly seq_length, and much longer than a sample.
LENGTHS = [5, 0, 1, 37, 2, 0, 16, 3, 64, 0, 7, 15, 17, 1, 0, 0, 9]


@pytest.mark.parametrize("seq_length,num_samples", [(16, 10), (16, 200), (1, 50), (7, 33),
                                                    (100, 5)])
def test_every_sample_matches_naive_stream(tmp_path, seq_length, num_samples):
    indexed, docs = make_corpus(tmp_path / "c", LENGTHS)
    document_ids = np.arange(2, len(LENGTHS))
    ds = GPTDataset(indexed, document_ids, num_samples, seq_length, seed=1234)
    expected = reference_samples(docs, ds.document_index, ds.shuffle_index, seq_length)
    assert len(ds) == num_samples
    for i in range(num_samples):
        item = ds[i]
        x = expected[i]
        assert len(x) == seq_length + 1
        assert item["tokens"].tolist() == x[:-1]
        assert item["labels"].tolist() == x[1:]
        assert item["tokens"].dtype == item["labels"].dtype == np.int64
        assert item["position_ids"].tolist() == list(range(seq_length))
        assert item["loss_mask"].dtype == np.float32 and item["loss_mask"].tolist() == [1.0] * seq_length


@pytest.mark.parametrize("num_samples,separate", [(40, True), (45, False)])
def test_indices_cover_every_sample_of_enough_epochs(tmp_path, num_samples, separate):
    """megatron-core's layout: 3 epochs of 128 tokens hold (384 - 1) // 8 = 47 samples, all of
    them indexed and permuted; 31 lie before the last epoch, which holds 15 + 1. Taking 40 uses 9
    of the last epoch (< int(0.8 * 15) = 12): it is shuffled on its own, documents and samples;
    taking 45 uses 14: one document shuffle of all 3 epochs, one permutation of all 47."""
    indexed, _ = make_corpus(tmp_path / "c", LENGTHS)
    document_ids = np.arange(0, 10)
    tokens_per_epoch = sum(LENGTHS[:10])  # 128
    assert tokens_per_epoch == 128 and 2 * 128 < num_samples * 8 + 1 <= 3 * 128
    ds = GPTDataset(indexed, document_ids, num_samples=num_samples, seq_length=8, seed=7)
    assert (ds.num_epochs, ds.separate_final_epoch, ds.num_indexed_samples) == (3, separate, 47)
    assert len(ds) == num_samples
    rng = np.random.RandomState(7)
    if separate:
        first, last = np.tile(np.arange(10), 2), np.arange(10)
        rng.shuffle(first)
        rng.shuffle(last)
        expected_docs = np.concatenate([first, last])
        first, last = np.arange(31), np.arange(31, 47)
        rng.shuffle(first)
        rng.shuffle(last)
        expected_shuffle = np.concatenate([first, last])
    else:
        expected_docs = np.tile(np.arange(10), 3)
        rng.shuffle(expected_docs)
        expected_shuffle = np.arange(47)
        rng.shuffle(expected_shuffle)
    np.testing.assert_array_equal(ds.document_index, expected_docs)
    np.testing.assert_array_equal(ds.shuffle_index, expected_shuffle)
    assert ds.sample_index.shape == (48, 2) and ds.sample_index.dtype == np.int32
    assert ds.document_index.dtype == ds.shuffle_index.dtype == np.int64


def test_same_seed_same_samples_other_seed_other_order(tmp_path):
    indexed, _ = make_corpus(tmp_path / "c", LENGTHS)
    ids = np.arange(len(LENGTHS))
    a, b = (GPTDataset(indexed, ids, 20, 8, seed=3) for _ in range(2))
    c = GPTDataset(indexed, ids, 20, 8, seed=4)
    assert all((a[i]["tokens"] == b[i]["tokens"]).all() for i in range(20))
    assert not all((a[i]["tokens"] == c[i]["tokens"]).all() for i in range(20))


def test_eod_mask_loss_masks_positions_whose_input_is_eod(tmp_path):
    indexed, _ = make_corpus(tmp_path / "c", LENGTHS)
    ds = GPTDataset(indexed, np.arange(len(LENGTHS)), 30, 16, seed=0, eod_mask_loss=True,
                    eod_id=EOD)
    masked = 0
    for i in range(len(ds)):
        item = ds[i]
        np.testing.assert_array_equal(item["loss_mask"] == 0, item["tokens"] == EOD)
        masked += int((item["loss_mask"] == 0).sum())
    assert masked > 0
    with pytest.raises(ValueError, match="eod_id"):
        GPTDataset(indexed, np.arange(3), 1, 4, seed=0, eod_mask_loss=True)


def test_split_without_tokens_is_an_error(tmp_path):
    indexed, _ = make_corpus(tmp_path / "c", [0, 0, 3])
    with pytest.raises(DataError, match="no tokens"):
        GPTDataset(indexed, np.array([0, 1]), 1, 4, seed=0)


@pytest.mark.parametrize("text,expected", [
    ("969,30,1", (0.969, 0.030, 0.001)),
    ("98,2,0", (0.98, 0.02, 0.0)),
    ("98/2", (0.98, 0.02, 0.0)),
    ("1", (1.0, 0.0, 0.0)),
])
def test_parse_split(text, expected):
    assert parse_split(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["", "a,b,c", "1,2,3,4", "-1,2,0", "0,0,0"])
def test_parse_split_rejects(bad):
    with pytest.raises(ValueError, match="--split"):
        parse_split(bad)


def test_split_document_ids_contiguous_megatron_rounding():
    assert split_document_ids(1000, "969,30,1") == (range(0, 969), range(969, 999),
                                                    range(999, 1000))
    assert split_document_ids(10, "98,2,0") == (range(0, 10), range(10, 10), range(10, 10))
    # round(10/3 * k): 3, 3, 3 -> 9, one short; Megatron shifts every boundary by the difference.
    assert split_document_ids(10, "1,1,1") == (range(0, 4), range(4, 7), range(7, 10))
    for n in range(0, 50):
        train, valid, test = split_document_ids(n, "7,2,1")
        assert train.start == 0 and train.stop == valid.start and valid.stop == test.start
        assert test.stop == n


def test_build_train_valid_test_datasets(tmp_path):
    make_corpus(tmp_path / "c", [10] * 20)
    train, valid, test = build_train_valid_test_datasets(str(tmp_path / "c"), "80,20,0", 8, 1,
                                                         (30, 5, 5))
    assert test is None
    assert len(train) == 30 and len(valid) == 5
    assert set(train.document_index.tolist()) == set(range(16))
    assert set(valid.document_index.tolist()) == set(range(16, 20))
    _, valid, _ = build_train_valid_test_datasets(str(tmp_path / "c"), "80,20,0", 8, 1,
                                                  (30, 0, 0))
    assert valid is None
    with pytest.raises(DataError, match="preprocess_data"):
        build_train_valid_test_datasets(str(tmp_path / "missing"), "1", 8, 1, (1, 0, 0))


def test_sample_index_matches_megatron_walk(tmp_path):
    """The vectorized build equals Megatron's token-by-document walk, row for row."""
    indexed, _ = make_corpus(tmp_path / "c", LENGTHS)
    seq_length, num_samples = 7, 60
    ds = GPTDataset(indexed, np.arange(len(LENGTHS)), num_samples, seq_length, seed=5)
    sizes = indexed.sequence_lengths
    rows, pos, offset = [(0, 0)], 0, 0
    assert ds.num_indexed_samples > num_samples  # every sample of the epochs, not just 60
    for _ in range(ds.num_indexed_samples):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[ds.document_index[pos]] - offset
            remaining -= doc_length
            if remaining <= 0:
                offset += remaining + doc_length - 1  # stay on the shared last token
                remaining = 0
            else:
                pos, offset = pos + 1, 0
        rows.append((pos, offset))
    assert ds.sample_index.tolist() == [list(r) for r in rows]


def test_reset_position_ids_and_document_ids_follow_eod(tmp_path):
    indexed, docs = make_corpus(tmp_path / "c", LENGTHS)
    ds = GPTDataset(indexed, np.arange(len(LENGTHS)), 40, 16, seed=2, eod_id=EOD,
                    reset_position_ids=True, reset_attention_mask=True)
    plain = GPTDataset(indexed, np.arange(len(LENGTHS)), 40, 16, seed=2)
    for i in range(len(ds)):
        item = ds[i]
        assert item["tokens"].tolist() == plain[i]["tokens"].tolist()
        # Reference: walk the tokens; a new document starts right after each EOD.
        pos, doc, positions, doc_ids = 0, 0, [], []
        for t in item["tokens"].tolist():
            positions.append(pos)
            doc_ids.append(doc)
            pos, doc = (0, doc + 1) if t == EOD else (pos + 1, doc)
        assert item["position_ids"].tolist() == positions
        assert item["document_ids"].tolist() == doc_ids
        assert item["document_ids"].dtype == item["position_ids"].dtype == np.int64
    assert "document_ids" not in plain[0]


def test_reset_flags_need_eod_id(tmp_path):
    indexed, _ = make_corpus(tmp_path / "c", LENGTHS)
    for flag in ("reset_position_ids", "reset_attention_mask"):
        with pytest.raises(ValueError, match=f"{flag}=True needs eod_id"):
            GPTDataset(indexed, np.arange(3), 1, 4, seed=0, **{flag: True})
