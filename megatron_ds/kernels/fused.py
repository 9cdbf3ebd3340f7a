"""The compiled kernels of csrc/ as autograd-aware PyTorch functions, each matching a reference.

The operators live in ``torch.ops.megatron_ds`` and come from two extensions built at install:
``megatron_ds._C_kernels`` (CPU; it also defines every schema) and ``megatron_ds._C_kernels_cuda``
(CUDA implementations of the same names, where torch has CUDA). Here we load them once, register
their fake (meta) implementations so meta tensors and ``torch.compile`` can trace them, and their
autograd formulas (``torch.library.register_autograd`` for the functional ops; a small
``autograd.Function`` for the two that write in place).

Nothing is compiled at run time: if the extension is missing, ``available()`` is False, a single
warning says why, and ``megatron_ds.kernels.select_kernels`` hands out the references.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

_loaded: Optional[bool] = None
_load_error = ""


def available() -> bool:
    """True when the CPU extension (and so every schema) is loaded; loads it on first call."""
    global _loaded, _load_error
    if _loaded is None:
        try:
            importlib.import_module("megatron_ds._C_kernels")
            if torch.cuda.is_available():
                try:
                    importlib.import_module("megatron_ds._C_kernels_cuda")
                except ImportError as e:  # CPU kernels still work; CUDA tensors fall back per op
                    warnings.warn(f"megatron_ds: CUDA kernels not built ({e}); CUDA tensors use the references")
            _register_fake_and_autograd()
            _loaded = True
        except (ImportError, OSError) as e:
            _loaded, _load_error = False, str(e)
    return _loaded


def unavailable_reason() -> str:
    return _load_error


def has_device_kernels(device=None) -> bool:
    """Whether the loaded extensions have kernels for ``device`` (None, CPU, meta: yes; CUDA: if built)."""
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type in ("cpu", "meta"):  # meta: the fake implementations registered below
        return True
    if device_type == "cuda":
        return torch._C._dispatch_has_kernel_for_dispatch_key("megatron_ds::rms_norm_fwd", "CUDA")
    return False


def ops():
    """``torch.ops.megatron_ds``, loading the extension first; raises if it was not built."""
    if not available():
        raise RuntimeError(f"megatron_ds._C_kernels is not built ({_load_error}); reinstall with "
                           "`pip install --no-build-isolation -e .`, or use the references (--no-fused-kernels)")
    return torch.ops.megatron_ds


# ---------------------------------------------------------------------------------------------
# Registration: fake (shape-only) implementations and autograd formulas.


def _register_fake_and_autograd() -> None:
    lib = "megatron_ds"

    @torch.library.register_fake(f"{lib}::rms_norm_fwd")
    def _(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::add_rms_norm_fwd")
    def _(x, residual, weight, eps):
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        return y, torch.empty_like(y), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::rms_norm_bwd")
    def _(dy, x, weight, rstd, dresidual):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)

    @torch.library.register_fake(f"{lib}::rotary_")
    def _(x, cos, sin, backward):
        return None

    @torch.library.register_fake(f"{lib}::swiglu_fwd")
    def _(gate_up):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    @torch.library.register_fake(f"{lib}::swiglu_bwd")
    def _(grad_out, gate_up):
        return torch.empty_like(gate_up, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{lib}::ce_fwd_stats")
    def _(logits, target_local, n_valid):
        n = logits.numel() // logits.shape[-1]
        return tuple(logits.new_empty((n,), dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake(f"{lib}::ce_bwd_")
    def _(logits, lse, target_local, grad_loss, n_valid):
        return None

    # RMSNorm: outputs (y, rstd); rstd is a by-product, not differentiated.
    def rms_setup(ctx, inputs, output):
        x, weight, _eps = inputs
        ctx.save_for_backward(x, weight, output[1])

    def rms_backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = ops().rms_norm_bwd(dy, x, weight, rstd, None)
        return dx, dw, None

    torch.library.register_autograd(f"{lib}::rms_norm_fwd", rms_backward, setup_context=rms_setup)

    # Residual variant: outputs (y, h = x + residual, rstd); x and residual both receive dh + d(norm)/dh.
    def add_rms_setup(ctx, inputs, output):
        _x, _res, weight, _eps = inputs
        ctx.save_for_backward(output[1], weight, output[2])

    def add_rms_backward(ctx, dy, dh, _drstd):
        h, weight, rstd = ctx.saved_tensors
        dx, dw = ops().rms_norm_bwd(dy, h, weight, rstd, dh)
        return dx, dx, dw, None

    torch.library.register_autograd(f"{lib}::add_rms_norm_fwd", add_rms_backward, setup_context=add_rms_setup)

    def swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def swiglu_backward(ctx, grad_out):
        (gate_up,) = ctx.saved_tensors
        return ops().swiglu_bwd(grad_out, gate_up)

    torch.library.register_autograd(f"{lib}::swiglu_fwd", swiglu_backward, setup_context=swiglu_setup)


# ---------------------------------------------------------------------------------------------
# The functions the model calls (same signatures as the references in rmsnorm.py, rotary.py, swiglu.py).


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused ``kernels.rmsnorm.rms_norm``: one read of x forward; dx and dweight in one backward pass."""
    return ops().rms_norm_fwd(x, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``h = x + residual; (rms_norm(h), h)``: the sum and its norm in one pass over memory."""
    y, h, _ = ops().add_rms_norm_fwd(x, residual, weight, eps)
    return y, h


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Fused ``silu(gate) * up`` over ``gate_up [..., 2f]``; backward writes d[gate | up] in one pass."""
    return ops().swiglu_fwd(gate_up)


def _rotated_heads(t: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """The first n heads of t [s, b, heads * d] as a strided [s, b, n, d] view (what the kernel rotates)."""
    s, b = t.shape[:2]
    return t.view(s, b, -1, d)[:, :, :n]


class _Rotary(torch.autograd.Function):
    """Rotates the first n heads of a whole (non-view) tensor in place; backward rotates its grad back.

    Working on the whole QKV output, not on q and k views of it, keeps autograd from wrapping the
    in-place write in view bookkeeping (CopySlices), which would copy the full QKV grad per view.
    """

    @staticmethod
    def forward(ctx, qkv, n, d, cos, sin):
        ops().rotary_(_rotated_heads(qkv, n, d), cos, sin, False)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(cos, sin)
        ctx.n, ctx.d = n, d
        return qkv

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        # The incoming grad may be shared with other consumers: rotate a private copy (the transpose rotation).
        grad = grad.contiguous().clone()
        ops().rotary_(_rotated_heads(grad, ctx.n, ctx.d), cos, sin, True)
        return grad, None, None, None, None


def apply_rotary_qk(qkv: torch.Tensor, num_rotated_heads: int, head_dim: int, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
    """``rotary.apply_rotary_qk`` IN PLACE: rotates q and k, the first ``num_rotated_heads`` heads of
    ``qkv [s, b, heads * d]`` (last dim contiguous), by cos/sin [s, b, 1, d]; returns ``qkv``."""
    if torch.is_grad_enabled() and qkv.requires_grad:
        return _Rotary.apply(qkv, num_rotated_heads, head_dim, cos, sin)
    ops().rotary_(_rotated_heads(qkv, num_rotated_heads, head_dim), cos, sin, False)
    return qkv


def warn_unavailable_once(device=None) -> None:
    """The one warning given when fused kernels were asked for but the extension is missing."""
    global _warned
    if not _warned:
        _warned = True
        what = (f"the C++ extension megatron_ds._C_kernels is not built ({_load_error})" if not _loaded
                else f"the extension has no kernels for device {device} (megatron_ds._C_kernels_cuda not built)")
        warnings.warn(f"megatron_ds: fused kernels requested but {what}; using the pure-PyTorch references. "
                      "Reinstall with `pip install --no-build-isolation -e .` to build it.", stacklevel=3)


_warned = False
