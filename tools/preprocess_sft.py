"""Binarize SFT conversations into {prefix}_tokens.{bin,idx} + {prefix}_loss_mask.{bin,idx}.

    python tools/preprocess_sft.py --input sft/*.jsonl --output-prefix data/sft \
        --tokenizer-model tokenizer.json [--chat-template deepseek] [--skip-bad-conversations]

Each input line is {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} or
{"prompt": str | messages, "response": str}. It is rendered with the chat template
(megatron_ds/data/chat.py: DeepSeek's "User: ...\\n\\nAssistant: ...<eos>" by default) into token ids
and a loss mask (1 on assistant replies and the token closing each), written as two Megatron
indexed datasets with one document per conversation. Conversations are kept whole: truncation
to the training sequence length happens when packing (megatron_ds/data/sft_dataset.py).

A bad line (not UTF-8, not JSON, no conversation in it, an unknown role, no assistant turn, empty
content, turns out of order) stops the run with exit code 2 and one line naming file:line and the
reason, leaving no output; with --skip-bad-conversations it is skipped, counted by reason in the
summary and listed in {prefix}_bad_conversations.txt. Outputs are written under temporary names
and renamed when complete.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

try:
    import megatron_ds  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from megatron_ds.data.binarize import InputError, read_blocks
from megatron_ds.data.chat import TEMPLATES, ConversationError, get_template, messages_from_record, render
from megatron_ds.data.corpus_files import expand_inputs
from megatron_ds.data.errors import DataError
from megatron_ds.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megatron_ds.data.sft_dataset import loss_mask_prefix, tokens_prefix
from megatron_ds.data.tokenizer import build_tokenizer

BAD_SHOWN = 10  # skipped lines echoed on stderr; all of them go to the _bad_conversations.txt file


class BadLine(Exception):
    """One unusable line: the message is "file:line: reason"."""


def parse_line(path: str, line_no: int, raw: bytes) -> list[dict]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"{path}:{line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
    try:
        return messages_from_record(record)
    except ConversationError as e:
        raise BadLine(f"{path}:{line_no}: {e}") from None


def reason_kind(message: str) -> str:
    """A short category of a bad line's reason, for the counts in the summary."""
    reason = message.split(": ", 1)[1] if ": " in message else message
    return re.sub(r"message \d+", "message N", re.sub(r"'[^']*'|\(.*\)", "", reason)).strip().rstrip(",;")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/preprocess_sft.py", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="jsonl files or globs (optionally .gz), one conversation a line")
    p.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_tokens.{bin,idx} and {prefix}_loss_mask.{bin,idx}; pass the prefix as --data-path")
    p.add_argument("--tokenizer-model", required=True, help="tokenizer.json or its directory")
    p.add_argument("--chat-template", default="deepseek", help=f"how turns are laid out: {', '.join(TEMPLATES)}")
    p.add_argument("--skip-bad-conversations", action="store_true",
                   help="skip (count, report and list) unusable lines instead of stopping at the first one")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        files = expand_inputs(args.input)
        template = get_template(args.chat_template)
        tokenizer = build_tokenizer(args.tokenizer_model)
    except (FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    tok_prefix, mask_prefix = tokens_prefix(args.output_prefix), loss_mask_prefix(args.output_prefix)
    builders = [IndexedDatasetBuilder(tok_prefix + ".bin", best_dtype(tokenizer.vocab_size)),
                IndexedDatasetBuilder(mask_prefix + ".bin", np.uint8)]
    bad_path = f"{args.output_prefix}_bad_conversations.txt"
    bad_tmp = bad_path + ".tmp"
    bad_file = None
    counts, kinds = collections.Counter(), collections.Counter()
    start = time.monotonic()
    try:
        for path in files:
            for first, block, _ in read_blocks(path):
                lines = block.split(b"\n")
                if lines and not lines[-1]:
                    lines.pop()
                for line_no, raw in enumerate(lines, start=first):
                    if not raw.strip():
                        continue  # blank lines are not conversations
                    try:
                        messages = parse_line(path, line_no, raw)
                        try:
                            ids, mask = render(messages, tokenizer, template)
                        except ConversationError as e:
                            raise BadLine(f"{path}:{line_no}: {e}") from None
                    except BadLine as e:
                        if not args.skip_bad_conversations:
                            raise InputError(f"{e} (or pass --skip-bad-conversations)") from None
                        if counts["bad"] < BAD_SHOWN:
                            print(f"warning: skipped {e}", file=sys.stderr)
                        if bad_file is None:
                            bad_file = open(bad_tmp, "w", encoding="utf-8")
                        bad_file.write(f"{e}\n")
                        counts["bad"] += 1
                        kinds[reason_kind(str(e))] += 1
                        continue
                    builders[0].add_document(np.asarray(ids, dtype=np.int64))
                    builders[1].add_document(np.asarray(mask, dtype=np.uint8))
                    counts["conversations"] += 1
                    counts["tokens"] += len(ids)
                    counts["loss_tokens"] += sum(mask)
        if counts["conversations"] == 0:
            raise InputError(f"--input {' '.join(args.input)}: no usable conversation"
                             f"{' (all skipped)' if counts['bad'] else ''}")
        builders[0].finalize(tok_prefix + ".idx")
        builders[1].finalize(mask_prefix + ".idx")
    except (InputError, DataError) as e:
        for b in builders:
            b.abort()
        if bad_file is not None:
            bad_file.close()
            os.remove(bad_tmp)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        for b in builders:
            b.abort()
        raise
    if bad_file is not None:
        bad_file.close()
        os.replace(bad_tmp, bad_path)
    elif os.path.exists(bad_path):
        os.remove(bad_path)  # a previous run's list would describe other outputs
    seconds = max(time.monotonic() - start, 1e-9)
    bad = ""
    if counts["bad"]:
        by_kind = "; ".join(f"{n} {k}" for k, n in kinds.most_common())
        bad = f", {counts['bad']} bad conversations skipped ({by_kind}; listed in {bad_path})"
    print(f"{args.output_prefix}_{{tokens,loss_mask}}.{{bin,idx}}: {counts['conversations']} conversations, "
          f"{counts['tokens']} tokens, {counts['loss_tokens']} loss tokens (template {template.name}){bad}"
          f"{'' if bad else ', 0 bad conversations'}, {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
