"""Python face of the fused kernels: each op has a pure-PyTorch reference and a compiled version.

    op                 reference (this package)      fused (csrc/ via kernels/fused.py)
    rms_norm           rmsnorm.rms_norm              fused.rms_norm
    add_rms_norm       rmsnorm.add_rms_norm          fused.add_rms_norm
    apply_rotary_qk    rotary.apply_rotary_qk        fused.apply_rotary_qk (in place)
    swiglu             swiglu.swiglu                 fused.swiglu
    cross_entropy      parallel.cross_entropy.vocab_parallel_cross_entropy
                                                     cross_entropy.fused_vocab_parallel_cross_entropy
                                                     (gradient written over the logits)

The model does not read a global switch: it is handed a ``Kernels`` (one of the two sets below)
at construction, ``DeepSeekModel(..., kernels=select_kernels(fused=...))``; ``pretrain`` picks
``fused = not --no-fused-kernels``. ``select_kernels(True)`` falls back to the references, with one
warning, when the C++ extension was not built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_ds.kernels.rmsnorm import add_rms_norm, rms_norm
from megatron_ds.kernels.rotary import apply_rotary_pos_emb, apply_rotary_qk, rotary_cos_sin
from megatron_ds.kernels.swiglu import swiglu


@dataclass(frozen=True)
class Kernels:
    """The set of ops a model calls; all members share the reference functions' signatures."""

    name: str
    """'fused' or 'reference'."""
    rms_norm: Callable
    add_rms_norm: Callable
    apply_rotary_qk: Callable
    swiglu: Callable
    cross_entropy: Callable
    """(logits [..., V/tp], target [...], tp_group, vocab_size) -> per-token loss [...] fp32."""


def reference_kernels() -> Kernels:
    from megatron_ds.parallel.cross_entropy import vocab_parallel_cross_entropy

    return Kernels("reference", rms_norm, add_rms_norm, apply_rotary_qk, swiglu, vocab_parallel_cross_entropy)


def select_kernels(fused: bool = True, device=None) -> Kernels:
    """The fused set when asked for and built for ``device`` (CPU always; CUDA needs the CUDA extension), else the references."""
    if not fused:
        return reference_kernels()
    from megatron_ds.kernels import fused as f

    if not f.available() or not f.has_device_kernels(device):
        f.warn_unavailable_once(device)
        return reference_kernels()
    from megatron_ds.kernels.cross_entropy import fused_vocab_parallel_cross_entropy

    return Kernels("fused", f.rms_norm, f.add_rms_norm, f.apply_rotary_qk, f.swiglu, fused_vocab_parallel_cross_entropy)


__all__ = ["rms_norm", "add_rms_norm", "apply_rotary_pos_emb", "apply_rotary_qk", "rotary_cos_sin", "swiglu",
           "Kernels", "reference_kernels", "select_kernels"]
