"""Generate text from a checkpoint at any TP x PP layout, with a KV cache.

    python tools/generate.py --load ckpt/ --tokenizer-model tokenizer.json --prompt "def main(" --max-new-tokens 32
    torchrun --nproc-per-node 4 tools/generate.py --load ckpt/ --tokenizer-model tokenizer.json \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --prompt "Hello" --temperature 0.8 --top-p 0.9

The checkpoint may come from any layout; the architecture is read from its metadata (``--model``
and pretrain's architecture flags, e.g. ``--num-layers``, serve only a checkpoint that records
none). ``--temperature 0`` (the default) is greedy. Each prompt is generated on its own (prompts
of different lengths need no padding). Rank 0 prints the continuation of a single prompt alone; with
several, each as a line ``===== i/n =====`` followed by the prompt and its continuation; then a
throughput line on stderr. Bad input is one line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_ds.checkpoint.format import CheckpointError  # noqa: E402
from megatron_ds.cli import run_command  # noqa: E402
from megatron_ds.config import ConfigError, ModelConfig, config_from_args  # noqa: E402
from megatron_ds.data.errors import DataError  # noqa: E402
from megatron_ds.inference import SamplingParams  # noqa: E402
from megatron_ds.parallel.topology import TopologyError  # noqa: E402

SEPARATOR = "====="
"""With several prompts, each output is a line ``===== i/n =====`` then the prompt and its continuation."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/generate.py", description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint directory (with 'latest') or an iter_N directory")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.json (default: the one the checkpoint records, if it still exists)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for several prompts")
    p.add_argument("--prompt-file", default=None, help="a file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (at most)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; otherwise sample at this temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set holding >= p (1: all)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the sampling generator (the same on every rank)")
    p.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS token to each prompt")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sentence token")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="re-run the whole sequence every step (slow; a reference)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="run in bf16 (default: the dtype the checkpoint stores)")
    p.add_argument("--no-fused-kernels", action="store_true", help="use the pure-PyTorch reference kernels")
    p.epilog = ("For a checkpoint that records no model config: --model PRESET and pretrain's architecture "
                "flags (--num-layers, --hidden-size, --num-attention-heads, ...).")
    return p


@dataclass
class ArchitectureFlags:
    """The model section of pretrain's flags alone (--model, --num-layers, ...)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str = "tiny"


def flag_model_config(argv: list[str]) -> Optional[ModelConfig]:
    """The architecture given by flags (preset, then single flags), or None when none were given."""
    if not argv:
        return None
    return config_from_args(argv, ArchitectureFlags, "tools/generate.py").model


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise ConfigError(f"--prompt-file {args.prompt_file}: no such file")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ConfigError("give at least one --prompt (or --prompt-file)")
    return prompts


def check_inputs(args) -> str:
    """Everything checkable before a process group exists; returns the tokenizer path."""
    if not os.path.exists(args.load):
        raise CheckpointError(f"--load {args.load}: no such checkpoint directory")
    from megatron_ds.checkpoint.format import read_metadata, resolve

    meta = read_metadata(resolve(args.load))  # raises CheckpointError naming the file
    tok = args.tokenizer_model
    if tok is None:
        tok = (meta.get("tokenizer") or {}).get("path")
        if not tok or not os.path.exists(tok):
            raise DataError(f"--tokenizer-model is required: the checkpoint {args.load} records no tokenizer "
                            f"that still exists{f' ({tok})' if tok else ''}")
    elif not os.path.exists(tok):
        raise DataError(f"--tokenizer-model {tok}: no such file")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be >= 0")
    from megatron_ds.checkpoint.load import CheckpointReader
    from megatron_ds.inference.loading import check_layout, checkpoint_model_config

    config = checkpoint_model_config(CheckpointReader(args.load, verify=False)) or flag_model_config(args.arch_flags)
    if config is None:
        raise ConfigError(f"--load {args.load}: the checkpoint records no model config; pass --model and the "
                          "architecture flags it was trained with")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    check_layout(config, tp, pp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise TopologyError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} needs "
                            f"exactly {tp * pp} processes (torchrun --nproc-per-node {tp * pp}); {world} running")
    return tok


def run(args, tok_path: str) -> None:
    from megatron_ds.data.tokenizer import build_tokenizer
    from megatron_ds.inference import generate
    from megatron_ds.inference.loading import load_inference_model
    from megatron_ds.parallel.topology import build_parallel_state, initialize_distributed

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    tokenizer = build_tokenizer(tok_path)
    prompts = read_prompts(args)
    device = initialize_distributed()
    state = build_parallel_state(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, device=device)
    model, _ = load_inference_model(args.load, state, config=flag_model_config(args.arch_flags),
                                    params_dtype=torch.bfloat16 if args.bf16 else None,
                                    fused_kernels=not args.no_fused_kernels)
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"--tokenizer-model {tok_path} has {tokenizer.vocab_size} tokens, more than the "
                          f"checkpoint's vocabulary of {config.vocab_size}")
    rank0 = dist.get_rank() == 0
    total, start = 0, time.perf_counter()
    for i, text in enumerate(prompts):
        ids = ([tokenizer.bos] if args.add_bos and tokenizer.bos is not None else []) + tokenizer.encode(text)
        if not ids:
            raise ConfigError(f"--prompt #{i + 1} encodes to no tokens")
        if len(ids) >= config.max_position_embeddings:
            raise ConfigError(f"--prompt #{i + 1} has {len(ids)} tokens; the model holds "
                              f"{config.max_position_embeddings} positions (max_position_embeddings)")
        out = generate(model, state, ids, args.max_new_tokens, sampling=sampling,
                       eos_id=None if args.ignore_eos else tokenizer.eod,
                       use_kv_cache=not args.no_kv_cache).tokens[0].tolist()
        total += len(out)
        if out and not args.ignore_eos and out[-1] == tokenizer.eod:
            out = out[:-1]  # the EOS ended it; it is not text
        if rank0:
            if len(prompts) == 1:  # the continuation alone, ready to pipe
                print(tokenizer.decode(out), flush=True)
            else:  # a header line per prompt, then the prompt and its continuation
                print(f"{SEPARATOR} {i + 1}/{len(prompts)} {SEPARATOR}\n{text}{tokenizer.decode(out)}", flush=True)
    if rank0:
        dt = time.perf_counter() - start
        print(f"generated {total} tokens in {dt:.2f}s ({total / max(dt, 1e-9):.1f} tokens/s, "
              f"TP {state.tp_size} x PP {state.pp_size}, kv cache {'off' if args.no_kv_cache else 'on'})",
              file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    args.arch_flags = rest  # the architecture flags, read only for a checkpoint without a config

    def body() -> None:
        try:  # the sampling flags' own checks raise ValueError naming the flag
            SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        tok = check_inputs(args)
        read_prompts(args)
        run(args, tok)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
