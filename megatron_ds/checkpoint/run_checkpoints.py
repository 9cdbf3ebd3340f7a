"""A training run's checkpoints: resume from --load, periodic and final saves, preemption.

``pretrain.run`` uses it in four places::

    ckpts = RunCheckpoints(cfg, state, model_chunks, trainer.optimizer, rng_tracker, tokenizer, logger)
    start, consumed = ckpts.resume()                 # --load (any layout), --finetune, --no-load-*
    try:
        result = trainer.train(start, consumed, on_step=ckpts.on_step)
    except StopTraining:                             # SIGTERM / SIGINT, agreed by every rank
        result = trainer.result
    ckpts.finish(result)                             # final save, waits for the writer

``on_step`` runs at every step boundary on every rank. It makes one small collective (MAX over
the world of [signal received, minutes due]) so that all ranks take the same decision, then
saves when ``--save-interval`` steps or ``--save-interval-minutes`` have passed: the copy off the
parameters and optimizer state happens there, the writing in the background (``--async-save``,
the default), and a save waits for the one before it. On an agreed signal it raises
``StopTraining``; ``finish`` then writes the final checkpoint and waits for it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_ds.checkpoint.checkpointing import AsyncCheckpointWriter, load, save, tokenizer_identity
from megatron_ds.checkpoint.format import LATEST, METADATA, read_metadata, resolve
from megatron_ds.checkpoint.optimizer_state import (
    load_optimizer_state, optimizer_common_state, optimizer_sharded_tensors, reset_optimizer_from_model,
)
from megatron_ds.checkpoint.preemption import PreemptionHandler, StopTraining
from megatron_ds.errors import ConfigError
from megatron_ds.parallel.topology import ParallelState

OVERRIDE_TOKENIZER_FLAG = "--override-tokenizer-check"


def has_checkpoint(path: str) -> bool:
    """A --save directory with a ``latest`` pointer, or a checkpoint directory itself."""
    return os.path.isfile(os.path.join(path, LATEST)) or os.path.isfile(os.path.join(path, METADATA))


def same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def tokenizer_mismatch(load: str, saved: Optional[dict], tokenizer_flag: Optional[str],
                       identity: Optional[str], load_flag: str = "--load") -> Optional[str]:
    """The one-line error when the checkpoint at ``load`` records a tokenizer (``saved``, its
    metadata entry) other than the one given as ``--tokenizer-model tokenizer_flag`` (content hash
    ``identity``); None when they match or either side is unknown."""
    if not saved or not identity or not saved.get("sha256_16") or saved["sha256_16"] == identity:
        return None
    return (f"--tokenizer-model {tokenizer_flag} (sha256 {identity}) is not the tokenizer {load_flag} {load} was "
            f"trained with ({saved.get('path')}, sha256 {saved['sha256_16']}); pass that tokenizer, or "
            f"{OVERRIDE_TOKENIZER_FLAG} to go on with this one")


def check_load(cfg, tokenizer=None) -> None:
    """--load, checked before any process group exists and before any weight is read.

    A --load that holds no checkpoint is an error, except when it is also --save: that is the
    first start of a resumable job (later starts find the job's own checkpoint there). A
    checkpoint trained with another tokenizer than --tokenizer-model is an error unless
    --override-tokenizer-check.
    """
    t = cfg.training
    if not t.load:
        return
    if not has_checkpoint(t.load):
        if t.save and same_dir(t.load, t.save):
            return
        what = ("no such directory" if not os.path.exists(t.load)
                else f"no checkpoint there (neither {LATEST} nor {METADATA})")
        raise ConfigError(f"--load {t.load}: {what}; pass a directory written by --save, or drop --load to "
                          "start from scratch (--load equal to --save may be empty: a resumable job's first start)")
    if not t.override_tokenizer_check and tokenizer is not None:
        saved = read_metadata(resolve(t.load)).get("tokenizer")
        err = tokenizer_mismatch(t.load, saved, cfg.data.tokenizer_model, tokenizer.identity())
        if err:
            raise ConfigError(err)


def _module_state_note(counts: tuple[int, int]) -> str:
    """What the resume line says of the FP8 scaling state (nothing for a run without TE FP8 layers)."""
    restored, wanted = counts
    if wanted == 0:
        return ""
    if restored == wanted:
        return f", FP8 scaling state of {wanted} layers restored"
    return f", FP8 scaling state restored for {restored} of {wanted} layers (the rest re-warm)"


class RunCheckpoints:
    def __init__(self, cfg, state: ParallelState, model_chunks, optimizer, rng_tracker=None, tokenizer=None,
                 logger=None):
        self.cfg, self.state = cfg, state
        self.t = cfg.training
        self.chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.optimizer, self.rng_tracker, self.tokenizer = optimizer, rng_tracker, tokenizer
        self.logger = logger
        self.writer: Optional[AsyncCheckpointWriter] = (
            AsyncCheckpointWriter() if self.t.save and self.t.async_save else None)
        self.preemption: Optional[PreemptionHandler] = None
        if self.t.save and threading.current_thread() is threading.main_thread():
            self.preemption = PreemptionHandler().install()
        self.last_saved: Optional[int] = None
        self.loaded_config: Optional[dict] = None
        """The resumed checkpoint's run configuration (None without a resume or with --finetune)."""
        self._last_save_time = time.monotonic()
        self.blocked_s: list[float] = []
        """Seconds the training loop was blocked by each save (copy + wait for the previous one)."""

    def _info(self, msg: str) -> None:
        if self.logger is not None:
            self.logger.info(msg)

    # -- load ----------------------------------------------------------------------------------

    def resume(self) -> tuple[int, int]:
        """Load --load (when there is a checkpoint there); returns (start iteration, consumed samples)."""
        t = self.t
        if not t.load:
            return 0, 0
        # Before any weight is read (launch ran it too, before any process group; in-process runs
        # come here directly): every rank reads the same metadata, so all raise together.
        check_load(self.cfg, self.tokenizer)
        if not has_checkpoint(t.load):  # allowed by check_load only when it is also --save
            self._info(f"no checkpoint in --load {t.load} yet (it is --save); starting from scratch")
            return 0, 0
        weights_only = t.finetune
        ckpt = load(t.load, self.chunks, self.state, rng_tracker=self.rng_tracker,
                    load_rng=not (t.no_load_rng or weights_only))
        if weights_only or t.no_load_optim:
            reset_optimizer_from_model(self.optimizer)
        else:
            load_optimizer_state(self.optimizer, self.chunks, self.state, ckpt.reader, ckpt.common_state)
        tok = tokenizer_identity(self.tokenizer)
        if tok is not None and tokenizer_mismatch(t.load, ckpt.reader.tokenizer, tok["path"], tok["sha256_16"]):
            saved_tok = ckpt.reader.tokenizer
            self._info(f"warning: {ckpt.reader.dir} was trained with tokenizer {saved_tok.get('path')} "
                       f"({saved_tok.get('sha256_16')}), this run uses {tok['path']} ({tok['sha256_16']}) "
                       f"({OVERRIDE_TOKENIZER_FLAG})")
        saved_layout = ckpt.reader.meta.get("layout") or {}
        where = (f"{ckpt.reader.dir} (saved at TP {saved_layout.get('tp')} x PP {saved_layout.get('pp')} x "
                 f"DP {saved_layout.get('dp')}, iteration {ckpt.iteration})")
        if weights_only:
            self._info(f"finetuning from the weights of {where}; optimizer, RNG and iteration start afresh")
            return 0, 0
        self.loaded_config = ckpt.reader.config
        self._info(f"resumed from {where} at iteration {ckpt.iteration}"
                   f"{'' if not t.no_load_optim else ', optimizer state not loaded (--no-load-optim)'}"
                   f"{'' if ckpt.rng_restored else ', RNG as seeded'}{_module_state_note(ckpt.module_states)}")
        return ckpt.iteration, ckpt.consumed_samples

    # -- save ----------------------------------------------------------------------------------

    def save(self, iteration: int, consumed_samples: int) -> str:
        """Collective: every rank. Returns the checkpoint directory (complete after ``wait``)."""
        t0 = time.perf_counter()
        self.optimizer.finish_param_sync()  # ZeRO-1: the weights written must be whole, not in flight
        schedule = {"iteration": iteration, "consumed_samples": consumed_samples,
                    "style": self.t.lr_decay_style, "train_iters": self.t.train_iters}
        common = {"lr_schedule": schedule, "optimizer": optimizer_common_state(self.optimizer)}
        path = save(self.t.save, iteration, self.chunks, self.state, consumed_samples=consumed_samples,
                    config=self.cfg, rng_tracker=self.rng_tracker, common_state=common,
                    optimizer_tensors=optimizer_sharded_tensors(self.optimizer, self.chunks, self.state),
                    tokenizer=tokenizer_identity(self.tokenizer), keep_last_n=self.t.keep_last_n,
                    writer=self.writer)
        self.blocked_s.append(time.perf_counter() - t0)
        self.last_saved = iteration
        self._last_save_time = time.monotonic()
        return path

    def _agree(self, minutes_due: bool) -> tuple[bool, bool]:
        """(stop, save now) the same on every rank: MAX over the world of each rank's flags."""
        flags = torch.tensor([int(self.preemption is not None and self.preemption.requested), int(minutes_due)],
                             dtype=torch.int32, device=self.state.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())

    def on_step(self, res) -> None:
        """The trainer's step callback: periodic saves; StopTraining once a signal is agreed."""
        t = self.t
        if not t.save:
            return
        minutes_due = t.save_interval_minutes > 0 and (
            time.monotonic() - self._last_save_time >= 60.0 * t.save_interval_minutes)
        stop, minutes_due = self._agree(minutes_due)
        if stop:
            signum = self.preemption.received if self.preemption is not None else None
            raise StopTraining(f"signal {signum} at iteration {res.iteration}", signum)
        steps_due = t.save_interval > 0 and res.iteration % t.save_interval == 0
        if (steps_due or minutes_due) and res.iteration < t.train_iters:  # the last one is finish()'s
            self.save(res.iteration, res.consumed_train_samples)

    def finish(self, result, stopped: Optional[StopTraining] = None) -> Optional[str]:
        """The final save (when --save), waited for; the signal handlers are restored."""
        path = None
        try:
            if self.t.save and self.last_saved != result.iteration:
                path = self.save(result.iteration, result.consumed_train_samples)
            if self.writer is not None:
                self.writer.wait()
        finally:
            self.close()
        if path is not None:
            self._info(f"saved checkpoint {path}" + (f" (stopping: {stopped.reason})" if stopped else ""))
        if self.blocked_s:
            mean_ms = 1e3 * sum(self.blocked_s) / len(self.blocked_s)
            self._info(f"{len(self.blocked_s)} checkpoint save(s), {'asynchronous' if self.writer else 'synchronous'}:"
                       f" the training loop was blocked {mean_ms:.1f} ms per save on average")
        return path

    def close(self) -> None:
        if self.preemption is not None:
            self.preemption.restore()
            self.preemption = None
