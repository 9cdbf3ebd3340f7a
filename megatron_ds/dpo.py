"""DPO entry point: ``torchrun --nproc-per-node N -m megatron_ds.dpo [Megatron flags] --dpo-data pairs.jsonl``.

Direct Preference Optimization (Rafailov et al. 2023) of a policy against a frozen reference model,
both in the run's TP/PP layout and both starting from the same checkpoint (an SFT model). The paper's
chat models: 1 epoch, LR 5e-6, batch 512 pairs, warmup then cosine (examples/dpo_deepseek_67b.sh).

Where the weights come from:
  --load CKPT                       policy and reference from CKPT, weights only (as --finetune)
  --dpo-ref-load SFT --load RUN     reference from SFT; the policy resumes RUN (a DPO run's --save,
                                    fully: optimizer, iteration, data position), or starts from SFT's
                                    weights when RUN holds no checkpoint yet (then RUN must be --save)
  neither                           both from the same seeded random initialization (demos, tests)

--global-batch-size and --micro-batch-size count pairs; a pair is two rows of --seq-length tokens.
With --dpo-epochs the number of steps follows from the number of pairs.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from megatron_ds import pretrain
from megatron_ds.checkpoint.checkpointing import load
from megatron_ds.checkpoint.run_checkpoints import has_checkpoint, tokenizer_mismatch
from megatron_ds.config import Config, ConfigError
from megatron_ds.data.chat import get_template
from megatron_ds.data.dpo_dataset import DPODataset, load_preference_pairs
from megatron_ds.data.errors import DataError
from megatron_ds.training.dpo_loss import LOSS_TYPES
from megatron_ds.training.dpo_trainer import DPOTrainer
from megatron_ds.training.logger import RunLogger
from megatron_ds.training.trainer import TrainResult


DESCRIPTION = ("Direct Preference Optimization of a policy against a frozen reference model on --dpo-data preference "
               "pairs, with pre-training's layouts, checkpoints and flags plus the dpo section.")


@dataclass
class DPOConfig:
    """Direct Preference Optimization."""

    dpo_data: Optional[str] = None
    """jsonl of preference pairs, one {"prompt", "chosen", "rejected"} per line; prompt is a string or a list of
    chat messages [{"role", "content"}] ending with a user turn, chosen and rejected are strings."""
    dpo_valid_data: Optional[str] = None
    """jsonl of held-out pairs: with --eval-interval, their DPO loss, preference accuracy and reward margin."""
    dpo_beta: float = 0.1
    """beta of the DPO loss: the strength of the KL penalty to the reference model (the paper does not state it;
    0.1 is the DPO paper's and TRL's default)."""
    dpo_loss_type: str = "sigmoid"
    """'sigmoid' (DPO; cDPO with --dpo-label-smoothing) or 'ipo' ((m - 1/(2 beta))^2 on log-probs averaged over
    each response's tokens)."""
    dpo_label_smoothing: float = 0.0
    """Conservative DPO: the probability e in [0, 0.5) that a label is flipped; the loss is
    -(1-e) logsigmoid(beta m) - e logsigmoid(-beta m)."""
    dpo_precompute_ref: bool = False
    """Compute the reference model's log-probs of every pair in one forward-only pass before training, keep
    them with the data and free the reference model (instead of a reference forward pass every step)."""
    dpo_ref_load: Optional[str] = None
    """Checkpoint of the reference model (the SFT model); default --load. Needed to resume a DPO run from
    its own checkpoint in --load."""
    dpo_epochs: Optional[float] = None
    """Passes over the pairs: sets --train-iters to ceil(epochs x pairs / --global-batch-size) (the paper: 1)."""
    dpo_skip_bad_pairs: bool = False
    """Leave out records that are not a usable pair (bad JSON, missing keys, identical replies, bad messages,
    a prompt longer than --seq-length) and report how many, instead of stopping at the first."""
    chat_template: str = "deepseek"
    """How prompt and reply are laid out as tokens: 'deepseek' ("User: ...\\n\\nAssistant: ...<eos>") or
    'chatml' (megatron_ds/data/chat.py)."""


@dataclass
class DPORunConfig(Config):
    dpo: DPOConfig = field(default_factory=DPOConfig)


def check_inputs(cfg: DPORunConfig) -> None:
    """What can be checked before any process group exists: flags and files."""
    d = cfg.dpo
    if not d.dpo_data:
        raise ConfigError("--dpo-data is required: a jsonl of {\"prompt\", \"chosen\", \"rejected\"} records")
    if not cfg.data.tokenizer_model:
        raise ConfigError("--tokenizer-model is required: DPO tokenizes the text of --dpo-data")
    for flag, path in (("--dpo-data", d.dpo_data), ("--dpo-valid-data", d.dpo_valid_data)):
        if path is not None and not os.path.isfile(path):
            raise DataError(f"{flag} {path}: no such file; pass a jsonl of {{\"prompt\", \"chosen\", \"rejected\"}} records")
    if not d.dpo_beta > 0:
        raise ConfigError(f"--dpo-beta {d.dpo_beta}: must be > 0")
    if d.dpo_loss_type not in LOSS_TYPES:
        raise ConfigError(f"--dpo-loss-type {d.dpo_loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if not 0 <= d.dpo_label_smoothing < 0.5:
        raise ConfigError(f"--dpo-label-smoothing {d.dpo_label_smoothing}: must be in [0, 0.5)")
    if d.dpo_label_smoothing and d.dpo_loss_type != "sigmoid":
        raise ConfigError("--dpo-label-smoothing applies to --dpo-loss-type sigmoid only")
    if d.dpo_epochs is not None and not d.dpo_epochs > 0:
        raise ConfigError(f"--dpo-epochs {d.dpo_epochs}: must be > 0")
    get_template(d.chat_template)
    if d.dpo_ref_load is not None and not has_checkpoint(d.dpo_ref_load):
        raise ConfigError(f"--dpo-ref-load {d.dpo_ref_load}: no checkpoint there; pass the SFT model's checkpoint directory")
    if d.dpo_ref_load is None and cfg.training.load is not None and not has_checkpoint(cfg.training.load):
        raise ConfigError(f"--load {cfg.training.load}: no checkpoint there, and DPO takes its reference model from "
                          f"it; pass the SFT checkpoint, or --dpo-ref-load SFT_CKPT to resume a DPO run from --load")
    if d.dpo_ref_load is not None and not cfg.training.override_tokenizer_check:
        # --load's tokenizer is checked by the launcher; the reference's here (the same text, the same ids).
        from megatron_ds.checkpoint.format import read_metadata, resolve
        from megatron_ds.data.tokenizer import build_tokenizer

        err = tokenizer_mismatch(d.dpo_ref_load, read_metadata(resolve(d.dpo_ref_load)).get("tokenizer"),
                                 cfg.data.tokenizer_model, build_tokenizer(cfg.data.tokenizer_model).identity(),
                                 load_flag="--dpo-ref-load")
        if err:
            raise ConfigError(err)


def resolve_weights(cfg: DPORunConfig) -> Optional[str]:
    """Where the reference comes from (None: the seeded initialization); sets --load/--finetune for the
    policy by the rules in the module docstring."""
    t, d = cfg.training, cfg.dpo
    if d.dpo_ref_load is None:
        if t.load is not None:
            t.finetune = True  # the policy starts from the reference's weights; its own state starts afresh
        return t.load
    if t.load is None or not has_checkpoint(t.load):
        t.load, t.finetune = d.dpo_ref_load, True
    return d.dpo_ref_load


def make_trainer(cfg: DPORunConfig, state, model, train_ds, valid_ds, logger) -> DPOTrainer:
    """The policy's trainer with this rank's chunks of the frozen reference model (built and loaded
    here; precomputed and freed right away under --dpo-precompute-ref)."""
    reference = pretrain.build_model(cfg, state)
    chunks = reference if isinstance(reference, list) else [reference]
    ref_path = resolve_weights(cfg)
    if ref_path is None:
        logger.info("reference model: the policy's seeded initialization (no --load)")
    else:
        ckpt = load(ref_path, chunks, state, load_rng=False)
        logger.info(f"reference model: {ckpt.reader.dir} (iteration {ckpt.iteration}), frozen")
    trainer = DPOTrainer(cfg, state, model, train_ds, valid_ds, logger, reference=reference)
    if cfg.dpo.dpo_precompute_ref:
        trainer.precompute_reference([train_ds, valid_ds])
        logger.info(f"reference log-probs precomputed for {len(train_ds.pairs)} training"
                    f"{f' and {len(valid_ds.pairs)} validation' if valid_ds is not None else ''} pairs; "
                    f"reference model freed")
    return trainer


def run(cfg: DPORunConfig, state, tokenizer, log: Optional[bool] = None) -> TrainResult:
    """Tokenize the pairs, then pretrain.run with DPO's data and trainer; the whole run, callable in-process."""
    t, d = cfg.training, cfg.dpo
    if log is None:
        log = not dist.is_initialized() or dist.get_rank() == 0
    info = RunLogger(log, None, t.train_iters).info
    if tokenizer is None:
        raise ConfigError("--tokenizer-model is required: DPO tokenizes the text of --dpo-data")
    train_pairs = load_preference_pairs(d.dpo_data, tokenizer, t.seq_length, d.chat_template, d.dpo_skip_bad_pairs)
    info(train_pairs.report())
    valid_pairs = None
    if d.dpo_valid_data and t.eval_interval > 0:
        valid_pairs = load_preference_pairs(d.dpo_valid_data, tokenizer, t.seq_length, d.chat_template,
                                            d.dpo_skip_bad_pairs, flag="--dpo-valid-data")
        info(valid_pairs.report())
    if d.dpo_epochs is not None:
        t.train_iters = max(1, math.ceil(d.dpo_epochs * len(train_pairs) / t.global_batch_size))
        info(f"--dpo-epochs {d.dpo_epochs:g}: {t.train_iters} steps of {t.global_batch_size} pairs")
    resolve_weights(cfg)  # before pretrain.run's RunCheckpoints reads --load / --finetune

    def build_data(cfg, tokenizer):
        train = DPODataset(train_pairs, t.train_iters * t.global_batch_size, t.seed)
        valid = None
        if valid_pairs is not None:
            valid = DPODataset(valid_pairs, max(t.eval_iters * t.global_batch_size, len(valid_pairs)), t.seed + 1)
        return train, valid

    return pretrain.run(cfg, state, tokenizer, log, build_data=build_data, make_trainer=make_trainer)


def main(argv: list[str] | None = None) -> int:
    return pretrain.launch(argv, DPORunConfig, "megatron_ds.dpo", check_inputs, run, DESCRIPTION)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
