"""Supervised fine-tuning entry point: ``torchrun --nproc-per-node N -m megatron_ds.sft [flags]``.

The pre-training run with other data: conversations binarized by tools/preprocess_sft.py, packed
into full sequences with attention kept inside each conversation (megatron_ds/data/sft_dataset.py),
the loss the mean over assistant tokens (the token-mean loss of pre-training with the SFT loss
mask). Same layouts, checkpoints, logs and flags as megatron_ds.pretrain, plus the ``sft`` section:

    torchrun --nproc-per-node 8 -m megatron_ds.sft --model deepseek-7b --load base-ckpt/ --save sft-ckpt/ \
        --data-path data/sft --epochs 4 --lr 1e-5 --global-batch-size 128 ...

``--load`` starts from a checkpoint's weights only (iteration 0, fresh optimizer and data order:
Megatron's --finetune), whatever its TP/PP layout; a Hugging Face model comes in through
``tools/checkpoint/convert_hf.py import``. A second stage loads the first's --save directory.
``--resume-sft`` instead continues an interrupted SFT run from its own checkpoint.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from megatron_ds import pretrain
from megatron_ds.config import Config, ConfigError
from megatron_ds.data.chat import get_template, prompt_text
from megatron_ds.data.sft_dataset import ConversationCorpus, SFTDataset
from megatron_ds.training.trainer import Trainer


DESCRIPTION = ("Supervised fine-tuning of a DeepSeek LLM model on conversations binarized by tools/preprocess_sft.py "
               "(loss on assistant tokens only), with pre-training's layouts, checkpoints and flags plus the sft section.")


@dataclass
class SFTConfig:
    """Supervised fine-tuning on conversations (megatron_ds.sft)."""

    epochs: Optional[int] = None
    """Passes over the packed SFT samples: sets --train-iters to floor(epochs x packed samples / --global-batch-size).
    Unset: --train-iters steps, the samples repeating as often as needed."""
    valid_data_path: Optional[list[str]] = None
    """Prefixes of validation conversations (tools/preprocess_sft.py), for --eval-interval; --split is not used."""
    resume_sft: bool = False
    """With --load: continue this SFT run from its own checkpoint (iteration, data position, optimizer, RNG)
    instead of starting from the checkpoint's weights only."""
    chat_template: str = "deepseek"
    """The template the data was rendered with (tools/preprocess_sft.py --chat-template: deepseek, chatml);
    --generate-prompt is laid out in it as a user turn followed by the reply cue."""


@dataclass
class SFTRunConfig(Config):
    """Everything one SFT run needs: the pre-training sections plus ``sft``."""

    sft: SFTConfig = field(default_factory=SFTConfig)


def _prefixes(paths, flag: str) -> list[str]:
    for p in paths:
        try:
            float(p)
        except ValueError:
            continue
        raise ConfigError(f"{flag} {' '.join(paths)}: SFT takes prefixes only (no blending weights); "
                          f"list several prefixes to train on all of their conversations")
    return list(paths)


def check_inputs(cfg: SFTRunConfig) -> None:
    """Everything checkable before any process group: flags and the data files."""
    t, s = cfg.training, cfg.sft
    if cfg.data.mock_data:
        raise ConfigError("--mock-data: megatron_ds.sft trains on conversations; binarize them with "
                          "tools/preprocess_sft.py and pass --data-path")
    if not cfg.data.data_path:
        raise ConfigError("--data-path is required: the --output-prefix of tools/preprocess_sft.py (one or more)")
    ConversationCorpus(_prefixes(cfg.data.data_path, "--data-path"), "--data-path")
    if s.epochs is not None and s.epochs < 1:
        raise ConfigError(f"--epochs {s.epochs}: must be >= 1")
    if t.eval_interval > 0:
        if not s.valid_data_path:
            raise ConfigError("--eval-interval needs --valid-data-path (conversations from tools/preprocess_sft.py); "
                              "SFT does not split --data-path")
        ConversationCorpus(_prefixes(s.valid_data_path, "--valid-data-path"), "--valid-data-path")
    get_template(s.chat_template)  # a one-line DataError naming --chat-template when unknown
    if s.resume_sft and not t.load:
        raise ConfigError("--resume-sft needs --load (the interrupted SFT run's --save directory)")


def build_sft_datasets(cfg: SFTRunConfig) -> tuple[SFTDataset, Optional[SFTDataset]]:
    """Pack the conversations (rank 0 builds the index cache, the others map it) and fix --train-iters
    from --epochs; collective when torch.distributed is initialized."""
    t, d, s = cfg.training, cfg.data, cfg.sft
    distributed = dist.is_available() and dist.is_initialized()
    shared = dict(is_builder=not distributed or dist.get_rank() == 0, barrier=dist.barrier if distributed else None)
    prefixes = _prefixes(d.data_path, "--data-path")
    cache_dir = d.data_cache_path or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
    train = SFTDataset(ConversationCorpus(prefixes), t.seq_length, t.seed, cache_dir=cache_dir, **shared)
    if s.epochs is not None:
        t.train_iters = s.epochs * train.num_packed // t.global_batch_size
        if t.train_iters < 1:
            raise ConfigError(f"--epochs {s.epochs} x {train.num_packed} packed samples is less than one "
                              f"--global-batch-size {t.global_batch_size}; add data or lower the batch size")
    train.num_samples = t.train_iters * t.global_batch_size
    valid = None
    if t.eval_interval > 0:
        valid = SFTDataset(ConversationCorpus(_prefixes(s.valid_data_path, "--valid-data-path"), "--valid-data-path"),
                           t.seq_length, t.seed + 1, num_samples=t.eval_iters * t.global_batch_size,
                           cache_dir=cache_dir, **shared)
    return train, valid


class SFTTrainer(Trainer):
    """The pre-training Trainer (token-mean loss over the SFT loss mask) that also logs the epoch."""

    def log_scalars(self, scalars: dict[str, float]) -> dict[str, float]:
        return {**scalars, "epoch": self.result.consumed_train_samples / self.train_ds.num_packed}

    def data_source(self, dataset) -> str:
        if dataset is self.valid_ds and dataset is not None:
            return f"--valid-data-path {' '.join(self.cfg.sft.valid_data_path or [])}"
        return super().data_source(dataset)


def run(cfg: SFTRunConfig, state, tokenizer=None, log: bool | None = None):
    """One SFT run, callable in-process (tests): pack, fix the iterations, then pretrain.run."""
    train, valid = build_sft_datasets(cfg)
    t = cfg.training
    if t.load and not cfg.sft.resume_sft:
        t.finetune = True  # weights only: iteration 0, fresh optimizer, RNG and data position
    if t.generate_prompt:  # the sample after training answers the prompt as a chat turn
        t.generate_prompt = prompt_text(t.generate_prompt, cfg.sft.chat_template)

    def make_trainer(cfg, state, model, train_ds, valid_ds, logger):
        logger.info(f"SFT data: {train.stats.summary()}")
        epochs = t.train_iters * t.global_batch_size / train.num_packed
        logger.info(f"SFT: {t.train_iters} iterations x global batch {t.global_batch_size} = {epochs:.3g} epochs "
                    f"of {train.num_packed} packed samples"
                    + (f" (--epochs {cfg.sft.epochs})" if cfg.sft.epochs is not None else " (--train-iters)"))
        if valid_ds is not None:
            logger.info(f"SFT validation data: {valid_ds.stats.summary()}")
        return SFTTrainer(cfg, state, model, train_ds, valid_ds, logger)

    return pretrain.run(cfg, state, tokenizer, log, build_data=lambda cfg, tokenizer: (train, valid),
                        make_trainer=make_trainer)


def main(argv: list[str] | None = None) -> int:
    return pretrain.launch(argv, SFTRunConfig, "megatron_ds.sft", check_inputs, run, DESCRIPTION)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
