"""Rewrite a checkpoint for another TP x PP layout (or as one file), streaming one block at a time.

    python tools/checkpoint/reshard.py --load ckpt/ --save ckpt-tp4/ --target-tp 4 --target-pp 1
    python tools/checkpoint/reshard.py --load ckpt/ --save ckpt-one/ --unsharded

Any layout can load any checkpoint; resharding only lays the files out so that each rank of the
target layout reads one file. The output's ``latest`` names the same iteration as the input.

A --save that already holds a checkpoint is refused (one ``error:`` line, exit 2): write to a new
directory, or pass ``--force`` to add the iteration there. With ``--force`` an ``iter_N`` of the same
iteration is replaced whole (written as ``iter_N.tmp``, then renamed into place), and ``latest``
stays on a newer iteration it already names (so the next --load does not go back in time) unless
``--set-latest``. An unwritable --save (a file, /proc/...) is refused before anything is read.

A target layout the trainer would refuse (``--target-tp`` not dividing the heads, ``--target-pp`` above
the layer count, ...) is refused first, by the trainer's own rules (``config.check_model_layout``) in
this tool's flags: one ``error:`` line, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_ds.checkpoint.format import LATEST, CheckpointError  # noqa: E402
from megatron_ds.checkpoint.offline import reshard  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (with 'latest') or one iter_N directory")
    parser.add_argument("--save", required=True, help="output directory")
    parser.add_argument("--target-tp", type=int, default=1, help="tensor-parallel size of the output layout")
    parser.add_argument("--target-pp", type=int, default=1, help="pipeline-parallel size of the output layout")
    parser.add_argument("--unsharded", action="store_true", help="one file holding every tensor (TP 1 x PP 1)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the input files")
    parser.add_argument("--force", action="store_true",
                        help="write into a --save that already holds a checkpoint (replacing an iter_N of the "
                             "same iteration; 'latest' stays on a newer iteration)")
    parser.add_argument("--set-latest", action="store_true",
                        help="with --force: point 'latest' at the written checkpoint even when it names a newer one")
    args = parser.parse_args(argv)
    tp, pp = (1, 1) if args.unsharded else (args.target_tp, args.target_pp)
    try:
        if args.set_latest and not args.force:
            raise CheckpointError("--set-latest moves 'latest' of an existing checkpoint directory: add --force")
        out = reshard(args.load, args.save, tp, pp, verify=not args.no_verify, force=args.force,
                      set_latest=args.set_latest)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (TP {tp} x PP {pp})")
    print_latest_note(args.save, out)
    return 0


def print_latest_note(save: str, written: str) -> None:
    """Say so when 'latest' was left on a newer checkpoint than the one written."""
    with open(os.path.join(save, LATEST)) as f:
        latest = f.read().strip()
    if latest != os.path.basename(written):
        print(f"note: {os.path.join(save, LATEST)} still names {latest}, newer than {os.path.basename(written)}; "
              f"--load {save} resumes {latest} (pass --set-latest to point it at {os.path.basename(written)})")


if __name__ == "__main__":
    sys.exit(main())
