"""The three index arrays that turn a split's documents into fixed-length GPT samples, built as
megatron-core's GPTDataset builds them (megatron/core/datasets/gpt_dataset.py,
``_build_document_sample_shuffle_indices``), with the same values for the same seed:

1. num_epochs = the fewest passes over the split holding num_samples * seq_length + 1 tokens.
2. Document index: the split's document ids repeated num_epochs times and shuffled as one array;
   except when the last epoch is "separate" (separate_final_epoch below), then the first
   num_epochs - 1 epochs are shuffled together and the last epoch is shuffled on its own after
   them, so the earlier epochs' order does not depend on how much of the last one is used.
3. Sample index: every sample the whole document index holds, (num_epochs * tokens_per_epoch - 1)
   // seq_length of them (samples_in below), not just the num_samples requested.
4. Shuffle index: a permutation of ALL those samples; with a separate last epoch, the samples that
   lie before it are permuted among themselves and the last epoch's samples after them.

One numpy RandomState(seed) draws the document shuffle(s) and then the sample shuffle(s), in that
order. A run reads shuffle_index[0:num_samples]; since nothing but num_epochs and the separate flag
depends on num_samples, two sample counts with the same (num_epochs, separate_final_epoch) read
prefixes of one order, and a short run draws from the whole epoch.

Each function is a pure function of its inputs (the RNG is passed in, so the call order fixes the
result). The sample index is built by the C++ walk of megatron_ds._C_data (csrc/data/helpers.cpp,
compiled at install) when it is importable, else by the NumPy version here, with one warning; both
give the same rows. The document and shuffle indices are int64 (megatron-core's are int32 and
uint32, same values); the sample index is int32 while every position and offset fits, int64
beyond (stream positions are accumulated in int64 either way).

Terms: the *stream* is the concatenation of documents in document-index order; sample i reads the
stream's tokens [i * seq_length, i * seq_length + seq_length] (seq_length + 1 of them), so
consecutive samples share one token: the last input-side token of one is the first of the next.
"""

import warnings

import numpy as np

try:
    from megatron_ds import _C_data
except ImportError:  # built by `pip install --no-build-isolation -e .`; never compiled at run time
    _C_data = None

_warned = False


def compiled_helpers():
    """The compiled module, or None after warning once that the NumPy fallback is used."""
    global _warned
    if _C_data is None and not _warned:
        _warned = True
        warnings.warn("megatron_ds._C_data is not built; building dataset indices with NumPy "
                      "(slower). Reinstall with `pip install --no-build-isolation -e .` to "
                      "compile csrc/data/helpers.cpp.", RuntimeWarning, stacklevel=3)
    return _C_data


INT32_MAX = np.iinfo(np.int32).max


def sample_index_dtype(document_index_length: int, max_document_length: int) -> np.dtype:
    """int32 when every stored value (positions in the document index, offsets inside a document)
    fits, else int64. Offsets are below the longest document, which the .idx format caps at 2^31-1,
    so in practice the document index passing 2^31 entries is what selects int64."""
    if document_index_length <= INT32_MAX and max_document_length <= INT32_MAX:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def num_epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """Fewest passes over the split that give num_samples * seq_length + 1 tokens."""
    if tokens_per_epoch <= 0:
        raise ValueError("the split has no tokens")
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


# megatron-core's threshold: a last epoch used for fewer than this fraction of its samples is
# shuffled on its own.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


def samples_in(num_tokens: int, seq_length: int) -> int:
    """Samples of seq_length + 1 tokens (overlapping by one) that num_tokens stream tokens hold."""
    return max(0, (num_tokens - 1) // seq_length)


def separate_final_epoch(tokens_per_epoch: int, num_epochs: int, num_samples: int,
                         seq_length: int) -> bool:
    """megatron-core's rule: with more than one epoch, the last one is shuffled separately (in the
    document index and in the shuffle index) when the run takes fewer than
    int(0.80 * samples_per_epoch) samples from it."""
    if num_epochs <= 1:
        return False
    before_last = samples_in((num_epochs - 1) * tokens_per_epoch, seq_length)
    from_last = num_samples - before_last
    per_epoch = samples_in(tokens_per_epoch, seq_length)
    return from_last < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)


def build_document_index(document_ids: np.ndarray, num_epochs: int,
                         rng: np.random.RandomState, separate_final: bool = False) -> np.ndarray:
    """The split's document ids repeated num_epochs times and shuffled as one array; with
    separate_final (and num_epochs > 1), num_epochs - 1 copies shuffled as one array followed by
    the last copy shuffled on its own (two RNG draws, in that order).

    Returns (num_epochs * len(document_ids),) int64.
    """
    if separate_final and num_epochs > 1:
        first = build_document_index(document_ids, num_epochs - 1, rng)
        last = build_document_index(document_ids, 1, rng)
        return np.concatenate([first, last])
    doc_index = np.tile(np.asarray(document_ids, dtype=np.int64), num_epochs)
    rng.shuffle(doc_index)
    return doc_index


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray,
                       seq_length: int, num_samples: int, dtype=None, use_cpp=None) -> np.ndarray:
    """Where each sample starts: (num_samples + 1, 2) rows of (position in document_index,
    token offset in that document), of sample_index_dtype() unless dtype is given.

    Row i + 1 is where sample i ends, inclusive, which is also where sample i + 1 starts (the
    shared token). Row 0 is (0, 0) as in Megatron, even when the first document is empty.
    use_cpp: None = the compiled walk when built, True = require it, False = NumPy.
    """
    document_index = np.asarray(document_index, dtype=np.int64)
    needed = num_samples * seq_length + 1
    if dtype is None:
        longest = int(np.max(sequence_lengths)) if len(sequence_lengths) else 0
        dtype = sample_index_dtype(len(document_index), longest)
    dtype = np.dtype(dtype)
    helpers = compiled_helpers() if use_cpp is None else (_require_cpp() if use_cpp else None)
    if helpers is not None:
        build = (helpers.build_sample_index_int32 if dtype == np.int32
                 else helpers.build_sample_index_int64)
        try:
            return build(np.asarray(sequence_lengths, dtype=np.int32), document_index,
                         int(seq_length), int(num_samples))
        except IndexError:  # std::out_of_range: the stream ran short (or a bad document id)
            total = int(np.asarray(sequence_lengths, dtype=np.int64)[document_index].sum())
            raise ValueError(f"document index holds {total} tokens, {needed} needed") from None
    return _build_sample_index_numpy(sequence_lengths, document_index, seq_length,
                                     num_samples).astype(dtype, copy=False)


def _require_cpp():
    if _C_data is None:
        raise RuntimeError("megatron_ds._C_data is not built; reinstall with "
                           "`pip install --no-build-isolation -e .`")
    return _C_data


def _build_sample_index_numpy(sequence_lengths, document_index, seq_length, num_samples):
    """The same rows as the C++ walk, vectorized: a cumulative sum and a binary search, int64."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)[document_index]  # (num_docs_in_index,)
    ends = np.cumsum(lengths)  # stream position one past each document
    needed = num_samples * seq_length + 1
    if len(ends) == 0 or ends[-1] < needed:
        raise ValueError(f"document index holds {ends[-1] if len(ends) else 0} tokens, "
                         f"{needed} needed")
    starts_in_stream = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # The document holding stream token p is the first whose end is past p; side="right" skips
    # empty documents, whose end equals the previous one's.
    doc_pos = np.searchsorted(ends, starts_in_stream, side="right").astype(np.int64)
    offsets = starts_in_stream - (ends[doc_pos] - lengths[doc_pos])
    sample_index = np.stack([doc_pos, offsets], axis=1)
    sample_index[0] = 0
    return sample_index


def build_shuffle_index(num_samples: int, rng: np.random.RandomState,
                        total_samples: int = None) -> np.ndarray:
    """A permutation of range(total_samples) (default num_samples), (total_samples,) int64:
    range(num_samples) shuffled, followed by range(num_samples, total_samples) shuffled on its own
    (megatron-core's _build_shuffle_index; the second range is a separate last epoch's samples)."""
    first = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(first)
    if total_samples is None or total_samples == num_samples:
        return first
    if total_samples < num_samples:
        raise ValueError(f"total_samples {total_samples} < num_samples {num_samples}")
    last = np.arange(num_samples, total_samples, dtype=np.int64)
    rng.shuffle(last)
    return np.concatenate([first, last])
