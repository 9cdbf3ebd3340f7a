"""Blending several corpora by weight, and building the train/valid/test datasets of --data-path.

``--data-path 0.7 web 0.3 code`` mixes two corpora: each sample of the blend comes from the
dataset furthest behind its share. Behind is measured in steps: dataset d's (taken + 1)-th sample
is due at step (taken + 1) / w_d, the earliest-due one goes next (ties to the first dataset), and a
dataset that already holds its share after this step, taken >= w_d * (i + 1), waits. Every prefix of
n samples then holds each dataset within one sample of w_d * n, however many datasets are blended
(Megatron's rule compares raw sample deficits, weight * i - taken, which can fall more than one
sample behind with four or more datasets). The two index arrays come from the C++ builder
(csrc/data/helpers.cpp) when it is built.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

from megatron_ds.data.errors import DataError
from megatron_ds.data.gpt_dataset import GPTDataset, split_document_ids
from megatron_ds.data.index_cache import cached_arrays
from megatron_ds.data.indexed_dataset import IndexedDataset
from megatron_ds.data.sample_index import _require_cpp, compiled_helpers


def parse_data_path(data_path: Union[str, Sequence[str]]) -> tuple[list[float], list[str]]:
    """("prefix" | ["prefix"] | ["w1", "p1", "w2", "p2", ...]) -> (normalized weights, prefixes)."""
    items = [data_path] if isinstance(data_path, str) else list(data_path)
    if len(items) == 1:
        return [1.0], items
    if len(items) % 2:
        raise DataError(f"--data-path {' '.join(items)}: expected one prefix, or pairs of "
                        f"weight and prefix like '0.7 web 0.3 code'")
    weights, prefixes = [], []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            weights.append(float(w))
        except ValueError:
            raise DataError(f"--data-path: {w!r} is not a weight; give pairs of weight and "
                            f"prefix like '0.7 web 0.3 code'") from None
        prefixes.append(p)
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"--data-path weights {weights}: must be non-negative with a positive sum")
    total = sum(weights)
    return [w / total for w in weights], prefixes


def build_blending_indices(weights: Sequence[float], num_samples: int, use_cpp=None):
    """(dataset_index int16, dataset_sample_index int64), each (num_samples,)."""
    weights = np.asarray(weights, dtype=np.float64)
    helpers = compiled_helpers() if use_cpp is None else (_require_cpp() if use_cpp else None)
    if helpers is not None:
        return helpers.build_blending_indices(weights, int(num_samples))
    return _build_blending_indices_python(weights, num_samples)


def _build_blending_indices_python(weights, num_samples):
    """The C++ loop in Python: the earliest-due dataset among those short of their share."""
    dataset_index = np.empty(num_samples, dtype=np.int16)
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    taken = np.zeros(len(weights), dtype=np.int64)
    with np.errstate(divide="ignore"):
        for i in range(num_samples):
            due = np.where(weights * (i + 1) > taken, (taken + 1) / weights, np.inf)
            d = int(np.argmin(due))  # first minimum on ties, like the C++
            dataset_index[i] = d
            dataset_sample_index[i] = taken[d]
            taken[d] += 1
    return dataset_index, dataset_sample_index


class BlendedDataset:
    """num_samples items drawn from datasets by weight; item i is
    datasets[dataset_index[i]][dataset_sample_index[i]]."""

    def __init__(self, datasets: list, weights: Sequence[float], num_samples: int,
                 dataset_index: np.ndarray, dataset_sample_index: np.ndarray):
        self.datasets, self.weights, self.num_samples = datasets, list(weights), num_samples
        self.dataset_index, self.dataset_sample_index = dataset_index, dataset_sample_index

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples)")
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]


def order_change(dataset, old_num_samples: int, consumed: int) -> Optional[str]:
    """Why the first ``consumed`` samples of ``dataset`` (a GPTDataset or BlendedDataset of this
    run) are not those of the same data built for ``old_num_samples`` (the run that consumed
    them), or None when they are. They are when every corpus read before ``consumed`` keeps its
    GPTDataset.order_key; the blend's own indices are a prefix of a longer blend's in any case."""
    if consumed <= 0 or old_num_samples == len(dataset):
        return None
    if isinstance(dataset, GPTDataset):
        parts = [(None, dataset, old_num_samples, len(dataset))]
    elif isinstance(dataset, BlendedDataset):
        old_index, _ = build_blending_indices(dataset.weights, old_num_samples)
        old_counts = np.bincount(old_index, minlength=len(dataset.datasets))
        read = np.bincount(np.asarray(dataset.dataset_index[:consumed]),
                           minlength=len(dataset.datasets))
        parts = [(k, ds, int(old_counts[k]), len(ds)) for k, ds in enumerate(dataset.datasets)
                 if read[k] > 0]
    else:
        return None
    for k, ds, old, new in parts:
        old_key, new_key = ds.order_key(old), ds.order_key(new)
        if old_key != new_key:
            corpus = "" if k is None else f"corpus {k} ({ds.indexed.prefix}): "
            return (f"{corpus}{old} samples took {old_key[0]} epoch(s){_separate(old_key)}, "
                    f"{new} take {new_key[0]}{_separate(new_key)}")
    return None


def _separate(key) -> str:
    return ", the last shuffled on its own" if key[1] else ""


def default_cache_dir(data_path) -> str:
    """Beside the first corpus: {dir of its prefix}/index-cache."""
    _, prefixes = parse_data_path(data_path)
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")


def build_train_valid_test_datasets(data_path, split: str, seq_length: int, seed: int,
                                    num_samples: tuple[int, int, int], eod_mask_loss=False,
                                    eod_id=None, *, reset_position_ids=False,
                                    reset_attention_mask=False, cache_dir: Optional[str] = None,
                                    is_builder: bool = True, barrier=None):
    """(train, valid, test) over --data-path: a GPTDataset for one prefix, a BlendedDataset for
    several (each corpus split by --split on its own, then blended with the same weights).

    An entry is None when it was asked for 0 samples or its block of documents is empty in every
    corpus. Indices are cached in cache_dir (None: built in memory), built where is_builder and
    read after barrier() elsewhere.
    """
    weights, prefixes = parse_data_path(data_path)
    indexed = []
    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        if ds.num_documents != len(ds):
            raise DataError(f"{prefix}: {len(ds)} sequences in {ds.num_documents} documents; "
                            f"sentence-split corpora are not supported, rebuild without "
                            f"sentence splitting")
        indexed.append(ds)
    blocks = [split_document_ids(ds.num_documents, split) for ds in indexed]
    common = dict(eod_mask_loss=eod_mask_loss, eod_id=eod_id,
                  reset_position_ids=reset_position_ids,
                  reset_attention_mask=reset_attention_mask, cache_dir=cache_dir,
                  is_builder=is_builder, barrier=barrier)

    def gpt(k, split_id, n):
        ids = blocks[k][split_id]
        return GPTDataset(indexed[k], np.arange(ids.start, ids.stop, dtype=np.int64), n,
                          seq_length, seed, **common)

    result = []
    for split_id, n in enumerate(num_samples):
        sizes = [len(b[split_id]) for b in blocks]
        if n == 0 or not any(sizes):
            result.append(None)
            continue
        if len(indexed) == 1:
            result.append(gpt(0, split_id, n))
            continue
        empty = [p for p, w, s in zip(prefixes, weights, sizes) if w > 0 and s == 0]
        if empty:
            name = ("train", "valid", "test")[split_id]
            raise DataError(f"--split {split}: corpus {empty[0]} has no {name} documents but a "
                            f"positive weight in --data-path; change --split or the weights")
        description = {"class": "BlendedDataset", "weights": weights, "num_samples": n,
                       "prefixes": [os.path.abspath(p) for p in prefixes], "split": split,
                       "split_id": split_id}
        arrays = cached_arrays(
            cache_dir, "blend", description, ("dataset_index", "dataset_sample_index"),
            lambda: dict(zip(("dataset_index", "dataset_sample_index"),
                             build_blending_indices(weights, n))),
            is_builder=is_builder, barrier=barrier)
        dataset_index = arrays["dataset_index"]
        counts = np.bincount(np.asarray(dataset_index), minlength=len(prefixes))
        # Each corpus gets exactly the samples the blend takes from it; none for a zero count.
        datasets = [gpt(k, split_id, int(c)) if c else None for k, c in enumerate(counts)]
        result.append(BlendedDataset(datasets, weights, n, dataset_index,
                                     arrays["dataset_sample_index"]))
    return tuple(result)
