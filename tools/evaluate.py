"""Evaluate a checkpoint on one or more datasets: loss per token, perplexity and bits-per-byte.

    python tools/evaluate.py --load ckpt/ --data-path data/held_out_text_document --seq-length 4096
    torchrun --nproc-per-node 8 tools/evaluate.py --load ckpt/ --data-path data/a_text_document data/b_text_document \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --micro-batch-size 2

Each ``--data-path`` prefix (a .bin/.idx pair from tools/preprocess_data.py) is read whole: its
documents in order of a fixed seed, cut into samples of ``--seq-length`` + 1 tokens as in
training, every sample evaluated once (the last global batch's remainder and the final partial
sample are left out; the line says how many tokens were scored). ``--eval-iters N`` stops after N
global batches. The checkpoint may come from any layout; world size = TP x PP x DP, and each
global batch is DP x ``--micro-batch-size`` samples. Bits-per-byte is the summed loss in bits over
the UTF-8 bytes the scored tokens stand for (training/evaluation.py), so it needs the tokenizer:
``--tokenizer-model``, or the one the checkpoint records (another one than the checkpoint records
is an error unless ``--override-tokenizer-check``). Rank 0 prints one line per dataset and, with
``--output-json``, writes them to a file (atomically; its directory is checked before evaluating).
Bad input is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_ds.checkpoint.format import CheckpointError  # noqa: E402
from megatron_ds.checkpoint.run_checkpoints import tokenizer_mismatch  # noqa: E402
from megatron_ds.cli import run_command  # noqa: E402
from megatron_ds.config import ConfigError, model_preset  # noqa: E402
from megatron_ds.data.errors import DataError  # noqa: E402
from megatron_ds.parallel.topology import TopologyError  # noqa: E402
from megatron_ds.paths import check_writable_file  # noqa: E402

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint directory (with 'latest') or an iter_N directory")
    p.add_argument("--data-path", nargs="+", required=True, help="one or more dataset prefixes (.bin/.idx)")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.json (default: the one the checkpoint records, if it still exists)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per sample (default: the checkpoint's training --seq-length)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="samples per forward on each DP rank")
    p.add_argument("--eval-iters", type=int, default=None, help="global batches per dataset (default: all of it)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the document order")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="run in bf16 (default: the dtype the checkpoint stores)")
    p.add_argument("--no-fused-kernels", action="store_true", help="use the pure-PyTorch reference kernels")
    p.add_argument("--model", default=None, help="architecture preset, only for a checkpoint that records no config")
    p.add_argument("--output-json", default=None,
                   help="also write the results here (a list, one entry per dataset); its directory must exist or "
                        "be creatable, and be writable (checked before evaluating)")
    p.add_argument("--override-tokenizer-check", action="store_true",
                   help="go on when --tokenizer-model is not the tokenizer the checkpoint records (another content "
                        "hash), which is otherwise an error")
    return p


def check_inputs(args):
    """Everything checkable before a process group exists; returns (model config, seq length, tokenizer path)."""
    from megatron_ds.checkpoint.format import read_metadata, resolve
    from megatron_ds.checkpoint.load import CheckpointReader
    from megatron_ds.data.tokenizer import build_tokenizer
    from megatron_ds.inference.loading import check_layout, checkpoint_model_config

    if not os.path.exists(args.load):
        raise CheckpointError(f"--load {args.load}: no such checkpoint directory")
    meta = read_metadata(resolve(args.load))  # raises CheckpointError naming the file
    for prefix in args.data_path:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise DataError(f"--data-path {prefix}: {prefix + ext} not found; write it with tools/preprocess_data.py")
    tok = args.tokenizer_model or (meta.get("tokenizer") or {}).get("path")
    if not tok or not os.path.exists(tok):
        what = f"--tokenizer-model {tok}: no such file" if args.tokenizer_model else (
            f"--tokenizer-model is required: the checkpoint {args.load} records no tokenizer that still exists")
        raise DataError(what)
    if args.output_json:
        check_writable_file(args.output_json, "--output-json")
    tokenizer = build_tokenizer(tok)
    if not args.override_tokenizer_check:
        err = tokenizer_mismatch(args.load, meta.get("tokenizer"), tok, tokenizer.identity())
        if err and not args.tokenizer_model:  # the recorded file itself was rewritten since
            err = (f"--load {args.load}: the tokenizer it records, {tok}, has changed since training (sha256 "
                   f"{tokenizer.identity()}, recorded {meta['tokenizer']['sha256_16']}); pass the original as "
                   "--tokenizer-model, or --override-tokenizer-check to go on with this one")
        if err:
            raise ConfigError(err)
    config = checkpoint_model_config(CheckpointReader(args.load, verify=False))
    if config is None:
        if args.model is None:
            raise ConfigError(f"--load {args.load}: the checkpoint records no model config; pass --model")
        config = model_preset(args.model)
    seq = args.seq_length or ((meta.get("config") or {}).get("training") or {}).get("seq_length")
    if not seq or seq < 1:
        raise ConfigError(f"--seq-length is required: the checkpoint {args.load} records no training --seq-length")
    if seq > config.max_position_embeddings:
        raise ConfigError(f"--seq-length {seq} exceeds the model's {config.max_position_embeddings} positions")
    if args.micro_batch_size < 1 or (args.eval_iters is not None and args.eval_iters < 1):
        raise ConfigError("--micro-batch-size and --eval-iters must be >= 1")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    check_layout(config, tp, pp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise TopologyError(f"world size {world} is not a multiple of --tensor-model-parallel-size {tp} x "
                            f"--pipeline-model-parallel-size {pp}")
    return config, seq, tok


def whole_dataset(prefix: str, seq: int, seed: int):
    """Every document of ``prefix`` once, cut into (len - 1) // seq samples of seq + 1 tokens."""
    import numpy as np

    from megatron_ds.data.gpt_dataset import GPTDataset
    from megatron_ds.data.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    tokens = int(indexed.sequence_lengths.astype(np.int64).sum())
    num_samples = (tokens - 1) // seq
    if num_samples < 1:
        raise DataError(f"--data-path {prefix}: {tokens} tokens, fewer than one sample of --seq-length {seq} + 1")
    return GPTDataset(indexed, np.arange(len(indexed), dtype=np.int64), num_samples, seq, seed)


def run(args, config, seq: int, tok_path: str) -> list[dict]:
    from megatron_ds.data.tokenizer import build_tokenizer
    from megatron_ds.inference.loading import load_inference_model
    from megatron_ds.parallel.topology import build_parallel_state, initialize_distributed
    from megatron_ds.training.evaluation import VocabCheck, evaluate, global_batches

    tokenizer = build_tokenizer(tok_path)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"--tokenizer-model {tok_path} has {tokenizer.vocab_size} tokens, more than the "
                          f"checkpoint's vocabulary of {config.vocab_size}")
    device = initialize_distributed()
    state = build_parallel_state(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, device=device)
    model, _ = load_inference_model(args.load, state, config=model_preset(args.model) if args.model else None,
                                    params_dtype=torch.bfloat16 if args.bf16 else None,
                                    fused_kernels=not args.no_fused_kernels)
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()).to(state.device)
    results = []
    for prefix in args.data_path:
        dataset = whole_dataset(prefix, seq, args.seed)
        per_batch = args.micro_batch_size * state.dp_size
        num_batches = len(dataset) // per_batch
        if args.eval_iters is not None:
            num_batches = min(num_batches, args.eval_iters)
        if num_batches < 1:
            raise DataError(f"--data-path {prefix}: {len(dataset)} samples of --seq-length {seq}, fewer than one "
                            f"global batch of {per_batch}; lower --micro-batch-size or --seq-length")
        # Data binarized with another tokenizer: one error, not an IndexError in the embedding (TP 1) or
        # the byte table, nor a loss over masked ids (TP > 1). The tokenizer fits the model (checked above).
        check = VocabCheck.of_tokenizer(tokenizer.vocab_size, tok_path, f"--data-path {prefix}")
        res = evaluate([model], state, global_batches(dataset, state, args.micro_batch_size, 1, num_batches,
                                                      vocab_check=check),
                       token_bytes=token_bytes)
        results.append({"data_path": prefix, "loss": res.loss, "perplexity": res.perplexity,
                        "bits_per_byte": res.bits_per_byte, "tokens": res.tokens, "bytes": res.num_bytes,
                        "samples": num_batches * per_batch, "seq_length": seq})
        if dist.get_rank() == 0:
            print(f"{prefix}: loss {res.loss:.4f} | perplexity {res.perplexity:.3f} | bits per byte "
                  f"{res.bits_per_byte:.4f} | {res.tokens} tokens, {res.num_bytes} bytes "
                  f"({res.num_bytes / max(res.tokens, 1):.3f} bytes/token)", flush=True)
    return results


def write_json(path: str, results: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # checked creatable at startup
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)  # a reader never sees a half-written file


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        config, seq, tok = check_inputs(args)
        results = run(args, config, seq, tok)
        if args.output_json and dist.get_rank() == 0:
            write_json(args.output_json, results)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
