"""Convert between our checkpoints and Hugging Face Llama checkpoints (the form DeepSeek LLM ships in).

    python tools/checkpoint/convert_hf.py export --load ckpt/ --save hf-model/
    python tools/checkpoint/convert_hf.py import --hf hf-model/ --save ckpt/ --target-tp 2 --target-pp 2

Export writes config.json, model-0000i-of-0000n.safetensors with model.safetensors.index.json,
and, when the checkpoint records a tokenizer path, the tokenizer files with tokenizer_config.json,
special_tokens_map.json and generation_config.json; ``transformers`` loads the result as
LlamaForCausalLM, ``AutoTokenizer`` with our BOS / EOD (as eos) / PAD tokens, and ``generate``
stops at EOD. Import reads that form; the result starts at iteration 0.

Neither overwrites by accident: export refuses a --save that already holds a Hugging Face model
(config.json, model*.safetensors, an index), import one that already holds a checkpoint; one
``error:`` line, exit 2, nothing written. With ``--force`` export replaces the model: the new files
are written into --save/.export.tmp and moved into place once complete, and old shards the new
index does not name are removed (other files, e.g. a README, stay). Import with ``--force`` adds
iter_0000000 (replacing one there) and leaves ``latest`` on a newer iteration unless ``--set-latest``.

A target layout the trainer would refuse (``--target-tp`` not dividing the heads, ``--target-pp`` above
the layer count, ...) is refused first, by the trainer's own rules (``config.check_model_layout``) in
this tool's flags: one ``error:`` line, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_ds.checkpoint.format import CheckpointError  # noqa: E402
from megatron_ds.checkpoint.hf import export_hf, import_hf  # noqa: E402
from tools.checkpoint.reshard import print_latest_note  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="our checkpoint -> Hugging Face Llama")
    exp.add_argument("--load", required=True, help="our checkpoint directory (with 'latest') or an iter_N directory")
    exp.add_argument("--save", required=True, help="output Hugging Face model directory")
    exp.add_argument("--max-shard-size-mb", type=float, default=2048, help="size limit of each safetensors file")
    exp.add_argument("--force", action="store_true",
                     help="replace a Hugging Face model already in --save (its stale shards are removed)")
    imp = sub.add_parser("import", help="Hugging Face Llama -> our checkpoint")
    imp.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + *.safetensors)")
    imp.add_argument("--save", required=True, help="output checkpoint directory")
    imp.add_argument("--target-tp", type=int, default=1, help="tensor-parallel size the files are laid out for")
    imp.add_argument("--target-pp", type=int, default=1, help="pipeline-parallel size the files are laid out for")
    imp.add_argument("--tokenizer-model", default=None, help="tokenizer.json to record (default: the one in --hf)")
    imp.add_argument("--force", action="store_true",
                     help="write into a --save that already holds a checkpoint (replacing its iter_0000000; "
                          "'latest' stays on a newer iteration)")
    imp.add_argument("--set-latest", action="store_true",
                     help="with --force: point 'latest' at the imported checkpoint even when it names a newer one")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            files = export_hf(args.load, args.save, max_shard_bytes=int(args.max_shard_size_mb * (1 << 20)),
                              force=args.force)
            print(f"wrote {len(files)} files to {args.save}")
        else:
            if args.set_latest and not args.force:
                raise CheckpointError("--set-latest moves 'latest' of an existing checkpoint directory: add --force")
            out = import_hf(args.hf, args.save, args.target_tp, args.target_pp, tokenizer_path=args.tokenizer_model,
                            force=args.force, set_latest=args.set_latest)
            print(f"wrote {out} (TP {args.target_tp} x PP {args.target_pp})")
            print_latest_note(args.save, out)
    except (CheckpointError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
