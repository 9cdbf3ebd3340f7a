"""Python face of the fused kernels.

Each function here is the pure-PyTorch reference of one fused operator. Compiled versions
(csrc/) will be dispatched behind these same names, so callers import from here only.
"""

from megatron_ds.kernels.rmsnorm import rms_norm
from megatron_ds.kernels.rotary import apply_rotary_pos_emb, rotary_cos_sin
from megatron_ds.kernels.swiglu import swiglu

__all__ = ["rms_norm", "apply_rotary_pos_emb", "rotary_cos_sin", "swiglu"]
