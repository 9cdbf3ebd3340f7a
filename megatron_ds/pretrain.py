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

from megatron_ds.checkpoint.local import TRACKER, CheckpointError, load_checkpoint, save_checkpoint
from megatron_ds.config import Config, ConfigError, config_from_args, count_parameters, validate
from megatron_ds.data.errors import DataError
from megatron_ds.parallel.random import model_parallel_manual_seed
from megatron_ds.parallel.topology import (
    ParallelState, TopologyError, build_parallel_state, initialize_distributed,
)
from megatron_ds.training.logger import RunLogger
from megatron_ds.training.trainer import Trainer, TrainResult

USER_ERRORS = (ConfigError, DataError, TopologyError, CheckpointError)


def build_model(cfg: Config, state: ParallelState) -> torch.nn.Module:
    from megatron_ds.model.deepseek import DeepSeekModel

    return DeepSeekModel(cfg.model, tp_group=state.tp_group, sequence_parallel=cfg.parallel.sequence_parallel,
                         seed=cfg.training.seed, device=state.device)


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
        raise ConfigError("--data-path is required (a prefix written by tools/preprocess_data.py), or pass --mock-data")
    for ext in (".bin", ".idx"):
        if not os.path.isfile(cfg.data.data_path + ext):
            raise DataError(f"--data-path {cfg.data.data_path}: {cfg.data.data_path + ext} not found; "
                            "write it with tools/preprocess_data.py")


def build_datasets(cfg: Config, tokenizer):
    t = cfg.training
    n_train = t.train_iters * t.global_batch_size
    n_valid = t.eval_iters * t.global_batch_size if t.eval_interval > 0 else 0
    if cfg.data.mock_data:
        from megatron_ds.data.mock_dataset import MockGPTDataset

        valid = MockGPTDataset(n_valid, t.seq_length, cfg.model.vocab_size, t.seed + 1) if n_valid else None
        return MockGPTDataset(n_train, t.seq_length, cfg.model.vocab_size, t.seed), valid
    from megatron_ds.data.gpt_dataset import build_train_valid_test_datasets

    train, valid, _ = build_train_valid_test_datasets(
        cfg.data.data_path, cfg.data.split, t.seq_length, t.seed, (n_train, n_valid, 0),
        eod_mask_loss=cfg.data.eod_mask_loss, eod_id=tokenizer.eod if tokenizer is not None else None)
    if train is None:
        raise ConfigError(f"--split {cfg.data.split} leaves no training documents in --data-path {cfg.data.data_path}")
    return train, valid


def run(cfg: Config, state: ParallelState, tokenizer=None, log: bool | None = None) -> TrainResult:
    """Build the model and data for this rank and train; the whole run, callable in-process."""
    # Default RNG: same on every TP rank; the tracker's stream differs per TP rank, for dropout
    # inside TP regions. Weights do not use either: they come from per-parameter generators.
    rng_tracker = model_parallel_manual_seed(cfg.training.seed, state.tp_rank, state.pp_rank, state.device)
    if log is None:
        log = not dist.is_initialized() or dist.get_rank() == 0
    t = cfg.training
    logger = RunLogger(log, t.tensorboard_dir, t.train_iters)
    model = build_model(cfg, state)
    train_ds, valid_ds = build_datasets(cfg, tokenizer)
    n_params = count_parameters(cfg.model, cfg.model.padded_vocab_size(state.tp_size))
    logger.info(f"model {cfg.preset}: {n_params / 1e6:.2f}M parameters | TP {state.tp_size} x PP {state.pp_size} "
                f"x DP {state.dp_size}{' | sequence parallel' if cfg.parallel.sequence_parallel else ''} | "
                f"global batch {t.global_batch_size} x {t.seq_length} tokens")
    trainer = Trainer(cfg, state, model, train_ds, valid_ds, logger)
    trainer.rng_tracker = rng_tracker
    start, consumed = 0, 0
    if t.load and os.path.isfile(os.path.join(t.load, TRACKER)):
        start, consumed = load_checkpoint(t.load, state, model, trainer.optimizer)
        logger.info(f"resumed from {t.load} at iteration {start}")
    elif t.load:
        logger.info(f"no checkpoint in --load {t.load}; starting from scratch")

    def on_step(res: TrainResult) -> None:
        if t.save and t.save_interval > 0 and res.iteration % t.save_interval == 0 and res.iteration < t.train_iters:
            save_checkpoint(t.save, res.iteration, res.consumed_train_samples, cfg, state, model, trainer.optimizer)

    result = trainer.train(start, consumed, on_step=on_step)
    if t.save:
        path = save_checkpoint(t.save, result.iteration, result.consumed_train_samples, cfg, state, model,
                               trainer.optimizer)
        logger.info(f"saved checkpoint {path}")
    if t.generate_prompt and tokenizer is not None:
        from megatron_ds.training.sample import greedy_generate

        ids = greedy_generate(model, state, tokenizer.encode(t.generate_prompt), t.generate_tokens,
                              cfg.model.vocab_size, pad_multiple=state.tp_size if cfg.parallel.sequence_parallel else 1,
                              max_length=cfg.model.max_position_embeddings)
        logger.info(f"sample: {t.generate_prompt}{tokenizer.decode(ids)}")
    logger.close()
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world)
        check_data_files(cfg)
        tokenizer = load_tokenizer(cfg)
        device = initialize_distributed()
        state = build_parallel_state(cfg.parallel.tensor_model_parallel_size,
                                     cfg.parallel.pipeline_model_parallel_size, device=device)
        run(cfg, state, tokenizer)
    except USER_ERRORS as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
