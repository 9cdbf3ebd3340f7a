"""Merge several binarized datasets (.bin/.idx prefixes) into one, in the order given.

    python tools/merge_datasets.py --input data/part-*_text_document --output-prefix data/all_text_document

Inputs may be prefixes or globs matching .idx files (or prefixes); all must share one token dtype.
The .bin files are streamed, so memory stays bounded. Documents keep their boundaries, so
sentence-split inputs stay sentence-split. Writes {output-prefix}.bin and .idx.
"""

import argparse
import glob
import os
import sys

try:
    import megatron_ds  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ds.data.errors import DataError
from megatron_ds.errors import ConfigError
from megatron_ds.paths import check_output_prefix
from megatron_ds.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def expand_prefixes(patterns):
    """Prefixes named by patterns: a prefix, or a glob of prefixes or of .idx/.bin files, sorted."""
    prefixes = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted({m[:-4] if m.endswith((".idx", ".bin")) else m
                              for m in glob.glob(pattern) + glob.glob(pattern + ".idx")})
            matches = [m for m in matches if os.path.isfile(m + ".idx")]
        else:
            p = pattern[:-4] if pattern.endswith((".idx", ".bin")) else pattern
            matches = [p]
        if not matches:
            raise DataError(f"--input {pattern}: matches no .idx file")
        prefixes.extend(matches)
    return prefixes


def merge(prefixes, output_prefix):
    """Concatenate the datasets; returns (sequences, documents) written."""
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise DataError(f"--output-prefix {output_prefix} is also an input; pick a new prefix")
    first = IndexedDataset(prefixes[0])  # validates, and gives the dtype
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(output_prefix + ".bin", first.dtype)
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
        num_seqs = len(builder)
        num_docs = builder.num_documents
        builder.finalize(output_prefix + ".idx")
    except BaseException:
        builder.abort()
        raise
    return num_seqs, num_docs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="dataset prefixes (without .bin/.idx) or globs, merged in this order")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}.bin and {prefix}.idx")
    args = p.parse_args(argv)
    try:
        prefixes = expand_prefixes(args.input)
        check_output_prefix(args.output_prefix, "--output-prefix")
        num_seqs, num_docs = merge(prefixes, args.output_prefix)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output_prefix}.{{bin,idx}}: {len(prefixes)} datasets, {num_docs} documents, "
          f"{num_seqs} sequences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
