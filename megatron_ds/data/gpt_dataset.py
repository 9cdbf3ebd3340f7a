"""GPT pretraining samples from a binarized corpus, the way Megatron builds them.

A split's documents are shuffled into a stream (repeated for as many epochs as the requested
samples need), cut into samples of seq_length + 1 tokens that overlap by one, and the samples are
visited in a seeded random order. See sample_index.py for the three arrays.
"""

import numpy as np

from megatron_ds.data.errors import DataError
from megatron_ds.data.indexed_dataset import IndexedDataset
from megatron_ds.data.sample_index import (build_document_index, build_sample_index,
                                           build_shuffle_index, num_epochs_needed)


class GPTDataset:
    """num_samples samples of a split; item i is a dict of numpy arrays, each (seq_length,):
    tokens, labels (int64), loss_mask (float32), position_ids (int64)."""

    def __init__(self, indexed: IndexedDataset, document_ids: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, eod_mask_loss: bool = False, eod_id: int = None):
        if num_samples < 1 or seq_length < 1:
            raise ValueError(f"GPTDataset needs num_samples >= 1 and seq_length >= 1, got "
                             f"{num_samples} and {seq_length}")
        if eod_mask_loss and eod_id is None:
            raise ValueError("eod_mask_loss=True needs eod_id (the tokenizer's .eod)")
        if not 0 <= seed < 2**32:
            raise ValueError(f"--seed {seed}: must be in [0, 2**32) for numpy's RandomState")
        document_ids = np.asarray(document_ids, dtype=np.int64)
        if len(document_ids) and (document_ids.min() < 0 or document_ids.max() >= len(indexed)):
            raise DataError(f"{indexed.prefix}: document ids outside [0, {len(indexed)})")
        self.indexed = indexed
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.eod_mask_loss = eod_mask_loss
        self.eod_id = eod_id

        tokens_per_epoch = int(indexed.sequence_lengths[document_ids].astype(np.int64).sum())
        if tokens_per_epoch == 0:
            raise DataError(f"{indexed.prefix}: the split's {len(document_ids)} documents hold no "
                            f"tokens; change --split or the corpus")
        # One RNG for both shuffles, in this order, so a seed fixes every array.
        rng = np.random.RandomState(seed)
        num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length)
        self.document_index = build_document_index(document_ids, num_epochs, rng)
        self.sample_index = build_sample_index(indexed.sequence_lengths, self.document_index,
                                               seq_length, num_samples)
        self.shuffle_index = build_shuffle_index(num_samples, rng)
        self._position_ids = np.arange(seq_length, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 stream tokens of (unshuffled) sample i, int64."""
        doc_first, offset_first = self.sample_index[i]
        doc_last, offset_last = self.sample_index[i + 1]
        docs = self.document_index
        if doc_first == doc_last:
            pieces = [self.indexed.get(docs[doc_first], offset_first,
                                       offset_last - offset_first + 1)]
        else:
            pieces = [self.indexed.get(docs[doc_first], offset_first)]
            pieces += [self.indexed.get(docs[p]) for p in range(doc_first + 1, doc_last)]
            pieces.append(self.indexed.get(docs[doc_last], 0, offset_last + 1))
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples)")
        x = self.sample_tokens(self.shuffle_index[i])  # (seq_length + 1,)
        tokens, labels = x[:-1], x[1:]
        loss_mask = np.ones(self.seq_length, dtype=np.float32)
        if self.eod_mask_loss:
            # Megatron masks where the *input* is EOD: predicting a new document's first token
            # from the previous document's context teaches nothing. Predicting EOD still counts.
            loss_mask[tokens == self.eod_id] = 0.0
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                "position_ids": self._position_ids.copy()}


def parse_split(split) -> tuple[float, float, float]:
    """Megatron's --split ("969,30,1", "98/2/0", "1") as normalized train/valid/test weights."""
    if isinstance(split, str):
        parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"--split {split!r}: expected up to three comma-separated numbers "
                             f"like 969,30,1") from None
    else:
        weights = [float(w) for w in split]
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers with a "
                         f"positive sum, like 969,30,1")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return tuple(w / total for w in weights)


def split_document_ids(num_docs: int, split) -> tuple[range, range, range]:
    """Contiguous train/valid/test blocks of document ids, rounded the way Megatron rounds."""
    weights = parse_split(split)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_docs))))
    # Rounding can overshoot or undershoot by a document; Megatron moves every boundary by it.
    diff = bounds[-1] - num_docs
    bounds = [0] + [b - diff for b in bounds[1:]]
    return tuple(range(bounds[k], bounds[k + 1]) for k in range(3))


def build_train_valid_test_datasets(data_prefix: str, split: str, seq_length: int, seed: int,
                                    num_samples: tuple[int, int, int], eod_mask_loss=False,
                                    eod_id=None):
    """(train, valid, test) GPTDatasets over one corpus; an entry is None when its block of
    documents is empty or it was asked for 0 samples."""
    indexed = IndexedDataset(data_prefix)
    if indexed.num_documents != len(indexed):
        raise DataError(f"{data_prefix}: {len(indexed)} sequences in {indexed.num_documents} "
                        f"documents; sentence-split corpora are not supported, rebuild without "
                        f"sentence splitting")
    datasets = []
    for ids, n in zip(split_document_ids(indexed.num_documents, split), num_samples):
        if len(ids) == 0 or n == 0:
            datasets.append(None)
            continue
        document_ids = np.arange(ids.start, ids.stop, dtype=np.int64)
        datasets.append(GPTDataset(indexed, document_ids, n, seq_length, seed,
                                   eod_mask_loss=eod_mask_loss, eod_id=eod_id))
    return tuple(datasets)
