import os
import struct

import numpy as np
import pytest

from megatron_ds.data.errors import DataError
from megatron_ds.data.indexed_dataset import (DTYPE_CODES, IndexedDataset,
                                              IndexedDatasetBuilder, best_dtype)

# Written from docs/formats.md, independently of the writer.
FORMATS_MD_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def write(prefix, docs, dtype):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for doc in docs:
        builder.add_document(doc)
    builder.finalize(f"{prefix}.idx")


DOCS = [[1, 2, 3], [], [4], list(range(5, 105)), [7, 7]]


@pytest.mark.parametrize("code", sorted(FORMATS_MD_DTYPES))
def test_round_trip_every_dtype_code(tmp_path, code):
    dtype = np.dtype(FORMATS_MD_DTYPES[code])
    write(tmp_path / "d", [np.array(d, dtype=dtype) for d in DOCS], dtype)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert ds.dtype == dtype and len(ds) == len(DOCS)
    for i, doc in enumerate(DOCS):
        assert ds[i].dtype == dtype
        np.testing.assert_array_equal(ds[i], np.array(doc, dtype=dtype))
    np.testing.assert_array_equal(ds.get(3, offset=10, length=5), np.arange(15, 20, dtype=dtype))
    np.testing.assert_array_equal(ds.get(3, offset=98), np.array([103, 104], dtype=dtype))


@pytest.mark.parametrize("code", sorted(FORMATS_MD_DTYPES))
def test_idx_bytes_field_by_field(tmp_path, code):
    dtype = np.dtype(FORMATS_MD_DTYPES[code])
    write(tmp_path / "d", DOCS, dtype)
    raw = (tmp_path / "d.idx").read_bytes()
    S, D = len(DOCS), len(DOCS) + 1
    assert raw[0:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9) == (1,)
    assert raw[17] == code
    assert struct.unpack_from("<Q", raw, 18) == (S,)
    assert struct.unpack_from("<Q", raw, 26) == (D,)
    lengths = struct.unpack_from(f"<{S}i", raw, 34)
    assert list(lengths) == [len(d) for d in DOCS]
    pointers = struct.unpack_from(f"<{S}q", raw, 34 + 4 * S)
    expected, pos = [], 0
    for d in DOCS:
        expected.append(pos)
        pos += len(d) * dtype.itemsize
    assert list(pointers) == expected
    assert list(struct.unpack_from(f"<{D}q", raw, 34 + 12 * S)) == list(range(D))
    assert len(raw) == 34 + 12 * S + 8 * D
    # .bin: the tokens back to back, no header.
    flat = [t for d in DOCS for t in d]
    assert (tmp_path / "d.bin").read_bytes() == np.array(flat, dtype=dtype).tobytes()


def test_reader_exposes_index_arrays(tmp_path):
    write(tmp_path / "d", DOCS, np.uint16)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert ds.sequence_lengths.tolist() == [3, 0, 1, 100, 2]
    assert ds.sequence_pointers.tolist() == [0, 6, 6, 8, 208]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4, 5]
    assert ds.sequence_pointers.dtype == np.int64


def test_empty_dataset(tmp_path):
    write(tmp_path / "d", [], np.int32)
    assert len(IndexedDataset(str(tmp_path / "d"))) == 0


def test_no_tmp_files_and_no_pair_before_finalize(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16)
    builder.add_document([1, 2])
    assert not (tmp_path / "d.bin").exists()  # only d.bin.tmp so far
    with pytest.raises(DataError, match=r"d\.(bin|idx).*preprocess_data"):
        IndexedDataset(str(tmp_path / "d"))
    builder.finalize(str(tmp_path / "d.idx"))
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    builder = IndexedDatasetBuilder(str(tmp_path / "e.bin"), np.uint16)
    builder.add_document([1])
    builder.abort()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_missing_files_and_bad_magic(tmp_path):
    with pytest.raises(DataError, match=r"x\.idx: no such file.*tools/preprocess_data.py"):
        IndexedDataset(str(tmp_path / "x"))
    write(tmp_path / "d", DOCS, np.uint16)
    os.remove(tmp_path / "d.bin")
    with pytest.raises(DataError, match=r"d\.bin: no such file.*tools/preprocess_data.py"):
        IndexedDataset(str(tmp_path / "d"))
    write(tmp_path / "d", DOCS, np.uint16)
    raw = bytearray((tmp_path / "d.idx").read_bytes())
    raw[0:9] = b"NOTANIDX!"
    (tmp_path / "d.idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"d\.idx: .*bad magic"):
        IndexedDataset(str(tmp_path / "d"))


def test_token_out_of_dtype_range_is_refused(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16)
    with pytest.raises(DataError, match="int32"):
        builder.add_document(np.array([70000]))
    builder.abort()


def test_pickle_reopens_instead_of_copying(tmp_path):
    import pickle

    write(tmp_path / "d", DOCS, np.uint16)
    ds = pickle.loads(pickle.dumps(IndexedDataset(str(tmp_path / "d"))))
    np.testing.assert_array_equal(ds[3], np.arange(5, 105))


def test_best_dtype():
    assert best_dtype(32000) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(102400) == np.int32
    assert set(DTYPE_CODES) == set(range(1, 9))


def test_offsets_past_4_gib_are_64_bit(tmp_path):
    """Writer: three 2**30-token int32 sequences put pointers at 2**32 and 2**33 (white-box: the
    lengths are injected so no 12 GiB file is written). Reader: a sparse .bin past 4 GiB."""
    builder = IndexedDatasetBuilder(str(tmp_path / "big.bin"), np.int32)
    builder._lengths.extend([2**30] * 3)
    builder._doc_boundaries.extend([1, 2, 3])
    builder.finalize(str(tmp_path / "big.idx"))
    raw = (tmp_path / "big.idx").read_bytes()
    assert struct.unpack_from("<3q", raw, 34 + 4 * 3) == (0, 2**32, 2**33)

    far = 2**32 + 8  # byte offset of the second sequence
    with open(tmp_path / "sparse.bin", "wb") as f:
        f.write(np.array([1, 2], dtype="<u2").tobytes())
        f.seek(far)
        f.write(np.array([7, 8, 9], dtype="<u2").tobytes())
    with open(tmp_path / "sparse.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 3))
        f.write(struct.pack("<2i", 2, 3) + struct.pack("<2q", 0, far) + struct.pack("<3q", 0, 1, 2))
    ds = IndexedDataset(str(tmp_path / "sparse"))
    assert ds[1].tolist() == [7, 8, 9] and ds.get(1, 1, 2).tolist() == [8, 9]
