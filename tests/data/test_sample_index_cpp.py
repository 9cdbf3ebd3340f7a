"""The compiled index builders (csrc/data/helpers.cpp) against plain-Python versions of the same
algorithms, written here as loops over tokens and samples, independent of the package's NumPy code."""

import warnings

import numpy as np
import pytest

from megatron_ds.data import sample_index
from megatron_ds.data.blending import build_blending_indices
from megatron_ds.data.sample_index import build_sample_index, sample_index_dtype

# No skip when the extension is missing: the install always builds it, so its absence fails.
def cpp(test):
    return test


def test_compiled_builders_are_installed():
    assert sample_index._C_data is not None, "megatron_ds._C_data missing: pip install --no-build-isolation -e ."


def python_sample_index(sizes, document_index, seq_length, num_samples):
    """Row i: (position in document_index, offset) of stream token i * seq_length, by walking."""
    rows = [(0, 0)]
    pos, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length
        # Move remaining tokens forward; a document boundary reached exactly moves to the next
        # non-empty document, since the token at the boundary lives there.
        while offset + remaining >= int(sizes[document_index[pos]]):
            remaining -= int(sizes[document_index[pos]]) - offset
            pos, offset = pos + 1, 0
        offset += remaining
        rows.append((pos, offset))
    return rows


def random_case(rng, num_docs, max_len, seq_length):
    sizes = rng.integers(0, max_len + 1, size=num_docs).astype(np.int32)
    sizes[rng.random(num_docs) < 0.1] = 0  # empty documents in the stream
    sizes[0] = max(sizes[0], 1)
    document_index = np.tile(np.arange(num_docs), 3)
    rng.shuffle(document_index)
    total = int(sizes[document_index].astype(np.int64).sum())
    num_samples = (total - 1) // seq_length
    return sizes, document_index, num_samples


@cpp
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_cpp_sample_index_equals_python_walk(seed, dtype):
    rng = np.random.default_rng(seed)
    seq_length = int(rng.choice([1, 3, 16, 100]))
    sizes, document_index, num_samples = random_case(rng, int(rng.integers(1, 60)), 80, seq_length)
    got = build_sample_index(sizes, document_index, seq_length, num_samples, dtype=dtype,
                             use_cpp=True)
    assert got.dtype == dtype and got.shape == (num_samples + 1, 2)
    assert got.tolist() == [list(r) for r in
                            python_sample_index(sizes, document_index, seq_length, num_samples)]
    numpy_rows = build_sample_index(sizes, document_index, seq_length, num_samples,
                                    dtype=dtype, use_cpp=False)
    np.testing.assert_array_equal(got, numpy_rows)


@cpp
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_stream_positions_past_2_pow_32_tokens(dtype):
    """Few documents of nearly 2^31 tokens: the stream passes 2^32 tokens, so the walk must
    accumulate in int64 while the stored positions/offsets still fit int32."""
    sizes = np.array([2**31 - 1, 5, 2**31 - 7, 2**30 + 3], dtype=np.int32)
    document_index = np.array([0, 3, 1, 2, 0, 3, 2, 1])
    seq_length = 2**27 + 11  # ~1.3e8 tokens a sample
    total = int(sizes[document_index].astype(np.int64).sum())
    assert total > 2**33
    num_samples = (total - 1) // seq_length
    got = build_sample_index(sizes, document_index, seq_length, num_samples, dtype=dtype,
                             use_cpp=True)
    expected = python_sample_index(sizes, document_index, seq_length, num_samples)
    assert got.tolist() == [list(r) for r in expected]
    assert max(r[1] for r in expected) > 2**30  # offsets deep inside the long documents
    np.testing.assert_array_equal(got, build_sample_index(sizes, document_index, seq_length,
                                                          num_samples, dtype=dtype, use_cpp=False))


def test_sample_index_dtype_rule():
    assert sample_index_dtype(10, 100) == np.int32
    assert sample_index_dtype(2**31 - 1, 2**31 - 1) == np.int32
    assert sample_index_dtype(2**31, 5) == np.int64  # a document index past int32
    assert sample_index_dtype(5, 2**31) == np.int64


def test_too_few_tokens_is_a_clear_error():
    sizes = np.array([3, 4], dtype=np.int32)
    for use_cpp in ([False, True] if sample_index._C_data is not None else [False]):
        with pytest.raises(ValueError, match="holds 7 tokens, 9 needed"):
            build_sample_index(sizes, np.array([0, 1]), 4, 2, use_cpp=use_cpp)


def python_blending(weights, num_samples):
    """Each sample from the dataset short of its share whose next sample is due earliest."""
    taken = [0] * len(weights)
    out = []
    for i in range(num_samples):
        best = None
        for d, w in enumerate(weights):
            if w * (i + 1) > taken[d] and (best is None or (taken[d] + 1) / w < (taken[best] + 1) / weights[best]):
                best = d
        out.append((best, taken[best]))
        taken[best] += 1
    return out


@cpp
@pytest.mark.parametrize("seed", range(4))
def test_cpp_blending_equals_python(seed):
    rng = np.random.default_rng(seed)
    weights = rng.random(int(rng.integers(1, 7))) ** 2
    weights /= weights.sum()
    di, dsi = build_blending_indices(weights, 500, use_cpp=True)
    assert di.dtype == np.int16 and dsi.dtype == np.int64
    assert list(zip(di.tolist(), dsi.tolist())) == python_blending(list(weights), 500)
    ndi, ndsi = build_blending_indices(weights, 500, use_cpp=False)
    np.testing.assert_array_equal(di, ndi)
    np.testing.assert_array_equal(dsi, ndsi)


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(sample_index, "_C_data", None)
    monkeypatch.setattr(sample_index, "_warned", False)
    sizes, docs = np.array([5, 0, 9], dtype=np.int32), np.array([2, 0, 1, 0])
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation"):
        rows = build_sample_index(sizes, docs, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        build_sample_index(sizes, docs, 4, 4)
    assert rows.tolist() == [list(r) for r in python_sample_index(sizes, docs, 4, 4)]
    with pytest.raises(RuntimeError, match="not built"):
        build_sample_index(sizes, docs, 4, 4, use_cpp=True)
