"""The DPO trainer: the pre-training loop with a per-pair loss and a frozen reference model.

Each step, for the global batch of preference pairs:
  1. (on the fly) the reference model runs a forward-only pass of the layout's pipeline schedule
     over this rank's micro-batches; its last stage writes ``ref_logps`` [2b] into each micro-batch;
     or (``precompute_reference``) those numbers were computed once, before training, for every
     pair, and come with the data, and the reference model is gone;
  2. the policy's forward/backward runs as in pre-training, with ``DPOLoss`` on the last stage;
  3. the metrics DPOLoss summed on the last stage are summed over DP and broadcast over the
     pipeline, so rank 0 logs global numbers.

The reference model is built like the policy (same TP/PP layout, same chunks), loaded from the
checkpoint the caller gives, set to eval mode and requires_grad False; it is not handed to the
optimizer, so nothing ever writes to it.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from typing import Optional, Sequence

import torch

from megatron_ds import memory
from megatron_ds.config import Config
from megatron_ds.data.dpo_dataset import DPODataset, collate_pairs
from megatron_ds.parallel.topology import ParallelState
from megatron_ds.training.dpo_loss import METRICS, DPOLoss, ReferenceLogps
from megatron_ds.training.logger import RunLogger
from megatron_ds.training.evaluation import EvalResult, VocabCheck, global_batches, reduce_from_last_stage
from megatron_ds.training.evaluation import to_device as _to_device
from megatron_ds.training.schedules import forward_backward
from megatron_ds.training.trainer import Trainer

_PAIRS = len(METRICS)  # index of the pair count in the metric sums


def freeze(model_chunks: Sequence[torch.nn.Module]) -> None:
    """Eval mode and no gradients, for a model that only ever runs forward."""
    for chunk in model_chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)


class DPOTrainer(Trainer):
    """Trains the policy ``model`` on DPODataset pairs against ``reference`` (this rank's chunks of the
    frozen reference model, or None once ``precompute_reference`` has run)."""

    def __init__(self, cfg: Config, state: ParallelState, model, train_ds: DPODataset, valid_ds=None,
                 logger: Optional[RunLogger] = None, reference=None):
        d = cfg.dpo
        super().__init__(cfg, state, model, train_ds, valid_ds, logger,
                         loss_func=DPOLoss(d.dpo_beta, d.dpo_loss_type, d.dpo_label_smoothing))
        self.reference_chunks = None
        if reference is not None:
            self.reference_chunks = list(reference) if isinstance(reference, (list, tuple)) else [reference]
            freeze(self.reference_chunks)
        # The loop counts global_batch_size x seq_length tokens a step, one sequence per sample; a pair is
        # two, each trained (3 forwards' worth of FLOPs), and the reference adds one forward of each.
        self._train_flops_per_token = self.flops_per_token
        self.flops_per_token = self._train_flops_per_token * 2 * (1 + (1 / 3 if reference is not None else 0))
        # The memory estimate of what a DPO micro-batch is (2 x --micro-batch-size rows), with the frozen
        # reference's weights (the policy's dtype and layout) while it is resident; its forward keeps no
        # activations.
        rows_cfg = copy.deepcopy(cfg)
        rows_cfg.training.micro_batch_size *= 2
        self._policy_memory = memory.estimate_for_config(rows_cfg, state.dp_size, state.pp_rank)
        self.memory_estimate = dataclasses.replace(
            self._policy_memory, params=self._policy_memory.params * (2 if reference is not None else 1))
        self.last_metrics: dict[str, float] = {}
        """The global metrics of the last step (or evaluation): METRICS, each a mean over pairs."""
        self._window = torch.zeros(len(METRICS) + 1, dtype=torch.float64)
        self.valid_metrics: list[tuple[int, dict[str, float]]] = []

    # -- data -------------------------------------------------------------------------------

    def data_source(self, dataset) -> str:
        d = self.cfg.dpo
        return f"--dpo-valid-data {d.dpo_valid_data}" if dataset is self.valid_ds else f"--dpo-data {d.dpo_data}"

    def vocab_check(self, dataset) -> VocabCheck:
        return VocabCheck(self.cfg.model.vocab_size, self.data_source(dataset),
                          fix=f"--tokenizer-model {self.cfg.data.tokenizer_model} gives ids past it; pass a "
                              f"tokenizer that fits the model or --vocab-size {{needed}} or more")

    def _batches(self, dataset, consumed: int, count: int):
        """Like Trainer._batches, a sample being one pair: micro-batches of 2 x --micro-batch-size rows."""
        return global_batches(dataset, self.state, self.cfg.training.micro_batch_size, self.num_microbatches,
                              count, consumed, collate_fn=collate_pairs, vocab_check=self.vocab_check(dataset))

    # -- the reference model ----------------------------------------------------------------

    @torch.no_grad()
    def reference_logps(self, micro_batches: list[dict]) -> None:
        """Forward-only pipeline pass of the reference model: ``ref_logps`` [2b] into each micro-batch
        (on the last stage, the only one that reads them)."""
        if self.reference_chunks is None:
            if "ref_logps" not in micro_batches[0]:
                raise RuntimeError("the reference model was freed, but the batch has no precomputed ref_logps")
            return
        forward_backward(self.reference_chunks, micro_batches, 1.0, self.state, forward_only=True,
                         loss_func=ReferenceLogps())

    @torch.no_grad()
    def precompute_reference(self, datasets: Sequence[Optional[DPODataset]]) -> None:
        """One forward-only pass of the reference model over every pair of ``datasets``: each pair's
        (chosen, rejected) reference log-probs are kept with the pairs (``pairs.ref_logps`` [n, 2]),
        then the reference model is freed.

        DP rank r takes its slice of each block of micro_batch_size x DP pairs (the sampler's order),
        padded at the end by repeating pair 0 (whose result is dropped); the last stage fills its
        pairs' rows of an [n, 2] table that a SUM over DP completes (each row has one writer)."""
        if self.reference_chunks is None:
            return
        t, s = self.cfg.training, self.state
        mbs = t.micro_batch_size
        for ds in datasets:
            if ds is None or ds.pairs.ref_logps is not None:
                continue
            pairs = ds.pairs
            n = len(pairs)
            check = self.vocab_check(ds)
            table = torch.zeros(n, 2, dtype=torch.float32, device=s.device)
            block = mbs * s.dp_size
            ids = list(range(0, n))
            ids += [-1] * (-n % (block * self.num_microbatches))  # padding slots: whole steps of whole blocks
            mine = [ids[k + s.dp_rank * mbs: k + (s.dp_rank + 1) * mbs] for k in range(0, len(ids), block)]
            for start in range(0, len(mine), self.num_microbatches):
                group = mine[start:start + self.num_microbatches]
                micro_batches = []
                for g in group:
                    batch = collate_pairs([pairs.item(max(i, 0)) for i in g])
                    check(batch, s)
                    micro_batches.append(_to_device(batch, s.device))
                self.reference_logps(micro_batches)
                if "ref_logps" not in micro_batches[0]:
                    continue  # not the last stage
                for g, mb in zip(group, micro_batches):
                    idx = torch.tensor(g, device=s.device)
                    keep = idx >= 0
                    chosen, rejected = mb["ref_logps"].view(2, -1)
                    table[idx[keep], 0], table[idx[keep], 1] = chosen[keep], rejected[keep]
            table = reduce_from_last_stage(table, s)
            pairs.ref_logps = table.cpu().numpy()
        self.reference_chunks = None
        self.flops_per_token = self._train_flops_per_token * 2
        self.memory_estimate = self._policy_memory
        gc.collect()
        if torch.device(s.device).type == "cuda":
            torch.cuda.empty_cache()

    # -- steps ------------------------------------------------------------------------------

    def _forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        self.reference_logps(micro_batches)
        self.loss_func.reset()
        return super()._forward_backward(micro_batches)

    def _global_metrics(self) -> torch.Tensor:
        """This step's metric sums (METRICS + pair count) over the global batch, on every rank."""
        sums = self.loss_func.sums
        x = (torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=self.state.device) if sums is None
             else sums.to(self.state.device))
        return reduce_from_last_stage(x, self.state).cpu()

    @staticmethod
    def _means(sums: torch.Tensor) -> dict[str, float]:
        n = max(sums[_PAIRS].item(), 1.0)
        return {name: sums[i].item() / n for i, name in enumerate(METRICS)}

    def train_step(self, micro_batches: list[dict], iteration: int) -> tuple[float, float, float]:
        loss, grad_norm, lr = super().train_step(micro_batches, iteration)
        sums = self._global_metrics()
        self._window += sums
        self.last_metrics = self._means(sums)
        return loss, grad_norm, lr

    def log_scalars(self, scalars: dict[str, float]) -> dict[str, float]:
        """The loss under its own name, then the window's mean DPO metrics, then lr, grad norm, throughput.
        tokens/s counts both sequences of a pair (padding included); TFLOP/s and MFU include the reference's
        forward when it runs every step."""
        scalars = dict(scalars)
        means, self._window = self._means(self._window), torch.zeros_like(self._window)
        out = {f"{self.loss_func.loss_type if self.loss_func.loss_type == 'ipo' else 'dpo'} loss":
               scalars.pop("lm loss", means["loss"])}
        out.update({k: v for k, v in means.items() if k != "loss"})
        if "tokens/s" in scalars:
            scalars["tokens/s"] *= 2
        out.update(scalars)
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean DPO loss over the first --eval-iters global batches of the validation pairs; the
        validation preference accuracy and reward margin are logged beside it."""
        self._set_train(False)
        t = self.cfg.training
        total = torch.zeros(len(METRICS) + 1, dtype=torch.float64)
        for micro_batches in self._batches(self.valid_ds, 0, min(t.eval_iters, len(self.valid_ds) // t.global_batch_size)):
            self.reference_logps(micro_batches)
            self.loss_func.reset()
            pairs = self._global_tokens(micro_batches)
            forward_backward(self.model_chunks, micro_batches, pairs, self.state, forward_only=True,
                             loss_func=self.loss_func)
            total += self._global_metrics()
        self.loss_func.reset()
        self._set_train(True)
        means = self._means(total)
        self.valid_metrics.append((self.result.iteration, means))
        self.last_eval = EvalResult(loss=means["loss"], tokens=int(total[_PAIRS].item()))  # no bits-per-byte
        return means["loss"]

    def log_validation(self, iteration: int, result: EvalResult) -> None:
        """One line: the DPO loss, preference accuracy and reward margin of the validation pairs."""
        means = self.valid_metrics[-1][1]
        self.logger.info(f"validation at iter {iteration} | dpo loss {result.loss:.4f} | preference accuracy "
                         f"{means['preference accuracy']:.4f} | reward margin {means['reward margin']:.4f}")
        self.logger.scalar("validation dpo loss", result.loss, iteration)
        for k in ("preference accuracy", "reward margin"):
            self.logger.scalar(f"validation {k}", means[k], iteration)
