"""Binarize a jsonl corpus into Megatron's {prefix}_{key}_document.{bin,idx}.

    python tools/preprocess_data.py --input data/*.jsonl.gz --output-prefix data/corpus \
        --tokenizer-model tokenizer.json --append-eod --workers 8

The corpus is streamed: at most a bounded window of line chunks is in flight, so memory does not
grow with corpus size. Several input files are concatenated, in the order given, into one output.
"""

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time

try:
    import megatron_ds  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ds.data.corpus_files import expand_inputs, open_text
from megatron_ds.data.errors import DataError
from megatron_ds.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megatron_ds.data.tokenizer import build_tokenizer

CHUNK_LINES = 256
CHUNKS_IN_FLIGHT_PER_WORKER = 4


class BadLine(Exception):
    """A jsonl line that cannot be used; the message is the user-facing one-liner."""


_tokenizer = None  # one per process, set by _init_worker


def _init_worker(tokenizer_path):
    global _tokenizer
    _tokenizer = build_tokenizer(tokenizer_path)


def encode_chunk(path, first_line_no, lines, json_keys):
    """Tokenize a chunk of jsonl lines.

    Returns ({key: [token lists, one per document]}, None), or (None, message) for the first bad
    line, so a worker never raises across the pool.
    """
    texts = {key: [] for key in json_keys}
    for line_no, line in enumerate(lines, start=first_line_no):
        if not line.strip():
            continue  # blank lines, typically a trailing one, are not documents
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return None, f"{path}:{line_no}: invalid JSON ({e.msg}); fix or remove the line"
        for key in json_keys:
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, str):
                return None, (f"{path}:{line_no}: no string field {key!r}; "
                              f"pick the field with --json-keys")
            texts[key].append(value)
    return {key: _tokenizer.encode_batch(texts[key]) for key in json_keys}, None


def read_chunks(path):
    """(first line number, list of lines) chunks of one file, read lazily."""
    chunk, first, line_no = [], 1, 0
    try:
        with open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not chunk:
                    first = line_no
                chunk.append(line)
                if len(chunk) == CHUNK_LINES:
                    yield first, chunk
                    chunk = []
    except (UnicodeDecodeError, OSError, EOFError) as e:  # not UTF-8, corrupt or truncated .gz
        raise BadLine(f"{path}: unreadable after line {line_no} ({type(e).__name__}); "
                      f"inputs must be UTF-8 jsonl, optionally gzipped") from None
    if chunk:
        yield first, chunk


def encoded_chunks(files, json_keys, tokenizer_path, workers):
    """Encoded chunks in corpus order; with workers > 1 a bounded window runs in a Pool."""
    jobs = ((path, first, lines, json_keys) for path in files for first, lines in read_chunks(path))
    if workers <= 1:
        for job in jobs:
            yield encode_chunk(*job)
        return
    # Pool.imap would read ahead without bound (its feeder thread drains the generator), so keep
    # our own window of async results and collect them in submission order instead.
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding tokenizer threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        window = collections.deque()
        for job in jobs:
            window.append(pool.apply_async(encode_chunk, job))
            if len(window) >= workers * CHUNKS_IN_FLIGHT_PER_WORKER:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()


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
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers}: must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        files = expand_inputs(args.input)
        tokenizer = build_tokenizer(args.tokenizer_model)
    except (FileNotFoundError, DataError) as e:
        sys.exit(f"error: {e}")
    if args.workers == 1:
        _init_worker(tokenizer.path)  # encode in this process

    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    dtype = best_dtype(tokenizer.vocab_size)
    prefixes = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    builders = {k: IndexedDatasetBuilder(prefixes[k] + ".bin", dtype) for k in args.json_keys}
    counts = {k: collections.Counter() for k in args.json_keys}
    eod = [tokenizer.eod] if args.append_eod else []
    start = time.time()
    try:
        for encoded, error in encoded_chunks(files, args.json_keys, tokenizer.path, args.workers):
            if error:
                raise BadLine(error)
            for key, docs in encoded.items():
                for ids in docs:
                    ids = ids + eod
                    if not ids:
                        counts[key]["skipped"] += 1
                        continue
                    builders[key].add_document(ids)
                    counts[key]["docs"] += 1
                    counts[key]["tokens"] += len(ids)
        for key, builder in builders.items():
            builder.finalize(prefixes[key] + ".idx")
    except BadLine as e:
        for builder in builders.values():
            builder.abort()
        sys.exit(f"error: {e}")
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise

    seconds = time.time() - start
    for key in args.json_keys:
        c = counts[key]
        print(f"{prefixes[key]}.{{bin,idx}}: {c['docs']} documents, {c['tokens']} tokens "
              f"({dtype}), {c['skipped']} empty documents skipped, {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
