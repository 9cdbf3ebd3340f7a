"""A thin wrapper around a Hugging Face `tokenizer.json`.

The trainer needs only a handful of facts from a tokenizer: its vocabulary size (to size the
embedding), the end-of-document id (to separate documents in the token stream) and a stable identity
(so a checkpoint can refuse a different tokenizer). Everything else stays in `tokenizers`.
"""

import hashlib
import os
from typing import Optional

from megatron_ds.data.errors import DataError

# Looked up in this order; DeepSeek's own names come first.
EOD_TOKENS = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<eos>")
BOS_TOKENS = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>")
PAD_TOKENS = ("<｜pad▁of▁sentence｜>", "<pad>", "<|pad|>", "[PAD]")


def pad_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """Round vocab_size up so each of tp_size embedding shards is a multiple of `multiple` rows.

    The extra rows are never produced by the tokenizer; they keep the vocab-parallel matmuls
    aligned and the shards equal (Megatron's --make-vocab-size-divisible-by).
    """
    if vocab_size < 1 or tp_size < 1 or multiple < 1:
        raise ValueError(f"pad_vocab_size needs positive sizes, got vocab_size={vocab_size} "
                         f"tp_size={tp_size} multiple={multiple}")
    step = multiple * tp_size
    return -(-vocab_size // step) * step


def _find_token(tok, candidates):
    for token in candidates:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


class Tokenizer:
    """A loaded tokenizer.json with the ids the trainer needs."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = path
        try:
            with open(path, "rb") as f:
                self._content = f.read()
            self._tok = HFTokenizer.from_str(self._content.decode("utf-8"))
        except Exception as e:  # OSError, UnicodeDecodeError, or the bare Exception tokenizers raises
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"tokenizer {path}: cannot load ({first_line}); "
                            f"pass a Hugging Face tokenizer.json") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = _find_token(self._tok, EOD_TOKENS)
        if self.eod is None:
            raise DataError(f"tokenizer {path}: no end-of-document token (looked for "
                            f"{', '.join(EOD_TOKENS)}); add one as a special token")
        self.bos = _find_token(self._tok, BOS_TOKENS)
        self.pad = _find_token(self._tok, PAD_TOKENS)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with no BOS/EOS added (documents get EOD from preprocessing)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self):
        """int64 array [vocab_size]: the UTF-8 bytes of text each token stands for; 0 for special
        tokens (EOD, BOS, ...), which stand for no text. The denominator of bits-per-byte.

        Byte-level BPE (DeepSeek's, and tools/train_tokenizer.py's) writes each byte of a token as
        one character of its string, so a token's length is its byte count, exact even for tokens
        that hold part of a multi-byte character. Other tokenizers: the UTF-8 length of the token
        decoded alone.
        """
        import json

        import numpy as np

        spec = json.loads(self._content)
        decoder = spec.get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [])} | {decoder.get("type")}
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i in added:
                out[i] = 0 if added[i].get("special") else len(added[i]["content"].encode("utf-8"))
            elif "ByteLevel" in kinds:
                out[i] = len(self._tok.id_to_token(i) or "")
            else:
                out[i] = len(self._tok.decode([i], skip_special_tokens=True).encode("utf-8"))
        return out

    def token_text(self, token_id: Optional[int]) -> Optional[str]:
        """The string of a token id (e.g. ``"</s>"`` for ``self.eod``); None for None."""
        return None if token_id is None else self._tok.id_to_token(token_id)

    def identity(self) -> str:
        """First 16 hex digits of the sha256 of the tokenizer.json bytes."""
        return hashlib.sha256(self._content).hexdigest()[:16]

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def build_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json file or a directory holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path}: no such file; pass a tokenizer.json or a directory "
                        f"holding one (tools/train_tokenizer.py makes one)")
    return Tokenizer(path)
