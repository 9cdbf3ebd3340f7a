"""Pre-training entry point: ``torchrun --nproc-per-node N -m megatron_ds.pretrain [Megatron flags]``.

Parses the config, checks everything that can be checked before any process group exists (the
layout, the data files, the tokenizer), then builds the mesh, the model and the data, and hands
them to the Trainer. Bad input ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from megatron_ds.checkpoint.preemption import StopTraining
from megatron_ds.checkpoint.run_checkpoints import RunCheckpoints, check_load
from megatron_ds.cli import run_command
from megatron_ds.config import (
    PRETRAIN_DESCRIPTION, Config, ConfigError, config_from_args, count_parameters, validate,
)
from megatron_ds.cpu_allocator import keep_freed_memory
from megatron_ds.data.errors import DataError
from megatron_ds.parallel.random import model_parallel_manual_seed
from megatron_ds.paths import check_writable_dir
from megatron_ds.parallel.topology import (
    ParallelState, build_parallel_state, initialize_distributed,
)
from megatron_ds.training.logger import RunLogger
from megatron_ds.training.trainer import Trainer, TrainResult


def build_model(cfg: Config, state: ParallelState) -> torch.nn.Module | list[torch.nn.Module]:
    """This rank's TP shard of its pipeline stage: one module, or its list of model chunks when interleaving.

    Params are bf16 under --bf16 (the optimizer keeps the fp32 master copy), else fp32; the layers
    recompute their activations in backward under --recompute-granularity.
    """
    from megatron_ds.kernels import select_kernels
    from megatron_ds.model.partition import build_model_chunks
    from megatron_ds.model.recompute import apply_recompute

    # The model is handed its ops: csrc/ kernels unless --no-fused-kernels (or the extension is missing).
    kernels = select_kernels(fused=not cfg.kernels.no_fused_kernels, device=state.device)
    params_dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32
    chunks = build_model_chunks(cfg, state.tp_group, state.pp_rank, device=state.device, params_dtype=params_dtype,
                                kernels=kernels)
    if cfg.kernels.transformer_impl == "transformer_engine":
        from megatron_ds.kernels.te import use_transformer_engine  # imports TE; validate() checked it exists

        for chunk in chunks:
            use_transformer_engine(chunk, fp8_format=cfg.kernels.fp8_format)
    for chunk in chunks:
        apply_recompute(chunk, cfg.training.recompute_granularity)
    return chunks[0] if len(chunks) == 1 else chunks


def apply_auto_hparams(cfg: Config, state: ParallelState) -> str:
    """--auto-hparams: set --lr, --global-batch-size (and --train-iters, keeping the token budget)
    from the paper's Eq. 1 (megatron_ds/scaling.py); returns a line for the log. Call before the
    data and the trainer are built: both read the batch size."""
    from megatron_ds import scaling

    t = cfg.training
    chosen = scaling.auto_hparams(cfg.model, t, state.dp_size)
    for k, v in chosen.items():
        setattr(t, k, v)
    return "auto hparams (Eq. 1): " + ", ".join(f"--{k.replace('_', '-')} {v:.4g}" for k, v in chosen.items())


def load_tokenizer(cfg: Config):
    """The tokenizer, checked against the model's vocabulary; None when no --tokenizer-model."""
    if not cfg.data.tokenizer_model:
        return None
    from megatron_ds.data.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.data.tokenizer_model)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"--tokenizer-model {cfg.data.tokenizer_model} has {tok.vocab_size} tokens, more than the model's "
            f"vocabulary of {cfg.model.vocab_size}; pass --vocab-size {tok.vocab_size} or a tokenizer that fits")
    return tok


def check_data_files(cfg: Config) -> None:
    if cfg.data.mock_data:
        return
    if not cfg.data.data_path:
        raise ConfigError("--data-path is required (a prefix written by tools/preprocess_data.py, or weight/prefix "
                          "pairs to blend), or pass --mock-data")
    from megatron_ds.data.blending import parse_data_path

    _, prefixes = parse_data_path(cfg.data.data_path)
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise DataError(f"--data-path {prefix}: {prefix + ext} not found; write it with tools/preprocess_data.py")


def check_outputs(cfg: Config) -> None:
    """--save and --tensorboard-dir: directories that exist or can be created, and are writable;
    checked at startup, so that a bad path does not surface at the first save, after training."""
    t = cfg.training
    for flag, path in (("--save", t.save), ("--tensorboard-dir", t.tensorboard_dir)):
        if path:
            check_writable_dir(path, flag)


def build_datasets(cfg: Config, tokenizer):
    t = cfg.training
    n_train = t.train_iters * t.global_batch_size
    n_valid = t.eval_iters * t.global_batch_size if t.eval_interval > 0 else 0
    if cfg.data.mock_data:
        from megatron_ds.data.mock_dataset import MockGPTDataset

        valid = MockGPTDataset(n_valid, t.seq_length, cfg.model.vocab_size, t.seed + 1) if n_valid else None
        return MockGPTDataset(n_train, t.seq_length, cfg.model.vocab_size, t.seed), valid
    from megatron_ds.data.blending import build_train_valid_test_datasets, default_cache_dir

    d = cfg.data
    needs_eod = [f for f, on in (("--eod-mask-loss", d.eod_mask_loss), ("--reset-position-ids", d.reset_position_ids),
                                 ("--reset-attention-mask", d.reset_attention_mask)) if on]
    if needs_eod and tokenizer is None:
        raise ConfigError(f"{needs_eod[0]} needs --tokenizer-model (for the end-of-document id)")
    # Rank 0 builds the index arrays into the cache; the others wait at the barrier and memory-map them.
    distributed = dist.is_available() and dist.is_initialized()
    train, valid, _ = build_train_valid_test_datasets(
        d.data_path, d.split, t.seq_length, t.seed, (n_train, n_valid, 0),
        eod_mask_loss=d.eod_mask_loss, eod_id=tokenizer.eod if tokenizer is not None else None,
        reset_position_ids=d.reset_position_ids, reset_attention_mask=d.reset_attention_mask,
        cache_dir=d.data_cache_path or default_cache_dir(d.data_path),
        is_builder=not distributed or dist.get_rank() == 0, barrier=dist.barrier if distributed else None)
    if train is None:
        paths = d.data_path if isinstance(d.data_path, str) else " ".join(d.data_path)
        raise ConfigError(f"--split {d.split} leaves no training documents in --data-path {paths}")
    return train, valid


def data_order_note(cfg: Config, saved: dict | None, train_ds, consumed: int) -> str | None:
    """A warning when a resumed run reads the training data in another order than the run that
    consumed its first ``consumed`` samples (so some of them will be read again), else None.

    Same data settings and a --train-iters x --global-batch-size needing the same number of epochs
    keep the order (megatron_ds/data/sample_index.py); a count needing more epochs reshuffles, as
    in Megatron. Changed data settings (path, split, seed, length) are a deliberate new order."""
    if not saved or consumed <= 0 or cfg.data.mock_data:
        return None
    st, sd, t, d = saved.get("training") or {}, saved.get("data") or {}, cfg.training, cfg.data
    if (st.get("seq_length"), st.get("seed"), sd.get("data_path"), sd.get("split")) != (
            t.seq_length, t.seed, d.data_path, d.split) or sd.get("mock_data"):
        return None
    if not st.get("train_iters") or not st.get("global_batch_size"):
        return None
    from megatron_ds.data.blending import order_change

    why = order_change(train_ds, st["train_iters"] * st["global_batch_size"], consumed)
    if why is None:
        return None
    return (f"warning: the training samples are in another order than in the checkpoint's run ({why}); "
            f"some of the {consumed} samples read before the resume may be read again. A --train-iters "
            f"whose samples fit the same number of epochs continues the checkpoint's order.")


def run(cfg: Config, state: ParallelState, tokenizer=None, log: bool | None = None, *,
        build_data=build_datasets, make_trainer=Trainer) -> TrainResult:
    """Build the model and data for this rank and train; the whole run, callable in-process.

    The fine-tuning entry points reuse it: ``build_data(cfg, tokenizer) -> (train, valid)`` gives
    their datasets, ``make_trainer(cfg, state, model, train_ds, valid_ds, logger)`` their Trainer
    (with its loss function; DPO's also holds the frozen reference model).
    """
    # Default RNG: same on every TP rank; the tracker's stream differs per TP rank, for dropout
    # inside TP regions. Weights do not use either: they come from per-parameter generators.
    rng_tracker = model_parallel_manual_seed(cfg.training.seed, state.tp_rank, state.pp_rank, state.device)
    if log is None:
        log = not dist.is_initialized() or dist.get_rank() == 0
    auto = apply_auto_hparams(cfg, state) if cfg.training.auto_hparams else None
    t = cfg.training
    logger = RunLogger(log, t.tensorboard_dir, t.train_iters)
    if auto:
        logger.info(auto)
    model = build_model(cfg, state)
    train_ds, valid_ds = build_data(cfg, tokenizer)
    if t.eval_interval > 0 and valid_ds is None:
        logger.info(f"warning: --eval-interval {t.eval_interval} is set but this run has no validation data, so no "
                    f"validation runs; give it a validation part (--split) or data set")
    n_params = count_parameters(cfg.model, cfg.model.padded_vocab_size(state.tp_size))
    logger.info(f"model {cfg.preset}: {n_params / 1e6:.2f}M parameters | TP {state.tp_size} x PP {state.pp_size} "
                f"x DP {state.dp_size}{' | sequence parallel' if cfg.parallel.sequence_parallel else ''} | "
                f"global batch {t.global_batch_size} x {t.seq_length} tokens")
    trainer = make_trainer(cfg, state, model, train_ds, valid_ds, logger)
    if tokenizer is not None:
        trainer.set_tokenizer(tokenizer)  # validation also in bits-per-byte
    trainer.rng_tracker = rng_tracker
    # Checkpoints (megatron_ds/checkpoint/run_checkpoints.py): --load at any layout, periodic
    # asynchronous saves from the step callback, and on SIGTERM/SIGINT a final save and a clean exit.
    ckpts = RunCheckpoints(cfg, state, trainer.model_chunks, trainer.optimizer, rng_tracker, tokenizer, logger)
    stopped = None
    try:
        start, consumed = ckpts.resume()
        note = data_order_note(cfg, ckpts.loaded_config, train_ds, consumed)
        if note:
            logger.info(note)
        if start > t.train_iters:  # every rank loaded the same iteration: all raise together
            raise ConfigError(f"--load {t.load} is at iteration {start}, past --train-iters {t.train_iters}; raise "
                              f"--train-iters (or --epochs) to train further, or --finetune to start over")
        result = trainer.train(start, consumed, on_step=ckpts.on_step)
    except StopTraining as e:  # every rank agreed at the same step boundary
        stopped, result = e, trainer.result
        logger.info(f"stopping early: {e.reason}")
    except BaseException:
        ckpts.close()
        raise
    ckpts.finish(result, stopped)
    if stopped is not None:
        logger.close()
        return result
    if t.generate_prompt and tokenizer is not None:
        from megatron_ds.training.sample import greedy_generate

        ids = greedy_generate(model, state, tokenizer.encode(t.generate_prompt), t.generate_tokens,
                              cfg.model.vocab_size, pad_multiple=state.tp_size if cfg.parallel.sequence_parallel else 1,
                              max_length=cfg.model.max_position_embeddings)
        logger.info(f"sample: {t.generate_prompt}{tokenizer.decode(ids)}")
    logger.close()
    return result


def main(argv: list[str] | None = None) -> int:
    return launch(argv, Config, "megatron_ds.pretrain", check_data_files, run)


def launch(argv, config_cls, prog: str, check_inputs, run_fn, description: str = PRETRAIN_DESCRIPTION) -> int:
    """The process around a run, shared by pretrain, sft and dpo: parse (``description`` heads --help),
    check what can be checked before any process group exists (``check_inputs(cfg)``; the output
    directories, --load and its tokenizer), initialize, ``run_fn(cfg, state, tokenizer)``; a user
    error is one line on stderr (rank 0) and exit code 2."""
    def body() -> None:
        cfg = config_from_args(argv, config_cls, prog, description)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world)
        check_outputs(cfg)  # first: an unwritable --save is found before any data is read
        check_inputs(cfg)
        tokenizer = load_tokenizer(cfg)
        check_load(cfg, tokenizer)  # --load holds a checkpoint (unless it is --save), of this tokenizer
        device = initialize_distributed()
        if device.type == "cpu":
            keep_freed_memory()  # steps reuse freed activations' pages instead of re-faulting them
        state = build_parallel_state(cfg.parallel.tensor_model_parallel_size,
                                     cfg.parallel.pipeline_model_parallel_size, device=device)
        run_fn(cfg, state, tokenizer)

    return run_command(body)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
