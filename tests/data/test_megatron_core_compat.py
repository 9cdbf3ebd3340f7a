"""Compatibility both ways with megatron-core's IndexedDataset / IndexedDatasetBuilder (0.16)."""

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
