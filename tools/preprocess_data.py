"""Binarize a jsonl corpus into Megatron's {prefix}_{key}_document.{bin,idx}.

    python tools/preprocess_data.py --input data/*.jsonl.gz --output-prefix data/corpus \
        --tokenizer-model tokenizer.json --append-eod --workers 8

The corpus is streamed: the main process reads blocks of whole lines and writes tokens, --workers
processes decode, parse and tokenize, and at most a fixed window of blocks is in flight, so memory
does not grow with corpus size. Several input files are concatenated, in the order given (globs
sorted), into one output. Progress (documents/s, MB/s, ETA) goes to stderr; the summary to stdout.

A bad line (not UTF-8, invalid JSON, a missing --json-keys field) stops the run with its
file:line, leaving no output; with --skip-bad-lines it is skipped, reported (the first ones on
stderr, all of them in {prefix}_bad_lines.txt) and counted in the summary. Bad input is one
``error: ...`` line on stderr and exit code 2.
"""

import argparse
import collections
import os
import sys
import time

try:
    import megatron_ds  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ds.data.binarize import BLOCK_BYTES, BlockEncoder, InputError, Progress, SkippedLines, map_blocks
from megatron_ds.data.corpus_files import expand_inputs
from megatron_ds.data.errors import DataError
from megatron_ds.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megatron_ds.data.tokenizer import build_tokenizer
from megatron_ds.errors import ConfigError
from megatron_ds.paths import check_output_prefix

BAD_LINES_SHOWN = 10


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="jsonl files or globs (.jsonl, .json, optionally .gz), one JSON object a line")
    p.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx for each --json-keys key")
    p.add_argument("--tokenizer-model", required=True, help="tokenizer.json or its directory")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="fields to binarize")
    p.add_argument("--append-eod", action="store_true",
                   help="end every document with the tokenizer's EOD token")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (one core each)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and report and count) lines that are not UTF-8, not JSON or lack a "
                        "--json-keys field, instead of stopping at the first one")
    p.add_argument("--progress-interval", type=float, default=None,
                   help="seconds between progress lines on stderr (default 0.5 on a terminal, "
                        "30 in a log)")
    p.add_argument("--block-bytes", type=int, default=BLOCK_BYTES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: must be >= 1")
    return args


def main(argv=None) -> int:
    """Exit code 0, or 2 after one ``error: ...`` line on stderr (bad input; no output left behind)."""
    try:
        return binarize(parse_args(argv))
    except (InputError, DataError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def binarize(args) -> int:
    files = expand_inputs(args.input)
    tokenizer = build_tokenizer(args.tokenizer_model)
    check_output_prefix(args.output_prefix, "--output-prefix")

    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    dtype = best_dtype(tokenizer.vocab_size)
    prefixes = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    builders = {k: IndexedDatasetBuilder(prefixes[k] + ".bin", dtype) for k in args.json_keys}
    counts = collections.Counter()
    bad_path = f"{args.output_prefix}_bad_lines.txt"
    skipped = SkippedLines(bad_path)
    progress = Progress(sum(os.path.getsize(f) for f in files), args.progress_interval)
    encoder_args = (tokenizer.path, args.json_keys, args.append_eod, dtype, args.skip_bad_lines)
    try:
        for block, disk_done in map_blocks(files, BlockEncoder, encoder_args, args.workers, args.block_bytes):
            for key, builder in builders.items():
                builder.add_documents(block.tokens[key], block.lengths[key])
            first_key = args.json_keys[0]
            counts["docs"] += len(block.lengths[first_key])
            counts["tokens"] += sum(len(t) for t in block.tokens.values())
            counts["empty"] += block.empty
            for line in block.bad:
                if counts["bad"] < BAD_LINES_SHOWN:
                    print(f"warning: skipped {line}", file=sys.stderr)
                skipped.write(line)
                counts["bad"] += 1
            progress.update(len(block.lengths[first_key]), block.num_bytes, disk_done)
        progress.close()
        for key, builder in builders.items():
            builder.finalize(prefixes[key] + ".idx")
    except BaseException:
        for builder in builders.values():
            builder.abort()
        skipped.abort()
        raise
    skipped.publish()

    seconds = max(time.monotonic() - progress.start, 1e-9)
    bad = (f", {counts['bad']} bad lines skipped (listed in {bad_path})" if counts["bad"]
           else ", 0 bad lines")
    keys = args.json_keys[0] if len(args.json_keys) == 1 else "{" + ",".join(args.json_keys) + "}"
    print(f"{args.output_prefix}_{keys}_document.{{bin,idx}}: "
          f"{counts['docs']} documents, {counts['tokens']} tokens ({dtype}), "
          f"{counts['empty']} empty documents skipped{bad}, {seconds:.1f}s, "
          f"{progress.bytes / seconds / 1e6:.1f} MB/s, {counts['tokens'] / seconds:,.0f} tokens/s")
    return 0

if __name__ == "__main__":
    sys.exit(main())
