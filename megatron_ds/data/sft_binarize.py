"""The per-block work of tools/preprocess_sft.py, importable by its worker processes.

A block of jsonl lines (``binarize.read_blocks``) becomes the flat token and loss-mask arrays of
its conversations plus their lengths, so what crosses processes is a few buffers per block; the
main process appends them to the two builders in corpus order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from megatron_ds.data.chat import ConversationError, get_template, messages_from_record, render


class BadLine(Exception):
    """One unusable line: the message is "file:line: reason"."""


@dataclass
class SftBlock:
    """What a worker returns for one block of lines."""

    tokens: np.ndarray  # int64, the block's conversations back to back
    loss_mask: np.ndarray  # uint8, aligned with tokens: 1 on assistant replies and their closing token
    lengths: np.ndarray  # int64, one per conversation
    bad: list = field(default_factory=list)  # "file:line: reason" per skipped line, in order
    num_bytes: int = 0  # uncompressed bytes of the block


def parse_line(path: str, line_no: int, raw: bytes) -> list[dict]:
    """The messages of one jsonl line; raises BadLine naming file:line and the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"{path}:{line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
    try:
        return messages_from_record(record)
    except ConversationError as e:
        raise BadLine(f"{path}:{line_no}: {e}") from None


class SftBlockEncoder:
    """Renders blocks of conversation lines with a chat template; one per process
    (``binarize.map_blocks`` runs it)."""

    user_errors = (BadLine,)

    def __init__(self, tokenizer_path: str, template_name: str, skip_bad: bool):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers N is N cores
        from megatron_ds.data.tokenizer import build_tokenizer

        self.tokenizer = build_tokenizer(tokenizer_path)
        self.template = get_template(template_name)
        self.skip_bad = skip_bad

    def encode(self, path: str, first_line_no: int, block: bytes) -> SftBlock:
        """Raises BadLine at the first bad line unless skip_bad, which records it instead."""
        lines = block.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()  # the block ends with a newline
        ids_all, mask_all, lengths, bad = [], [], [], []
        for line_no, raw in enumerate(lines, start=first_line_no):
            if not raw.strip():
                continue  # blank lines are not conversations
            try:
                messages = parse_line(path, line_no, raw)
                try:
                    ids, mask = render(messages, self.tokenizer, self.template)
                except ConversationError as e:
                    raise BadLine(f"{path}:{line_no}: {e}") from None
            except BadLine as e:
                if not self.skip_bad:
                    raise BadLine(f"{e} (or pass --skip-bad-conversations)") from None
                bad.append(str(e))
                continue
            ids_all.extend(ids)
            mask_all.extend(mask)
            lengths.append(len(ids))
        return SftBlock(np.asarray(ids_all, dtype=np.int64), np.asarray(mask_all, dtype=np.uint8),
                        np.asarray(lengths, dtype=np.int64), bad, len(block))

