"""The training loop: global batches of micro-batches, DP gradient sync, clipping, AdamW, eval, logs.

One step:
  1. this DP rank takes its micro-batches of the global batch (Megatron's sampler order);
  2. the global token count is all-reduced over DP so every rank divides by the same number
     (every pipeline stage reads the batch, so each knows it);
  3. forward/backward per micro-batch in the layout's schedule (no pipelining, 1F1B, or
     interleaved 1F1B over this rank's model chunks); grads accumulate in fp32 main-grad
     buckets, one buffer per chunk, whose DP all-reduce starts during the chunk's last backward;
  4. grads of TP-replicated params (norms under SP, replicated KV heads) are summed over TP;
  5. the global grad norm is clipped, then AdamW steps with the scheduled LR.

The loss lives on the last pipeline stage; it is summed over DP there and broadcast over the
pipeline group, so every rank logs and returns the same number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_ds.config import Config
from megatron_ds.data.sampler import MegatronPretrainingSampler, collate
from megatron_ds.optim.lr_schedule import LRSchedule
from megatron_ds.optim.optimizer import build_adamw, clip_main_grads, global_grad_norm, optimizer_step
from megatron_ds.parallel.grad_buffer import GradBuffer
from megatron_ds.parallel.layers import allreduce_tp_replicated_grads
from megatron_ds.parallel.topology import ParallelState, group_size
from megatron_ds.training.logger import RunLogger
from megatron_ds.training.schedules import forward_backward


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


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """Trains ``model``: this rank's module, or its list of model chunks (interleaved pipeline)."""

    def __init__(self, cfg: Config, state: ParallelState, model: torch.nn.Module | list[torch.nn.Module], train_ds,
                 valid_ds=None, logger: RunLogger | None = None):
        self.cfg, self.state, self.model = cfg, state, model
        self.model_chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.train_ds, self.valid_ds = train_ds, valid_ds
        t = cfg.training
        self.logger = logger or RunLogger(False, None, t.train_iters)
        chunks = torch.nn.ModuleList(self.model_chunks)  # parameter order = model.parameters() for one chunk
        self.params = [p for p in chunks.parameters() if p.requires_grad]
        bucket_numel = int(t.bucket_size_mb * 1024 * 1024 / 4)
        # One buffer per chunk: a chunk's last backward comes at its own time in the interleaved schedule.
        self.grad_buffers = [GradBuffer([p for p in c.parameters() if p.requires_grad], state.dp_group,
                                        bucket_size=bucket_numel) for c in self.model_chunks]
        self.optimizer = build_adamw(chunks, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps)
        self.schedule = LRSchedule(lr=t.lr, min_lr=t.min_lr, warmup_iters=t.lr_warmup_iters,
                                   decay_iters=t.lr_decay_iters or t.train_iters, style=t.lr_decay_style)
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * state.dp_size)
        self.result = TrainResult()
        self.rng_tracker = None  # per-TP-rank RNG streams (parallel/random.py), set by the caller

    # -- data -------------------------------------------------------------------------------

    def _batches(self, dataset, consumed: int, count: int):
        """Yield lists of ``num_microbatches`` collated micro-batches, ``count`` global batches."""
        t, s = self.cfg.training, self.state
        sampler = MegatronPretrainingSampler(
            total_samples=len(dataset), consumed_samples=consumed, micro_batch_size=t.micro_batch_size,
            data_parallel_rank=s.dp_rank, data_parallel_size=s.dp_size)
        it = iter(sampler)
        for _ in range(count):
            yield [_to_device(collate([dataset[i] for i in next(it)]), s.device) for _ in range(self.num_microbatches)]

    def _global_tokens(self, micro_batches: list[dict]) -> float:
        n = torch.stack([mb["loss_mask"].sum() for mb in micro_batches]).sum().float()
        if group_size(self.state.dp_group) > 1:
            dist.all_reduce(n, group=self.state.dp_group)
        return max(n.item(), 1.0)

    def _reduce_loss(self, x: torch.Tensor) -> float:
        """This rank's loss shares -> the global-batch loss on every rank: SUM over DP (on the last
        stage, the only one with shares), then broadcast from the last stage over the pipeline."""
        x = x.to(self.state.device)
        if group_size(self.state.dp_group) > 1:
            dist.all_reduce(x, group=self.state.dp_group)
        if group_size(self.state.pp_group) > 1:
            dist.broadcast(x, src=self.state.pp_ranks[-1], group=self.state.pp_group)
        return x.item()

    def _set_train(self, mode: bool) -> None:
        for c in self.model_chunks:
            c.train(mode)

    # -- steps ------------------------------------------------------------------------------

    def forward_backward_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """Gradients of one global batch in every param's ``main_grad`` (summed over DP and, for
        replicated params, over TP); returns this rank's loss shares."""
        self._set_train(True)
        for buf in self.grad_buffers:
            buf.zero_grad()
        tokens = self._global_tokens(micro_batches)
        local_loss = forward_backward(self.model_chunks, micro_batches, tokens, self.state, self.grad_buffers)
        for buf in self.grad_buffers:
            buf.finish_grad_sync()
        for c in self.model_chunks:
            allreduce_tp_replicated_grads(c, self.state.tp_group)
        return local_loss

    def train_step(self, micro_batches: list[dict], iteration: int) -> tuple[float, float, float]:
        local_loss = self.forward_backward_step(micro_batches)
        grad_norm = global_grad_norm(self.params, self.state)
        clip_main_grads(self.params, self.cfg.training.clip_grad, grad_norm)
        lr = self.schedule(iteration)
        optimizer_step(self.optimizer, self.params, lr)
        return self._reduce_loss(local_loss), grad_norm, lr

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first --eval-iters global batches of the validation split.

        The same batches every time, so successive evaluations are comparable.
        """
        self._set_train(False)
        t = self.cfg.training
        total, count = 0.0, 0
        for micro_batches in self._batches(self.valid_ds, 0, min(t.eval_iters, len(self.valid_ds) // t.global_batch_size)):
            tokens = self._global_tokens(micro_batches)
            total += self._reduce_loss(forward_backward(self.model_chunks, micro_batches, tokens, self.state,
                                                        forward_only=True))
            count += 1
        self._set_train(True)
        return total / max(count, 1)

    def train(self, start_iteration: int = 0, consumed_samples: int = 0, on_step=None) -> TrainResult:
        t = self.cfg.training
        res = self.result
        res.iteration, res.consumed_train_samples = start_iteration, consumed_samples
        tokens_per_step = t.global_batch_size * t.seq_length
        window_loss, window_steps, window_start = 0.0, 0, time.time()
        steps = t.train_iters - start_iteration
        for micro_batches in self._batches(self.train_ds, consumed_samples, steps):
            loss, grad_norm, lr = self.train_step(micro_batches, res.iteration)
            res.iteration += 1
            res.consumed_train_samples += t.global_batch_size
            res.losses.append(loss)
            res.grad_norms.append(grad_norm)
            window_loss += loss
            window_steps += 1
            if res.iteration % t.log_interval == 0 or res.iteration == t.train_iters:
                dt = time.time() - window_start
                self.logger.step(res.iteration, {
                    "lm loss": window_loss / window_steps, "lr": lr, "grad norm": grad_norm,
                    "tokens/s": tokens_per_step * window_steps / max(dt, 1e-9),
                })
                window_loss, window_steps, window_start = 0.0, 0, time.time()
            if self.valid_ds is not None and t.eval_interval > 0 and (
                    res.iteration % t.eval_interval == 0 or res.iteration == t.train_iters):
                val = self.evaluate()
                res.eval_losses.append((res.iteration, val))
                self.logger.info(f"validation at iter {res.iteration} | lm loss {val:.4f}")
                self.logger.scalar("validation lm loss", val, res.iteration)
                window_start = time.time()  # evaluation time is not training throughput
            if on_step is not None:
                on_step(res)
        return res
