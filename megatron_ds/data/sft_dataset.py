"""SFT samples: binarized conversations packed into full sequences, attention kept inside each one.

On disk (tools/preprocess_sft.py), per prefix, two Megatron indexed datasets with one document per
conversation: ``{prefix}_tokens`` (token ids) and ``{prefix}_loss_mask`` (uint8, 1 on assistant
tokens: megatron_ds/data/chat.py). ``--data-path`` lists one or more prefixes; their conversations
are taken together (a data mix is a list of prefixes).

From conversations to samples of seq_length S:

* Truncation: a conversation of n tokens keeps its first min(n, S + 1) (one sample holds S inputs
  and S labels, a conversation's labels being its own tokens shifted by one). A conversation whose
  kept labels (kept tokens 1..) hold no assistant token is dropped: it would teach nothing. Both
  are counted and reported.
* Packing: conversations in a seeded random order fill samples best-fit among the last
  ``OPEN_SAMPLES`` samples still open (a conversation of k kept tokens takes k - 1 positions);
  when none has room the fullest is closed. The tail of a sample that nothing fits is padding
  (token 0, loss mask 0, its own document id, so it affects nothing).
* Each sample: tokens, labels, loss_mask (of the labels), position_ids restarting at 0 for each
  conversation, document_ids (0, 1, ... per conversation; the model's document-causal mask).
* Epochs: the packing is fixed; epoch e visits every packed sample once, in a permutation seeded
  by (seed, e). Sample i of the dataset is sample i % P of epoch i // P (P packed samples).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megatron_ds.data.errors import DataError
from megatron_ds.data.index_cache import cached_arrays
from megatron_ds.data.indexed_dataset import IndexedDataset

OPEN_SAMPLES = 32  # samples kept open for best fit: ~97% fill on SFT-like length mixes, O(32) per conversation


def tokens_prefix(prefix: str) -> str:
    return f"{prefix}_tokens"


def loss_mask_prefix(prefix: str) -> str:
    return f"{prefix}_loss_mask"


class ConversationCorpus:
    """The conversations of one or more prefixes, in order; conversation i is (tokens, loss mask)."""

    def __init__(self, prefixes, flag: str = "--data-path"):
        self.prefixes = [os.fspath(p) for p in ([prefixes] if isinstance(prefixes, (str, os.PathLike)) else prefixes)]
        if not self.prefixes:
            raise DataError(f"{flag}: no SFT prefix given; pass what tools/preprocess_sft.py wrote (--output-prefix)")
        self.tokens, self.masks = [], []
        for p in self.prefixes:
            for part in (tokens_prefix(p), loss_mask_prefix(p)):
                for ext in (".bin", ".idx"):
                    if not os.path.isfile(part + ext):
                        raise DataError(f"{flag} {p}: {part + ext} not found; write it with tools/preprocess_sft.py")
            tok, mask = IndexedDataset(tokens_prefix(p)), IndexedDataset(loss_mask_prefix(p))
            if len(tok) != len(mask) or not np.array_equal(tok.sequence_lengths, mask.sequence_lengths):
                raise DataError(f"{flag} {p}: {tokens_prefix(p)} and {loss_mask_prefix(p)} do not describe the same "
                                f"conversations (lengths differ); rewrite both with tools/preprocess_sft.py")
            if mask.dtype != np.uint8:
                raise DataError(f"{flag} {p}: {loss_mask_prefix(p)} holds {mask.dtype}, expected uint8; "
                                f"rewrite it with tools/preprocess_sft.py")
            self.tokens.append(tok)
            self.masks.append(mask)
        self.lengths = np.concatenate([t.sequence_lengths.astype(np.int64) for t in self.tokens])
        self._starts = np.cumsum([0] + [len(t) for t in self.tokens])  # first global id of each prefix

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64, loss mask uint8) of conversation i, its first `length` tokens (all when None)."""
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = int(i - self._starts[k])
        return (self.tokens[k].get(j, 0, length).astype(np.int64), self.masks[k].get(j, 0, length))

    def description(self) -> dict:
        """What identifies the files, for the index cache key."""
        out = []
        for p in self.prefixes:
            for part in (tokens_prefix(p), loss_mask_prefix(p)):
                st = os.stat(part + ".idx")
                out.append([os.path.abspath(part), st.st_size, st.st_mtime_ns, os.path.getsize(part + ".bin")])
        return {"files": out}


@dataclass
class PackingStats:
    """What packing did with a corpus; ``summary()`` is the log line."""

    conversations: int
    truncated: int  # longer than seq_length + 1 tokens: kept the first seq_length + 1
    dropped: int  # no assistant token among the kept labels
    samples: int  # packed samples (one epoch)
    seq_length: int
    positions: int  # filled positions over all samples (the rest is padding)
    loss_tokens: int  # assistant tokens among the labels, one epoch

    def summary(self) -> str:
        fill = self.positions / max(self.samples * self.seq_length, 1)
        return (f"{self.conversations} conversations -> {self.samples} packed samples of {self.seq_length} tokens "
                f"({100 * fill:.1f}% filled, {self.loss_tokens} loss tokens per epoch); "
                f"{self.truncated} truncated to {self.seq_length + 1} tokens, "
                f"{self.dropped} dropped (no assistant token left after truncation)")


def kept_lengths(corpus: ConversationCorpus, seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept tokens of each conversation (0 = dropped), assistant tokens among its kept labels)."""
    kept = np.minimum(corpus.lengths, seq_length + 1)
    loss_tokens = np.zeros(len(corpus), dtype=np.int64)
    for i in range(len(corpus)):
        _, mask = corpus.get(i, int(kept[i]))
        loss_tokens[i] = int(mask[1:].sum())
    kept[(loss_tokens == 0) | (kept < 2)] = 0
    return kept, loss_tokens


def pack(positions: np.ndarray, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit packing of items (positions[i] > 0 each, at most capacity; items with 0 are skipped)
    in a seeded random order. Returns (sample_offsets [P + 1], items [n]): sample p holds
    items[sample_offsets[p]:sample_offsets[p + 1]], in the order they were placed."""
    order = np.random.RandomState(seed).permutation(len(positions))
    order = order[positions[order] > 0]
    free = np.full(OPEN_SAMPLES, -1, dtype=np.int64)  # room left in each open sample; -1: slot unused
    members: list[list[int] | None] = [None] * OPEN_SAMPLES
    closed: list[list[int]] = []
    for item in order.tolist():
        size = int(positions[item])
        fits = np.flatnonzero(free >= size)
        if len(fits):
            slot = int(fits[np.argmin(free[fits])])  # best fit: the least room that still fits
        else:
            used = np.flatnonzero(free >= 0)
            if len(used) == OPEN_SAMPLES:  # close the fullest open sample to make a slot
                slot = int(used[np.argmin(free[used])])
                closed.append(members[slot])
            else:
                slot = int(np.flatnonzero(free < 0)[0])
            free[slot], members[slot] = capacity, []
        members[slot].append(item)
        free[slot] -= size
    closed.extend(m for m in members if m)
    offsets = np.zeros(len(closed) + 1, dtype=np.int64)
    np.cumsum([len(m) for m in closed], out=offsets[1:])
    items = np.fromiter((i for m in closed for i in m), dtype=np.int64, count=int(offsets[-1]))
    return offsets, items


class SFTDataset:
    """num_samples packed SFT samples (epochs of the packing, each in its own order); item i is a
    dict of (seq_length,) numpy arrays: tokens, labels, position_ids, document_ids (int64), loss_mask
    (float32), as megatron_ds/data/gpt_dataset.py gives them with --reset-attention-mask."""

    def __init__(self, corpus: ConversationCorpus, seq_length: int, seed: int, num_samples: int | None = None,
                 cache_dir: str | None = None, is_builder: bool = True, barrier=None):
        if seq_length < 1:
            raise ValueError(f"SFTDataset needs seq_length >= 1, got {seq_length}")
        self.corpus, self.seq_length, self.seed = corpus, seq_length, seed

        def build():
            kept, loss_tokens = kept_lengths(corpus, seq_length)
            offsets, items = pack(np.maximum(kept - 1, 0), seq_length, seed)
            return {"kept": kept, "loss_tokens": loss_tokens, "sample_offsets": offsets, "sample_items": items}

        description = {"class": "SFTDataset", **corpus.description(), "seq_length": seq_length, "seed": seed,
                       "open_samples": OPEN_SAMPLES}
        arrays = cached_arrays(cache_dir, "sft", description, ("kept", "loss_tokens", "sample_offsets", "sample_items"),
                               build, is_builder=is_builder, barrier=barrier)
        self.kept = arrays["kept"]
        self.sample_offsets, self.sample_items = arrays["sample_offsets"], arrays["sample_items"]
        self.num_packed = len(self.sample_offsets) - 1
        used = self.kept > 0
        self.stats = PackingStats(
            conversations=len(corpus), truncated=int((corpus.lengths > seq_length + 1).sum()),
            dropped=int((~used).sum()), samples=self.num_packed, seq_length=seq_length,
            positions=int((self.kept[used] - 1).sum()), loss_tokens=int(arrays["loss_tokens"][used].sum()))
        if self.num_packed == 0:
            raise DataError(f"{', '.join(corpus.prefixes)}: no conversation has an assistant token within "
                            f"--seq-length {seq_length} + 1 tokens; nothing to train on")
        self.num_samples = self.num_packed if num_samples is None else num_samples
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The packed samples of `epoch` in the order it visits them."""
        if epoch not in self._orders:
            self._orders[epoch] = np.random.RandomState([self.seed, epoch]).permutation(self.num_packed)
        return self._orders[epoch]

    def conversations(self, i: int) -> list[tuple[int, int]]:
        """(conversation id, kept tokens) of each conversation in sample i, in their order there."""
        epoch, j = divmod(int(i), self.num_packed)
        p = int(self.epoch_order(epoch)[j])
        ids = self.sample_items[self.sample_offsets[p]:self.sample_offsets[p + 1]]
        return [(int(c), int(self.kept[c])) for c in ids]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples)")
        s = self.seq_length
        tokens = np.zeros(s, dtype=np.int64)
        labels = np.zeros(s, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        document_ids = np.zeros(s, dtype=np.int64)
        at = 0
        convs = self.conversations(i)
        for doc, (c, kept) in enumerate(convs):
            ids, mask = self.corpus.get(c, kept)  # (kept,) each
            n = kept - 1  # positions it takes: inputs ids[:-1], labels ids[1:]
            tokens[at:at + n], labels[at:at + n] = ids[:-1], ids[1:]
            loss_mask[at:at + n] = mask[1:]
            position_ids[at:at + n] = np.arange(n)
            document_ids[at:at + n] = doc
            at += n
        # Padding: its own document (attends only to itself), positions from 0, no loss.
        position_ids[at:] = np.arange(s - at)
        document_ids[at:] = len(convs)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
                "document_ids": document_ids}
