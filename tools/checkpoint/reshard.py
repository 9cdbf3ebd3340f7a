"""Rewrite a checkpoint for another TP x PP layout (or as one file), streaming one block at a time.

    python tools/checkpoint/reshard.py --load ckpt/ --save ckpt-tp4/ --target-tp 4 --target-pp 1
    python tools/checkpoint/reshard.py --load ckpt/ --save ckpt-one/ --unsharded

Any layout can load any checkpoint; resharding only lays the files out so that each rank of the
target layout reads one file. The output's ``latest`` names the same iteration as the input.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_ds.checkpoint.format import CheckpointError  # noqa: E402
from megatron_ds.checkpoint.offline import reshard  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (with 'latest') or one iter_N directory")
    parser.add_argument("--save", required=True, help="output directory")
    parser.add_argument("--target-tp", type=int, default=1, help="tensor-parallel size of the output layout")
    parser.add_argument("--target-pp", type=int, default=1, help="pipeline-parallel size of the output layout")
    parser.add_argument("--unsharded", action="store_true", help="one file holding every tensor (TP 1 x PP 1)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the input files")
    args = parser.parse_args(argv)
    tp, pp = (1, 1) if args.unsharded else (args.target_tp, args.target_pp)
    try:
        if tp < 1 or pp < 1:
            raise CheckpointError("--target-tp and --target-pp must be >= 1")
        out = reshard(args.load, args.save, tp, pp, verify=not args.no_verify)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (TP {tp} x PP {pp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
