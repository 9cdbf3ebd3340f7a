"""The training loop: global batches of micro-batches, DP gradient sync, clipping, AdamW, eval, logs.

One step:
  1. this DP rank takes its micro-batches of the global batch (Megatron's sampler order);
  2. the global token count is all-reduced over DP so every rank divides by the same number
     (every pipeline stage reads the batch, so each knows it);
  3. forward/backward per micro-batch in the layout's schedule (no pipelining, 1F1B, or
     interleaved 1F1B over this rank's model chunks); grads accumulate in fp32 main-grad
     buckets, one buffer per chunk, whose DP all-reduce (reduce-scatter under ZeRO-1) starts
     during the chunk's last backward;
  4. ``MegatronOptimizer.step``: finish the DP collectives, sum the grads of TP-replicated params
     (norms under SP, replicated KV heads) over TP, clip to the global grad norm, AdamW on the fp32
     master weights (this rank's 1/DP shard under ZeRO-1), copy back to the model params (bf16)
     and all-gather them (ZeRO-1). A non-finite grad norm skips the update.

The optimizer is one object for every mode (plain DP or ZeRO-1, fp32 or bf16 params): it owns the
grad buffers and moves the params into a flat buffer of its own, so it is built once, here, after
the model is on its device.

The loss lives on the last pipeline stage; it is summed over DP there and broadcast over the
pipeline group, so every rank logs and returns the same number.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_ds import flops, memory
from megatron_ds.config import Config
from megatron_ds.optim.distributed_optimizer import build_optimizer
from megatron_ds.optim.lr_schedule import LRSchedule
from megatron_ds.parallel.layers import allreduce_tp_replicated_grads
from megatron_ds.parallel.topology import ParallelState
from megatron_ds.training.evaluation import (
    EvalResult, VocabCheck, evaluate, global_batches, global_count, reduce_loss,
)
from megatron_ds.training.logger import RunLogger
from megatron_ds.training.schedules import TOKEN_MEAN, LossFunc, forward_backward


@dataclass
class TrainResult:
    """What a run produced, for the caller (tests compare these across layouts)."""

    losses: list[float] = field(default_factory=list)
    """Global-batch mean loss of every step."""
    grad_norms: list[float] = field(default_factory=list)
    """Global gradient norm of every step, before clipping."""
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    """(iteration, validation loss) at each evaluation."""
    iteration: int = 0
    """Steps completed."""
    consumed_train_samples: int = 0
    """Training samples consumed across all DP ranks (the data position for a resume)."""


# The measured peak memory is logged after this many steps: the first step allocates the Adam
# moments' pages and the grad buckets; by the third the allocator has seen a whole steady step.
MEMORY_REPORT_STEP = 3


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: allocated CUDA memory, or the max RSS on CPU (Linux: KiB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _format_bytes(n: int) -> str:
    return f"{n / memory.GiB:.2f} GiB" if n >= memory.GiB else f"{n / 2**20:.1f} MiB"


class Trainer:
    """Trains ``model``: this rank's module, or its list of model chunks (interleaved pipeline)."""

    def __init__(self, cfg: Config, state: ParallelState, model: torch.nn.Module | list[torch.nn.Module], train_ds,
                 valid_ds=None, logger: RunLogger | None = None, loss_func: LossFunc = TOKEN_MEAN):
        self.cfg, self.state, self.model = cfg, state, model
        self.loss_func = loss_func  # token mean (pre-training, SFT) or a per-pair loss (DPO)
        self.model_chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.train_ds, self.valid_ds = train_ds, valid_ds
        t = cfg.training
        self.logger = logger or RunLogger(False, None, t.train_iters)
        # The optimizer re-points every p.data into its flat param buffer, so the model must already
        # be on its device. It owns the fp32 grad buffers, one per chunk: a chunk's last backward
        # comes at its own time in the interleaved schedule.
        self.optimizer = build_optimizer(t, self.model_chunks, state)
        self.grad_buffers = self.optimizer.grad_buffers
        self.schedule = LRSchedule.from_config(t)
        self.memory_estimate = memory.estimate_for_config(cfg, state.dp_size, state.pp_rank)
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * state.dp_size)
        # Throughput: model FLOPs per trained token (attention included, recompute not) against the
        # device's peak; TFLOP/s are per device, so the run's rate is divided by the world size.
        self.flops_per_token = flops.training_flops_per_token(cfg.model, t.seq_length)
        self.peak_tflops = t.peak_tflops or flops.device_peak_tflops(
            state.device, torch.bfloat16 if t.bf16 else torch.float32)
        self.num_devices = dist.get_world_size() if dist.is_initialized() else 1
        self.result = TrainResult()
        self.rng_tracker = None  # per-TP-rank RNG streams (parallel/random.py), set by the caller
        self.token_bytes: torch.Tensor | None = None  # [vocab] bytes per token id (set_tokenizer): bits-per-byte
        self.last_eval: EvalResult | None = None

    # -- data -------------------------------------------------------------------------------

    def data_source(self, dataset) -> str:
        """The flag (and files) ``dataset`` came from, as the user wrote them: for error messages."""
        d = self.cfg.data
        if d.mock_data:
            return "--mock-data"
        paths = d.data_path if isinstance(d.data_path, str) else " ".join(d.data_path or [])
        return f"--data-path {paths}".rstrip()

    def vocab_check(self, dataset) -> VocabCheck:
        """The check of ``dataset``'s token ids, run on each CPU micro-batch: against the tokenizer's
        ids when one was set for real data (validation scores bits-per-byte through its byte table),
        else against the model's vocabulary (--mock-data draws ids from all of it)."""
        if self.token_bytes is not None and not self.cfg.data.mock_data:
            return VocabCheck.of_tokenizer(len(self.token_bytes), self.cfg.data.tokenizer_model,
                                           self.data_source(dataset))
        return VocabCheck(self.cfg.model.vocab_size, self.data_source(dataset))

    def _batches(self, dataset, consumed: int, count: int):
        """Yield lists of ``num_microbatches`` collated micro-batches, ``count`` global batches."""
        return global_batches(dataset, self.state, self.cfg.training.micro_batch_size, self.num_microbatches,
                              count, consumed, vocab_check=self.vocab_check(dataset))

    def _global_tokens(self, micro_batches: list[dict]) -> float:
        return global_count(micro_batches, self.state, self.loss_func)

    def _reduce_loss(self, x: torch.Tensor) -> float:
        return reduce_loss(x, self.state)

    def _set_train(self, mode: bool) -> None:
        for c in self.model_chunks:
            c.train(mode)

    # -- steps ------------------------------------------------------------------------------

    def _forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """Zeroed main grads, then forward/backward of one global batch; the DP collectives of the
        last micro-batch may still be in flight (the optimizer's step waits for them)."""
        self._set_train(True)
        self.optimizer.zero_grad()
        tokens = self._global_tokens(micro_batches)
        return forward_backward(self.model_chunks, micro_batches, tokens, self.state, self.grad_buffers,
                                loss_func=self.loss_func)

    def forward_backward_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """Gradients of one global batch in every param's ``main_grad``, summed over DP and, for
        replicated params, over TP, without stepping; returns this rank's loss shares.

        For inspecting gradients (tests, benchmarks); ``train_step`` leaves the sync to the
        optimizer. Under ZeRO-1 only this rank's shard of each bucket is DP-summed (in the
        optimizer's shard, not in ``main_grad``).
        """
        local_loss = self._forward_backward(micro_batches)
        for buf in self.grad_buffers:
            buf.finish_grad_sync()
        for c in self.model_chunks:
            allreduce_tp_replicated_grads(c, self.state.tp_group)
        return local_loss

    def train_step(self, micro_batches: list[dict], iteration: int) -> tuple[float, float, float]:
        """One optimizer step; returns (global-batch loss, grad norm before clipping, LR)."""
        local_loss = self._forward_backward(micro_batches)
        lr = self.schedule(iteration)
        grad_norm = self.optimizer.step(lr)  # non-finite: the update was skipped
        return self._reduce_loss(local_loss), grad_norm, lr

    def log_memory(self, steps: int) -> None:
        """The estimate beside the measured peak of this rank (rank 0's log line)."""
        cuda = torch.device(self.state.device).type == "cuda"
        self.logger.info(f"memory per rank after {steps} step(s): measured peak "
                         f"{_format_bytes(peak_memory_bytes(self.state.device))} "
                         f"({'max allocated' if cuda else 'max RSS of the whole process'}) | "
                         f"estimate {_format_bytes(self.memory_estimate.total)}")

    def log_scalars(self, scalars: dict[str, float]) -> dict[str, float]:
        """The scalars of one --log-interval line (and TensorBoard); subclasses add theirs (DPO: rewards,
        preference accuracy) and may rename the loss."""
        return scalars

    def set_tokenizer(self, tokenizer) -> None:
        """Evaluations then also report bits-per-byte: the bytes of text each token stands for."""
        self.token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()).to(self.state.device)

    def log_validation(self, iteration: int, result: EvalResult) -> None:
        """The validation line and its TensorBoard scalars; DPO logs its own metrics instead."""
        bpb = result.bits_per_byte
        self.logger.info(f"validation at iter {iteration} | lm loss {result.loss:.4f} | ppl {result.perplexity:.2f}"
                         + (f" | bits per byte {bpb:.4f}" if bpb is not None else ""))
        self.logger.scalar("validation lm loss", result.loss, iteration)
        if bpb is not None:
            self.logger.scalar("validation bits per byte", bpb, iteration)

    def evaluate_dataset(self, dataset, num_batches: int) -> EvalResult:
        """Loss (and bits-per-byte when a tokenizer was set) over the first ``num_batches`` global batches."""
        return evaluate(self.model_chunks, self.state, self._batches(dataset, 0, num_batches),
                        token_bytes=self.token_bytes, loss_func=self.loss_func)

    def evaluate(self) -> float:
        """Validation loss over the first --eval-iters global batches of the validation split (the same
        batches every time, so successive evaluations are comparable); logs it with bits-per-byte."""
        t = self.cfg.training
        res = self.evaluate_dataset(self.valid_ds, min(t.eval_iters, len(self.valid_ds) // t.global_batch_size))
        self.last_eval = res
        return res.loss

    def train(self, start_iteration: int = 0, consumed_samples: int = 0, on_step=None) -> TrainResult:
        t = self.cfg.training
        res = self.result
        res.iteration, res.consumed_train_samples = start_iteration, consumed_samples
        tokens_per_step = t.global_batch_size * t.seq_length
        window_loss, window_steps, window_start = 0.0, 0, time.time()
        steps = t.train_iters - start_iteration
        self.logger.info(self.memory_estimate.summary())
        for micro_batches in self._batches(self.train_ds, consumed_samples, steps):
            loss, grad_norm, lr = self.train_step(micro_batches, res.iteration)
            res.iteration += 1
            res.consumed_train_samples += t.global_batch_size
            res.losses.append(loss)
            res.grad_norms.append(grad_norm)
            self.logger.progress(res.iteration, loss)
            if res.iteration - start_iteration == min(MEMORY_REPORT_STEP, steps):
                self.log_memory(res.iteration - start_iteration)
            window_loss += loss
            window_steps += 1
            if res.iteration % t.log_interval == 0 or res.iteration == t.train_iters:
                dt = time.time() - window_start
                self.logger.step(res.iteration, self.log_scalars({
                    "lm loss": window_loss / window_steps, "lr": lr, "grad norm": grad_norm,
                    **flops.throughput(self.flops_per_token, tokens_per_step * window_steps, max(dt, 1e-9),
                                       self.num_devices, self.peak_tflops),
                    "peak memory GiB": peak_memory_bytes(self.state.device) / memory.GiB,
                }))
                window_loss, window_steps, window_start = 0.0, 0, time.time()
            if self.valid_ds is not None and t.eval_interval > 0 and (
                    res.iteration % t.eval_interval == 0 or res.iteration == t.train_iters):
                val = self.evaluate()
                res.eval_losses.append((res.iteration, val))
                self.log_validation(res.iteration, self.last_eval)
                window_start = time.time()  # evaluation time is not training throughput
            if on_step is not None:
                on_step(res)  # may raise StopTraining, after a save that completed the params
        # ZeRO-1's last all-gather overlaps a forward that never comes: the params are whole from here.
        self.optimizer.finish_param_sync()
        return res
