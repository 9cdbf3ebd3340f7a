"""Binarize SFT conversations into {prefix}_tokens.{bin,idx} + {prefix}_loss_mask.{bin,idx}.

    python tools/preprocess_sft.py --input sft/*.jsonl --output-prefix data/sft \
        --tokenizer-model tokenizer.json [--chat-template deepseek] [--skip-bad-conversations] [--workers 8]

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
and renamed when complete. As in tools/preprocess_data.py, the input is streamed in blocks of
whole lines that --workers processes render, with a bounded number of blocks in flight; the
output does not depend on --workers.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

try:
    import megatron_ds  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from megatron_ds.data.binarize import BLOCK_BYTES, InputError, Progress, SkippedLines, map_blocks
from megatron_ds.data.chat import TEMPLATES, get_template
from megatron_ds.data.corpus_files import expand_inputs
from megatron_ds.data.errors import DataError
from megatron_ds.errors import ConfigError
from megatron_ds.paths import check_output_prefix
from megatron_ds.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megatron_ds.data.sft_binarize import SftBlockEncoder
from megatron_ds.data.sft_dataset import loss_mask_prefix, tokens_prefix
from megatron_ds.data.tokenizer import build_tokenizer

BAD_SHOWN = 10  # skipped lines echoed on stderr; all of them go to the _bad_conversations.txt file


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
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (one core each)")
    p.add_argument("--block-bytes", type=int, default=BLOCK_BYTES, help="bytes of whole lines per worker job")
    p.add_argument("--progress-interval", type=float, default=None,
                   help="seconds between progress lines (default: 2 on a terminal, 30 in a log)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers}: must be >= 1")
    if args.block_bytes < 1:
        p.error(f"--block-bytes {args.block_bytes}: must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        files = expand_inputs(args.input)
        template = get_template(args.chat_template)
        tokenizer = build_tokenizer(args.tokenizer_model)
        check_output_prefix(args.output_prefix, "--output-prefix")
    except (FileNotFoundError, DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    tok_prefix, mask_prefix = tokens_prefix(args.output_prefix), loss_mask_prefix(args.output_prefix)
    builders = [IndexedDatasetBuilder(tok_prefix + ".bin", best_dtype(tokenizer.vocab_size)),
                IndexedDatasetBuilder(mask_prefix + ".bin", np.uint8)]
    bad_path = f"{args.output_prefix}_bad_conversations.txt"
    skipped = SkippedLines(bad_path)
    counts, kinds = collections.Counter(), collections.Counter()
    progress = Progress(sum(os.path.getsize(f) for f in files), args.progress_interval)
    worker_args = (tokenizer.path, template.name, args.skip_bad_conversations)
    try:
        for block, disk_done in map_blocks(files, SftBlockEncoder, worker_args, args.workers, args.block_bytes):
            for line in block.bad:
                if counts["bad"] < BAD_SHOWN:
                    print(f"warning: skipped {line}", file=sys.stderr)
                skipped.write(line)
                counts["bad"] += 1
                kinds[reason_kind(line)] += 1
            builders[0].add_documents(block.tokens, block.lengths)
            builders[1].add_documents(block.loss_mask, block.lengths)
            counts["conversations"] += len(block.lengths)
            counts["tokens"] += len(block.tokens)
            counts["loss_tokens"] += int(block.loss_mask.sum())
            progress.update(len(block.lengths), block.num_bytes, disk_done)
        progress.close()
        if counts["conversations"] == 0:
            raise InputError(f"--input {' '.join(args.input)}: no usable conversation"
                             f"{' (all skipped)' if counts['bad'] else ''}")
        builders[0].finalize(tok_prefix + ".idx")
        builders[1].finalize(mask_prefix + ".idx")
    except (InputError, DataError) as e:
        for b in builders:
            b.abort()
        skipped.abort()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        for b in builders:
            b.abort()
        skipped.abort()
        raise
    skipped.publish()
    seconds = max(time.monotonic() - progress.start, 1e-9)
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
