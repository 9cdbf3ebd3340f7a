"""Evaluation: the loss of a model over fixed batches of a dataset, in nats per token and in bits per byte.

Shared by the trainer (validation at --eval-interval) and tools/evaluate.py (a checkpoint on one or
more datasets). Collective over the world: every rank runs its pipeline stage's forward over its DP
share of each global batch, and every rank returns the same numbers.

bits-per-byte = (sum of -ln p over the predicted tokens) / ln 2 / (UTF-8 bytes those tokens stand for).
It does not depend on the tokenizer, so models with different vocabularies compare (the paper's
metric for its scaling-law fits). The bytes come from ``Tokenizer.token_byte_lengths``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_ds.data.errors import DataError
from megatron_ds.data.sampler import MegatronPretrainingSampler, collate
from megatron_ds.parallel.topology import ParallelState, group_size
from megatron_ds.training.schedules import TOKEN_MEAN, LossFunc, forward_backward


@dataclass
class EvalResult:
    """One evaluation over a fixed set of batches."""

    loss: float
    """Mean loss per predicted token (nats), over all the global batches."""
    tokens: int
    """Predicted (loss-masked) tokens."""
    num_bytes: Optional[int] = None
    """UTF-8 bytes of text those tokens stand for; None without a tokenizer."""

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bits_per_byte(self) -> Optional[float]:
        if not self.num_bytes:
            return None
        return self.loss * self.tokens / math.log(2) / self.num_bytes


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass(frozen=True)
class VocabCheck:
    """Token ids of a CPU batch against the model's vocabulary, before the batch reaches the model.

    An id past the vocabulary (data binarized with a larger tokenizer) raises IndexError in the
    embedding at TP 1, and at TP > 1 the vocab-parallel embedding masks it to a zero row and trains
    on garbage without a word; here it is one DataError. A max over the batch in numpy: no device
    work, no sync.
    """

    vocab_size: int
    """The model's vocabulary (before padding): ids must be in [0, vocab_size)."""
    source: str
    """Where the ids came from, as the user named it: '--data-path data/web_text_document'."""
    fix: str = ("use data binarized with a tokenizer that fits the model (--tokenizer-model), or pass "
                "--vocab-size {needed} or more")
    """What to do; ``{needed}`` is the smallest vocabulary that holds the offending id."""
    vocabulary: str = "the model's vocabulary of {vocab_size} (--vocab-size)"
    """How the message names the vocabulary (tools/evaluate.py: the checkpoint's, which no flag sets)."""

    @classmethod
    def of_tokenizer(cls, vocab_size: int, tokenizer_path: str, source: str) -> "VocabCheck":
        """Against the tokenizer's ids: an id past them is data binarized with another tokenizer,
        which no --vocab-size mends (and has no bytes in the bits-per-byte table)."""
        return cls(vocab_size, source, vocabulary=f"--tokenizer-model {tokenizer_path}'s {{vocab_size}} tokens",
                   fix="it was binarized with another tokenizer: pass that one, or re-binarize the text with "
                       "tools/preprocess_data.py")

    def __call__(self, batch: dict, state: Optional[ParallelState] = None) -> None:
        for key in ("tokens", "labels"):
            x = batch.get(key)
            if x is None or x.numel() == 0:
                continue
            hi = int(x.numpy().max())
            if hi >= self.vocab_size:
                err = DataError(f"{self.source}: token id {hi} is outside "
                                f"{self.vocabulary.format(vocab_size=self.vocab_size)}; {self.fix.format(needed=hi + 1)}")
                # Every rank of a model replica reads the same samples and raises together; with DP > 1
                # another replica may not, so rank 0 may never see it: the replica's first rank says it.
                err.report_on_this_rank = (state is not None and state.dp_size > 1
                                           and state.tp_rank == 0 and state.pp_rank == 0)
                raise err


def global_batches(dataset, state: ParallelState, micro_batch_size: int, num_microbatches: int, count: int,
                   consumed: int = 0, collate_fn=collate,
                   vocab_check: Optional[VocabCheck] = None) -> Iterator[list[dict]]:
    """``count`` global batches from sample ``consumed`` on: each a list of this DP rank's
    ``num_microbatches`` micro-batches, ``collate_fn`` of their samples (Megatron's sampler order; DPO
    collates a pair into two rows), on the rank's device. ``vocab_check`` sees each micro-batch on
    the CPU first (a DataError for a token id past the model's vocabulary)."""
    sampler = MegatronPretrainingSampler(total_samples=len(dataset), consumed_samples=consumed,
                                         micro_batch_size=micro_batch_size, data_parallel_rank=state.dp_rank,
                                         data_parallel_size=state.dp_size)
    it = iter(sampler)

    def micro_batch() -> dict:
        batch = collate_fn([dataset[i] for i in next(it)])
        if vocab_check is not None:
            vocab_check(batch, state)
        return to_device(batch, state.device)

    for _ in range(count):
        yield [micro_batch() for _ in range(num_microbatches)]


def global_count(micro_batches: list[dict], state: ParallelState, loss_func: LossFunc = TOKEN_MEAN) -> float:
    """The loss denominator of one global batch (tokens, or pairs for DPO), summed over DP."""
    n = torch.stack([loss_func.count(mb) for mb in micro_batches]).sum().float()
    if group_size(state.dp_group) > 1:
        dist.all_reduce(n, group=state.dp_group)
    return max(n.item(), 1.0)


def reduce_from_last_stage(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Sums that only the last stage computes -> their global values on every rank: SUM over DP,
    then broadcast from the last stage over the pipeline (in place on ``x``, on the rank's device)."""
    x = x.to(state.device)
    if group_size(state.dp_group) > 1:
        dist.all_reduce(x, group=state.dp_group)
    if group_size(state.pp_group) > 1:
        dist.broadcast(x, src=state.pp_ranks[-1], group=state.pp_group)
    return x


def reduce_loss(x: torch.Tensor, state: ParallelState) -> float:
    """This rank's loss shares -> the global-batch loss on every rank."""
    return reduce_from_last_stage(x, state).item()


@torch.no_grad()
def evaluate(model_chunks: Sequence[torch.nn.Module], state: ParallelState, batches, *,
             token_bytes: Optional[torch.Tensor] = None, loss_func: LossFunc = TOKEN_MEAN) -> EvalResult:
    """Loss over ``batches`` (global batches from ``global_batches``), the exact token mean over all of
    them, and bits-per-byte when ``token_bytes`` ([vocab] int, bytes per token id) is given."""
    chunks = list(model_chunks)
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    nats, tokens, num_bytes = 0.0, 0.0, 0
    for micro_batches in batches:
        count = global_count(micro_batches, state, loss_func)
        loss = reduce_loss(forward_backward(chunks, micro_batches, count, state, forward_only=True,
                                            loss_func=loss_func), state)
        nats += loss * count
        tokens += count
        if token_bytes is not None:
            # Every stage holds the labels: bytes of the predicted (loss-masked) tokens, summed over DP.
            b = torch.zeros((), dtype=torch.float64, device=state.device)
            for mb in micro_batches:
                b += (token_bytes[mb["labels"]] * mb["loss_mask"]).sum()
            if group_size(state.dp_group) > 1:
                dist.all_reduce(b, group=state.dp_group)
            num_bytes += int(b.item())
    for c, mode in zip(chunks, modes):
        c.train(mode)
    return EvalResult(loss=nats / max(tokens, 1.0), tokens=int(tokens),
                      num_bytes=num_bytes if token_bytes is not None else None)
