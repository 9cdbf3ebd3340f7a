"""Compatibility with megatron-core (0.16): its IndexedDataset / IndexedDatasetBuilder both ways, and
the GPTDataset document, sample and shuffle indices value for value."""

import json
import warnings

import numpy as np
import pytest

from megatron_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_ds.data.tokenizer import build_tokenizer
from tools import merge_datasets, preprocess_data

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
    # A test dependency (setup.py's [test] extra): missing means a broken install, not a skip.
    import megatron.core.datasets.indexed_dataset as mcore
import torch

# megatron-core's builder passes a tensor to numpy.array(copy=False) under NumPy 2: its warning.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16]
DOCS = [[1, 2, 3], [], [4], list(range(5, 105)), [7, 7]]


def test_preprocess_output_read_token_for_token_by_megatron_core(tmp_path, corpus_jsonl,
                                                                 tokenizer_json):
    prefix = tmp_path / "c"
    preprocess_data.main(["--input", str(corpus_jsonl), "--output-prefix", str(prefix),
                          "--tokenizer-model", str(tokenizer_json), "--append-eod",
                          "--workers", "2"])
    theirs = mcore.IndexedDataset(f"{prefix}_text_document")
    tok = build_tokenizer(str(tokenizer_json))
    texts = [json.loads(line)["text"] for line in open(corpus_jsonl, encoding="utf-8")]
    assert len(theirs) == len(texts) and theirs.index.dtype == np.uint16
    for i, text in enumerate(texts):
        assert theirs[i].tolist() == tok.encode(text) + [tok.eod]
    assert theirs.get(5, offset=1, length=2).tolist() == (tok.encode(texts[5]) + [tok.eod])[1:3]


@pytest.mark.parametrize("dtype", DTYPES)
def test_files_we_write_are_byte_identical_and_readable_by_megatron_core(tmp_path, dtype):
    ours = IndexedDatasetBuilder(str(tmp_path / "o.bin"), dtype)
    theirs = mcore.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    for doc in DOCS:
        ours.add_document(np.array(doc, dtype=dtype))
        theirs.add_item(torch.tensor(np.array(doc, dtype=dtype)))
        theirs.end_document()
    ours.finalize(str(tmp_path / "o.idx"))
    theirs.finalize(str(tmp_path / "m.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"o{ext}").read_bytes() == (tmp_path / f"m{ext}").read_bytes()
    read_back = mcore.IndexedDataset(str(tmp_path / "o"))
    assert [read_back[i].tolist() for i in range(len(DOCS))] == DOCS


@pytest.mark.parametrize("dtype", DTYPES)
def test_files_megatron_core_writes_are_read_by_ours(tmp_path, dtype):
    """Including documents of several sequences (sentence-split corpora)."""
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    builder.add_document(torch.tensor(np.array([1, 2, 3, 4], dtype=dtype)), [1, 3])
    builder.add_document(torch.tensor(np.array([9], dtype=dtype)), [1])
    builder.add_document(torch.tensor(np.array(range(5, 105), dtype=dtype)), [40, 60])
    builder.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(str(tmp_path / "m"))
    assert ds.dtype == np.dtype(dtype)
    assert [ds[i].tolist() for i in range(len(ds))] == [[1], [2, 3, 4], [9], list(range(5, 45)),
                                                        list(range(45, 105))]
    assert ds.document_indices.tolist() == [0, 2, 3, 5] and ds.num_documents == 3
    assert ds.get(4, offset=10, length=3).tolist() == [55, 56, 57]


def test_merge_equals_megatron_core_add_index(tmp_path):
    rng = np.random.default_rng(0)
    prefixes = []
    for k in range(3):
        b = mcore.IndexedDatasetBuilder(str(tmp_path / f"p{k}.bin"), dtype=np.int32)
        for _ in range(20):
            n = int(rng.integers(1, 30))
            b.add_document(torch.tensor(rng.integers(0, 10**6, n, dtype=np.int32)),
                           [n] if n < 10 else [3, n - 3])
        b.finalize(str(tmp_path / f"p{k}.idx"))
        prefixes.append(str(tmp_path / f"p{k}"))
    merge_datasets.main(["--input", str(tmp_path / "p*"), "--output-prefix", str(tmp_path / "ours")])
    ref = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for p in prefixes:
        ref.add_index(p)
    ref.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


# -- GPTDataset indices ----------------------------------------------------------------------------

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset as McoreGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig


class _VocabOnly:
    """What megatron-core's GPTDatasetConfig reads of a tokenizer to build indices and items."""
    vocab_size, eod, pad = 500, 0, -1
    unique_identifiers = {"class": "VocabOnly"}


@pytest.fixture(scope="module")
def gpt_corpus(tmp_path_factory):
    """200 documents of 0-59 tokens, empty ones included (the sample walk must skip them alike)."""
    prefix = str(tmp_path_factory.mktemp("gpt_compat") / "c")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for _ in range(200):
        builder.add_document(rng.integers(1, 500, size=int(rng.integers(0, 60))))
    builder.finalize(f"{prefix}.idx")
    return prefix


# (seq_length, (train, valid, test) samples, seed, (train epochs, separate last epoch)). The 196
# training documents hold 5,770 tokens: 360 samples of 16 per epoch.
GPT_CASES = [
    (16, (20, 5, 0), 1, (1, False)),      # a short run: one epoch, all 360 samples shuffled
    (16, (360, 5, 0), 2, (1, False)),     # exactly one epoch
    (16, (400, 40, 0), 3, (2, True)),     # second epoch used for 40 of 360 samples: separate
    (16, (700, 1, 0), 4, (2, False)),     # ... for 340 (>= 80%): shuffled with the first
    (8, (2000, 40, 0), 5, (3, True)),     # valid (4 documents, 105 tokens): 4 epochs
    (32, (900, 3, 0), 6, (5, False)),
    (1, (5000, 1, 0), 7, (1, False)),
]


@pytest.mark.parametrize("seq_length,num_samples,seed,epochs", GPT_CASES)
def test_gpt_dataset_indices_equal_megatron_cores(tmp_path, gpt_corpus, seq_length, num_samples,
                                                  seed, epochs):
    """Document, sample and shuffle index equal megatron-core's GPTDataset for the same corpus,
    --split, seed, seq_length and sample counts, for train and valid: value for value (our document
    and shuffle indices are int64 where megatron-core's are int32 and uint32; numpy's legacy
    RandomState.shuffle draws the same swaps for any dtype). Items read the same tokens.

    len() differs by design: megatron-core's is every sample of the epochs built, ours the
    requested count, which is the prefix Megatron's trainer reads (see GPTDataset).

    --split 98,2,0 over 200 documents: both give 196 / 4 / 0 documents. The splits themselves are
    not always equal: megatron-core rounds each cumulative boundary (round(0.98 * n)), ours
    (split_document_ids) rounds each part and shifts the boundaries by the total's rounding error,
    as Megatron-LM's legacy data code did, so e.g. 10 documents at 1,1,1 are 3/4/3 there, 4/3/3
    here. That choice is outside the index construction and left as it is.
    """
    from megatron_ds.data.blending import build_train_valid_test_datasets

    ours = build_train_valid_test_datasets(gpt_corpus, "98,2,0", seq_length, seed, num_samples,
                                           cache_dir=str(tmp_path / "ours"))
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([gpt_corpus], None), split="98,2,0",
        path_to_cache=str(tmp_path / "mcore"), tokenizer=_VocabOnly(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = BlendedMegatronDatasetBuilder(McoreGPTDataset, list(num_samples), lambda: True,
                                               config).build()
    assert ours[2] is None and theirs[2] is None
    assert (ours[0].num_epochs, ours[0].separate_final_epoch) == epochs
    for mine, ref in zip(ours[:2], theirs[:2]):
        assert len(mine) <= len(ref) == mine.num_indexed_samples
        for name in ("document_index", "sample_index", "shuffle_index"):
            np.testing.assert_array_equal(getattr(mine, name), getattr(ref, name), err_msg=name)
        for i in sorted({0, len(mine) // 2, len(mine) - 1}):
            assert mine[i]["tokens"].tolist() == ref[i]["tokens"].tolist()
            assert mine[i]["labels"].tolist() == ref[i]["labels"].tolist()
