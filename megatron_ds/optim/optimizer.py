"""AdamW over fp32 main gradients, with the global gradient norm clipped across every rank."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_ds.parallel.topology import ParallelState, group_size


def is_tp_replicated(param: torch.nn.Parameter, state: ParallelState) -> bool:
    """True when every TP rank holds the same copy (norm weights, replicated KV): counted once."""
    return state.tp_size > 1 and not getattr(param, "tensor_model_parallel", False)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: the paper's recipe leaves norm weights (1-D) undecayed.

    ``model`` is a module or a list of model chunks (interleaved pipeline)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    decay, no_decay = [], []
    for p in (p for c in chunks for p in c.parameters()):
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay)]
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0))
    return groups


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas, eps: float) -> torch.optim.AdamW:
    # foreach=True: one fused multi-tensor pass per group instead of a Python loop over params.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=True)


def global_grad_norm(params: list[torch.nn.Parameter], state: ParallelState) -> float:
    """L2 norm of the gradient of the whole model, the same number on every rank.

    sum of squares over this rank's shards (replicated params counted on TP rank 0 only), summed
    over the model-parallel group (tp x pp). DP ranks hold identical grads after the all-reduce,
    so no reduction over DP.
    """
    device = params[0].main_grad.device if params else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        if is_tp_replicated(p, state) and state.tp_rank != 0:
            continue
        sq += p.main_grad.float().pow(2).sum()
    if group_size(state.mp_group) > 1:
        dist.all_reduce(sq, group=state.mp_group)
    return math.sqrt(sq.item())


def clip_main_grads(params: list[torch.nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale main grads so that their global norm is at most ``max_norm`` (torch's 1e-6 guard)."""
    if max_norm <= 0:
        return
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_([p.main_grad for p in params], coef)


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], lr: float) -> None:
    """AdamW step reading the fp32 main grads (params are fp32 in this path)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    for p in params:
        p.grad = p.main_grad if p.main_grad.dtype == p.dtype else p.main_grad.to(p.dtype)
    optimizer.step()
    for p in params:
        p.grad = None
