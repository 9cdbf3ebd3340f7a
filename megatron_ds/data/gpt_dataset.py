"""GPT pretraining samples from a binarized corpus, indexed as megatron-core's GPTDataset indexes
them (same document, sample and shuffle index values for the same seed; sample_index.py says how).

A split's documents are shuffled into a stream of as many epochs as the requested samples need,
the stream is cut into samples of seq_length + 1 tokens that overlap by one, and a seeded
permutation of every sample of those epochs (not only of the first num_samples) gives the order;
the dataset exposes the first num_samples of that order. So a short run draws from across the
whole epoch, and a longer run with the same number of epochs (and the same separate-last-epoch
decision) starts with exactly the samples of the shorter one: extending --train-iters on resume
continues the data instead of repeating it.
"""

import hashlib
import os

import numpy as np

from megatron_ds.data.errors import DataError
from megatron_ds.data.index_cache import cached_arrays
from megatron_ds.data.indexed_dataset import IndexedDataset
from megatron_ds.data.sample_index import (build_document_index, build_sample_index,
                                           build_shuffle_index, num_epochs_needed, samples_in,
                                           separate_final_epoch)


class GPTDataset:
    """num_samples samples of a split; item i is a dict of numpy arrays, each (seq_length,):
    tokens, labels (int64), loss_mask (float32), position_ids (int64), and with
    reset_attention_mask also document_ids (int64).

    Item i is stream sample shuffle_index[i]. The arrays cover all num_epochs epochs:
    document_index (num_epochs * num_documents,), sample_index (num_indexed_samples + 1, 2) and
    shuffle_index (num_indexed_samples,), where num_indexed_samples = (num_epochs *
    tokens_per_epoch - 1) // seq_length >= num_samples. len() is num_samples; megatron-core's
    GPTDataset.__len__ is num_indexed_samples instead, of which Megatron's trainer reads the first
    train_iters * global_batch_size, i.e. the same samples as here.

    eod_mask_loss: loss_mask is 0 where the input token is EOD.
    reset_position_ids: positions restart at 0 after every EOD (each document starts at 0).
    reset_attention_mask: document_ids[j] = number of EODs in tokens[:j]; a token may attend only
        to earlier tokens with the same id (the model's ``document_ids`` argument).
    cache_dir / is_builder / barrier: see index_cache.cached_arrays; without cache_dir the
        indices are built in memory. The cache key holds what determines the arrays (corpus,
        documents, seq_length, seed, num_epochs, separate_final_epoch), not num_samples, so
        sample counts that index alike share one set of files.
    """

    def __init__(self, indexed: IndexedDataset, document_ids: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, eod_mask_loss: bool = False, eod_id: int = None,
                 reset_position_ids: bool = False, reset_attention_mask: bool = False,
                 cache_dir: str = None, is_builder: bool = True, barrier=None):
        if num_samples < 1 or seq_length < 1:
            raise ValueError(f"GPTDataset needs num_samples >= 1 and seq_length >= 1, got "
                             f"{num_samples} and {seq_length}")
        needs_eod = [n for n, on in (("eod_mask_loss", eod_mask_loss),
                                     ("reset_position_ids", reset_position_ids),
                                     ("reset_attention_mask", reset_attention_mask)) if on]
        if needs_eod and eod_id is None:
            raise ValueError(f"{needs_eod[0]}=True needs eod_id (the tokenizer's .eod); "
                             f"pass --tokenizer-model")
        if not 0 <= seed < 2**32:
            raise ValueError(f"--seed {seed}: must be in [0, 2**32) for numpy's RandomState")
        document_ids = np.asarray(document_ids, dtype=np.int64)
        if len(document_ids) and (document_ids.min() < 0 or document_ids.max() >= len(indexed)):
            raise DataError(f"{indexed.prefix}: document ids outside [0, {len(indexed)})")
        self.indexed = indexed
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.eod_mask_loss = eod_mask_loss
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask
        self.eod_id = eod_id

        tokens_per_epoch = int(indexed.sequence_lengths[document_ids].astype(np.int64).sum())
        if tokens_per_epoch == 0:
            raise DataError(f"{indexed.prefix}: the split's {len(document_ids)} documents hold no "
                            f"tokens; change --split or the corpus")

        self.tokens_per_epoch = tokens_per_epoch
        num_epochs, separate = self.order_key(num_samples)
        self.num_epochs, self.separate_final_epoch = num_epochs, separate
        self.num_indexed_samples = samples_in(num_epochs * tokens_per_epoch, seq_length)

        def build():
            # One RNG for the document shuffle(s) then the sample shuffle(s), megatron-core's
            # order, so a seed fixes every array.
            rng = np.random.RandomState(seed)
            document_index = build_document_index(document_ids, num_epochs, rng, separate)
            sample_index = build_sample_index(indexed.sequence_lengths, document_index,
                                              seq_length, self.num_indexed_samples)
            # With a separate last epoch, the samples before it are permuted among themselves.
            first = (samples_in((num_epochs - 1) * tokens_per_epoch, seq_length) if separate
                     else self.num_indexed_samples)
            shuffle_index = build_shuffle_index(first, rng, self.num_indexed_samples)
            return {"document_index": document_index, "sample_index": sample_index,
                    "shuffle_index": shuffle_index}

        description = {
            "class": "GPTDataset", "prefix": os.path.abspath(indexed.prefix),
            "idx_bytes": os.path.getsize(indexed.prefix + ".idx"),
            "idx_mtime_ns": os.stat(indexed.prefix + ".idx").st_mtime_ns,
            "bin_bytes": os.path.getsize(indexed.prefix + ".bin"),
            "document_ids": hashlib.sha256(document_ids.tobytes()).hexdigest(),
            "num_documents": len(document_ids), "seq_length": seq_length, "seed": seed,
            "num_epochs": num_epochs, "separate_final_epoch": separate,
        }
        arrays = cached_arrays(cache_dir, "gpt", description,
                               ("document_index", "sample_index", "shuffle_index"), build,
                               is_builder=is_builder, barrier=barrier)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        if (len(self.shuffle_index) != self.num_indexed_samples
                or len(self.sample_index) != self.num_indexed_samples + 1):
            raise DataError(f"{cache_dir}: cached indices for {indexed.prefix} hold "
                            f"{len(self.shuffle_index)} samples, {self.num_indexed_samples} "
                            f"expected; delete the stale files from --data-cache-path")
        self._position_ids = np.arange(seq_length, dtype=np.int64)

    def order_key(self, num_samples: int) -> tuple[int, bool]:
        """(num_epochs, separate_final_epoch) for a run of num_samples: the only things the indices
        take from the sample count. Two counts with one key read prefixes of one sample order."""
        num_epochs = num_epochs_needed(self.tokens_per_epoch, num_samples, self.seq_length)
        return num_epochs, separate_final_epoch(self.tokens_per_epoch, num_epochs, num_samples,
                                                self.seq_length)

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
        item = {"tokens": tokens, "labels": labels,
                "loss_mask": np.ones(self.seq_length, dtype=np.float32),
                "position_ids": self._position_ids.copy()}
        if self.eod_mask_loss or self.reset_position_ids or self.reset_attention_mask:
            is_eod = tokens == self.eod_id
        if self.eod_mask_loss:
            # Megatron masks where the *input* is EOD: predicting a new document's first token
            # from the previous document's context teaches nothing. Predicting EOD still counts.
            item["loss_mask"][is_eod] = 0.0
        if self.reset_position_ids or self.reset_attention_mask:
            # Token j belongs to the document numbered by the EODs strictly before it; an EOD
            # closes its own document.
            document_ids = np.zeros(self.seq_length, dtype=np.int64)
            np.cumsum(is_eod[:-1], out=document_ids[1:])
            if self.reset_position_ids:
                # Position = j - (index of the first token of j's document).
                starts = np.flatnonzero(np.diff(document_ids, prepend=-1))  # (num_docs,)
                item["position_ids"] -= starts[document_ids]
            if self.reset_attention_mask:
                item["document_ids"] = document_ids
        return item


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
