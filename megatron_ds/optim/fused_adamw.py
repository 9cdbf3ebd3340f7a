"""Fused AdamW step over flat fp32 tensors: ``torch.ops.megatron_ds.fused_adamw_`` (csrc/kernels/
cpu/adamw.cpp, cuda/adamw.cu) with the pure-PyTorch reference beside it.

One pass reads param, grad, exp_avg and exp_avg_sq and writes param and both moments: on a
memory-bound update that is 7 fp32 streams instead of the ~20 an unfused sequence of
elementwise ops moves. The arithmetic is torch.optim.AdamW's, in its order:

    p *= 1 - lr wd;  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

If the extension is not built, ``fused_adamw_`` runs the reference and warns once.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings

import torch

_state = {"loaded": None, "warned": False}


def _load() -> bool:
    if _state["loaded"] is None:
        try:
            try:
                importlib.import_module("megatron_ds._C_kernels")
            except ImportError:
                # A build without a Python module init: load the shared library for its op registrations.
                spec = importlib.util.find_spec("megatron_ds._C_kernels")
                if spec is None or spec.origin is None:
                    raise
                torch.ops.load_library(spec.origin)
            if torch.cuda.is_available():
                try:
                    importlib.import_module("megatron_ds._C_kernels_cuda")
                except ImportError:
                    pass  # CUDA tensors then take the reference (has_kernel below says so)
            _state["loaded"] = hasattr(torch.ops.megatron_ds, "fused_adamw_")
        except (ImportError, OSError):
            _state["loaded"] = False
    return _state["loaded"]


def has_kernel(device: torch.device) -> bool:
    """True when a compiled fused_adamw_ exists for ``device``'s type."""
    if not _load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("megatron_ds::fused_adamw_", key)


def adamw_reference_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """The same update from torch ops (several passes); what the fused kernel is tested against."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def fused_adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                 use_kernel: bool = True) -> None:
    """AdamW in place on contiguous fp32 tensors of one size; ``step`` counts from 1."""
    if use_kernel and has_kernel(param.device):
        torch.ops.megatron_ds.fused_adamw_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                                           step)
        return
    if use_kernel and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"megatron_ds: no compiled fused AdamW for {param.device.type} (build with "
                      "`pip install --no-build-isolation -e .`); using the PyTorch reference")
    adamw_reference_(param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, step=step)
