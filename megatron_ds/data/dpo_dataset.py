"""Preference pairs for DPO: a jsonl of {"prompt", "chosen", "rejected"} -> padded token rows.

One record per line. ``prompt`` is a string (one user message) or a list of chat messages
``[{"role", "content"}, ...]`` ending with a user turn; ``chosen`` and ``rejected`` are the two
replies, strings. Each side is rendered with the chat template (megatron_ds/data/chat.py,
``render_prompt_response``): the prompt's tokens, then the reply and its closing <eos>; the loss
mask is 1 on the reply's tokens only.

The whole file is tokenized when the run starts, on every rank (no cache: tens of thousands of
pairs take seconds, and the tokens stay in memory as small int32 arrays). A pair is one sample; it
becomes two rows of --seq-length tokens (chosen, rejected), right-padded, so the pipeline sees
fixed shapes. A sequence longer than --seq-length + 1 tokens loses its end (the reply's tail).

A record that cannot be a pair (not JSON, a missing key, identical replies, a bad message, a prompt
that leaves no room for a reply) raises a DataError naming file:line; with ``skip_bad`` it is left
out instead and counted in the load report.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_ds.data.chat import ConversationError, render_prompt_response
from megatron_ds.data.errors import DataError
from megatron_ds.data.sampler import collate

KEYS = ("prompt", "chosen", "rejected")


class BadPair(Exception):
    """One record is not a usable pair: (short reason for counting, full message)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class PreferencePairs:
    """Tokenized pairs: ``chosen[i]`` / ``rejected[i]`` are the token ids of prompt + reply (at most
    seq_length + 1), ``*_mask[i]`` 1 on the reply's ids. ``ref_logps`` [n, 2] (chosen, rejected) once
    the reference model's log-probs were precomputed."""

    path: str
    seq_length: int
    pad_id: int
    chosen: list = field(default_factory=list)
    chosen_mask: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    rejected_mask: list = field(default_factory=list)
    lines: list = field(default_factory=list)
    """The 1-based line of the file each pair came from."""
    ref_logps: Optional[np.ndarray] = None
    skipped: Counter = field(default_factory=Counter)
    """Reason -> number of records left out (skip_bad)."""
    first_skipped: Optional[str] = None
    truncated: int = 0
    """Pairs with at least one side cut to seq_length + 1 tokens."""

    def __len__(self) -> int:
        return len(self.chosen)

    def _row(self, ids: np.ndarray, mask: np.ndarray) -> dict:
        s = self.seq_length
        n = len(ids) - 1  # tokens predict their successor: n input positions
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        tokens[:n], labels[:n], loss_mask[:n] = ids[:-1], ids[1:], mask[1:]
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                "position_ids": np.arange(s, dtype=np.int64)}

    def item(self, i: int) -> dict:
        """Pair ``i`` as a dict of arrays with a leading axis of 2 (chosen, rejected): tokens, labels,
        position_ids (int64), loss_mask (float32), each (2, seq_length); ref_logps (2,) when precomputed.
        Padding has loss_mask 0 and, being after the sequence, is never attended to by it (causal)."""
        c, r = self._row(self.chosen[i], self.chosen_mask[i]), self._row(self.rejected[i], self.rejected_mask[i])
        out = {k: np.stack([c[k], r[k]]) for k in c}
        if self.ref_logps is not None:
            out["ref_logps"] = self.ref_logps[i]
        return out

    def report(self) -> str:
        """One line on what was loaded."""
        line = f"DPO data {self.path}: {len(self)} pairs"
        if self.truncated:
            line += f", {self.truncated} cut to --seq-length {self.seq_length}"
        if self.skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in self.skipped.most_common())
            line += f"; skipped {sum(self.skipped.values())} bad record(s) ({kinds}; first: {self.first_skipped})"
        return line


def _tokenize(record, tokenizer, template: str, seq_length: int):
    """(chosen ids, chosen mask, rejected ids, rejected mask, truncated) of one record; raises BadPair."""
    if not isinstance(record, dict):
        raise BadPair("not an object", "the record is not a JSON object with \"prompt\", \"chosen\", \"rejected\"")
    missing = [k for k in KEYS if k not in record]
    if missing:
        raise BadPair("missing key", f"missing key {', '.join(repr(k) for k in missing)} "
                      f"(a pair is {{\"prompt\", \"chosen\", \"rejected\"}})")
    for k in ("chosen", "rejected"):
        if not isinstance(record[k], str):
            raise BadPair("not a string", f"{k!r} must be a string, got {type(record[k]).__name__}")
    if record["chosen"].strip() == record["rejected"].strip():
        raise BadPair("identical replies", "chosen and rejected are identical; a preference pair needs two "
                      "different replies")
    try:
        sides = [render_prompt_response(record["prompt"], record[k], tokenizer, template) for k in ("chosen", "rejected")]
    except ConversationError as e:
        raise BadPair("bad messages", str(e)) from None
    out, truncated = [], False
    for ids, mask in sides:
        first_reply = mask.index(1)
        if first_reply >= seq_length:
            raise BadPair("prompt too long", f"the prompt is {first_reply} tokens, which leaves no room for a reply "
                          f"in --seq-length {seq_length}")
        if len(ids) > seq_length + 1:
            ids, mask, truncated = ids[:seq_length + 1], mask[:seq_length + 1], True
        out += [np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int8)]
    if np.array_equal(out[0], out[2]):
        raise BadPair("identical replies", f"chosen and rejected are identical in their first --seq-length "
                      f"{seq_length} tokens")
    return (*out, truncated)


def load_preference_pairs(path: str, tokenizer, seq_length: int, template: str = "deepseek",
                          skip_bad: bool = False, flag: str = "--dpo-data") -> PreferencePairs:
    """Read and tokenize every pair of the jsonl at ``path`` (see the module docstring)."""
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file; pass a jsonl of {{\"prompt\", \"chosen\", \"rejected\"}} records")
    pad = tokenizer.pad if getattr(tokenizer, "pad", None) is not None else tokenizer.eod
    pairs = PreferencePairs(path=path, seq_length=seq_length, pad_id=pad)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadPair("not JSON", f"not valid JSON ({e.msg} at column {e.colno})") from None
                c, cm, r, rm, truncated = _tokenize(record, tokenizer, template, seq_length)
            except BadPair as e:
                where = f"{path}:{lineno}: {e}"
                if not skip_bad:
                    raise DataError(f"{where} (or pass --dpo-skip-bad-pairs to leave such records out)") from None
                pairs.skipped[e.kind] += 1
                pairs.first_skipped = pairs.first_skipped or where
                continue
            pairs.chosen.append(c)
            pairs.chosen_mask.append(cm)
            pairs.rejected.append(r)
            pairs.rejected_mask.append(rm)
            pairs.lines.append(lineno)
            pairs.truncated += int(truncated)
    if not len(pairs):
        raise DataError(f"{flag} {path}: no usable preference pairs" +
                        (f" ({sum(pairs.skipped.values())} bad record(s) skipped)" if pairs.skipped else ""))
    return pairs


class DPODataset:
    """``num_samples`` samples drawn from the pairs, epoch after epoch, each epoch in its own seeded
    order; sample i is pair ``order(i // n)[i % n]`` (see PreferencePairs.item for its arrays)."""

    def __init__(self, pairs: PreferencePairs, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError(f"DPODataset needs num_samples >= 1, got {num_samples}")
        self.pairs, self.num_samples, self.seed = pairs, num_samples, seed
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def pair_id(self, i: int) -> int:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside [0, {self.num_samples})")
        n = len(self.pairs)
        epoch = i // n
        if epoch not in self._orders:
            self._orders[epoch] = np.random.RandomState((self.seed + epoch) % 2**32).permutation(n)
        return int(self._orders[epoch][i % n])

    def __getitem__(self, i: int) -> dict:
        return self.pairs.item(self.pair_id(i))


def collate_pairs(samples: list[dict]) -> dict:
    """b pairs -> a micro-batch of 2b rows: the b chosen rows first, then the b rejected ones
    (pair i is rows i and b + i); ``ref_logps`` likewise [2b]."""
    batch = collate(samples)  # each (b, 2, ...)
    return {k: v.transpose(0, 1).reshape(-1, *v.shape[2:]) for k, v in batch.items()}
