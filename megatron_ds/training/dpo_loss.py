"""Direct Preference Optimization on the last pipeline stage, as a ``schedules.LossFunc``.

A micro-batch of b preference pairs is 2b rows: rows [0, b) hold prompt + chosen response, rows
[b, 2b) prompt + rejected response (pair i is rows i and b + i), so a pair never straddles a
micro-batch or a DP rank. ``loss_mask`` is 1 on the labels that are response tokens. From the model's
per-token loss (-log p of each label) the log-probability of a response is

    logp(y | x) = -sum_t token_loss[t] * loss_mask[t]

and with the frozen reference model's ``ref_logps`` (the same quantity, put into the micro-batch by
the reference pass) the implicit reward of a response is beta * (logp - ref_logp), and per pair

    m = (logp_c - ref_c) - (logp_r - ref_r)
    sigmoid (DPO, Rafailov et al. 2023), conservative with label smoothing e (cDPO):
        loss = -(1 - e) * logsigmoid(beta * m) - e * logsigmoid(-beta * m)
    ipo (Azar et al. 2023): loss = (m - 1 / (2 * beta))^2, with every logp the *mean* over the
        response's tokens instead of the sum (as the IPO paper and TRL do; otherwise the target
        margin 1/(2 beta) would mean something different for every response length).

The global loss is the mean over every pair of the global batch; each micro-batch back-propagates
sum(its pair losses) / global_pairs, so gradients add up over micro-batches and DP ranks exactly
like the token mean of pre-training does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")

# What DPOLoss accumulates per step (sums over this rank's pairs; divided by the pair count to log).
METRICS = ("loss", "reward margin", "preference accuracy", "chosen logps", "rejected logps",
           "chosen reward", "rejected reward")


def sequence_logps(token_loss: torch.Tensor, loss_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """[rows, s] per-token -log p and response mask -> [rows] log p of each response (sum, or mean over tokens)."""
    logps = -(token_loss.float() * loss_mask).sum(-1)
    if average:
        logps = logps / loss_mask.sum(-1).clamp_min(1)
    return logps


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                    ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (losses, chosen rewards, rejected rewards), each [pairs]; rewards are detached."""
    chosen_reward = beta * (chosen_logps - ref_chosen_logps)
    rejected_reward = beta * (rejected_logps - ref_rejected_logps)
    m = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * m) - label_smoothing * F.logsigmoid(-beta * m)
    elif loss_type == "ipo":
        losses = (m - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"--dpo-loss-type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    return losses, chosen_reward.detach(), rejected_reward.detach()


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2b, ...] rows -> (chosen [b, ...], rejected [b, ...])."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


class DPOLoss:
    """The per-pair preference loss; also sums this rank's metrics (``sums``, see METRICS + pairs)
    over the calls of a step, for the trainer to reduce and log."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"--dpo-loss-type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.sums: torch.Tensor | None = None  # fp64 [len(METRICS) + 1] on the model's device, after a call

    def reset(self) -> None:
        self.sums = None

    def count(self, micro_batch: dict) -> torch.Tensor:
        rows = micro_batch["tokens"].shape[0]
        return torch.tensor(float(rows // 2), device=micro_batch["tokens"].device)

    def __call__(self, token_loss: torch.Tensor, micro_batch: dict, global_count: float) -> torch.Tensor:
        if "ref_logps" not in micro_batch:
            raise RuntimeError("DPOLoss needs the reference log-probs in micro_batch['ref_logps'] (the reference pass)")
        mask = micro_batch["loss_mask"]
        average = self.loss_type == "ipo"
        logps = sequence_logps(token_loss, mask, average)  # [2b]
        ref = micro_batch["ref_logps"].to(logps)
        if average:  # the reference pass records sums; IPO compares per-token means
            ref = ref / mask.sum(-1).clamp_min(1)
        (pc, pr), (rc, rr) = split_pairs(logps), split_pairs(ref)
        losses, chosen_reward, rejected_reward = preference_loss(pc, pr, rc, rr, self.beta, self.loss_type,
                                                                 self.label_smoothing)
        with torch.no_grad():
            step = torch.stack([
                losses.sum(), (chosen_reward - rejected_reward).sum(), (chosen_reward > rejected_reward).float().sum(),
                pc.sum(), pr.sum(), chosen_reward.sum(), rejected_reward.sum(), pc.new_tensor(float(pc.shape[0]))])
            self.sums = step.double() if self.sums is None else self.sums + step.double()
        return losses.sum() / global_count


class ReferenceLogps:
    """The reference model's pass: records ``micro_batch['ref_logps']`` [2b] (summed log p of each
    response, no grad) and contributes nothing to any loss."""

    def count(self, micro_batch: dict) -> torch.Tensor:
        return torch.zeros((), device=micro_batch["tokens"].device)

    def __call__(self, token_loss: torch.Tensor, micro_batch: dict, global_count: float) -> torch.Tensor:
        micro_batch["ref_logps"] = sequence_logps(token_loss.detach(), micro_batch["loss_mask"])
        return token_loss.new_zeros((), dtype=torch.float32)
