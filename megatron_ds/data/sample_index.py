"""The three index arrays that turn a split's documents into fixed-length GPT samples.

Isolated here so a compiled version can replace them; each is a pure function of its inputs (the
RNG is passed in, so the call order fixes the result). All indices are int64.

Terms: the *stream* is the concatenation of documents in document-index order; sample i reads the
stream's tokens [i * seq_length, i * seq_length + seq_length] (seq_length + 1 of them), so
consecutive samples share one token: the last input-side token of one is the first of the next.
"""

import numpy as np


def num_epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """Fewest passes over the split that give num_samples * seq_length + 1 tokens."""
    if tokens_per_epoch <= 0:
        raise ValueError("the split has no tokens")
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(document_ids: np.ndarray, num_epochs: int,
                         rng: np.random.RandomState) -> np.ndarray:
    """The split's document ids repeated num_epochs times, shuffled as one array.

    Returns (num_epochs * len(document_ids),) int64.
    """
    doc_index = np.tile(np.asarray(document_ids, dtype=np.int64), num_epochs)
    rng.shuffle(doc_index)
    return doc_index


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray,
                       seq_length: int, num_samples: int) -> np.ndarray:
    """Where each sample starts: (num_samples + 1, 2) int64 rows of (position in document_index,
    token offset in that document).

    Row i + 1 is where sample i ends, inclusive, which is also where sample i + 1 starts (the
    shared token). Row 0 is (0, 0) as in Megatron, even when the first document is empty.
    """
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


def build_shuffle_index(num_samples: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of range(num_samples), (num_samples,) int64."""
    shuffle_index = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(shuffle_index)
    return shuffle_index
