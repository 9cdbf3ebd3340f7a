"""Transformer Engine adapters: run the decoder layers' GEMMs through TE (BF16, or FP8 with delayed scaling).

``--transformer-impl transformer_engine`` keeps every module and parameter of the model as it is
and changes only where the local GEMM of each ``ColumnParallelLinear`` / ``RowParallelLinear``
inside ``model.layers`` runs: in a ``transformer_engine.pytorch.Linear`` that holds the SAME
``nn.Parameter`` object (so ``state_dict`` names and values, the optimizer and the DP gradient
buffers are unchanged). Tensor and sequence parallelism stay ours: TE sees a local,
single-rank GEMM, and our layers do the all-gather / reduce-scatter around it as before.

``--fp8-format e4m3|hybrid`` wraps each such GEMM in ``te.fp8_autocast`` with a
``DelayedScaling`` recipe (amax history 1024, max). Left in BF16/FP32 on purpose: the LM head (a
102400-wide GEMM whose logits feed the loss) and the replicated-KV projection (it uses a slice of
its weight).

Amax reduction: TE all-reduces the amaxes over ``fp8_group`` at each autocast exit, and a group of
None means the WHOLE world to TE, which would make every GEMM a world-wide collective (and hang
under pipeline parallelism, where stages run different GEMMs at different times). We reduce over
the layer's TP group, whose ranks run the same GEMMs in the same order, so the scales agree across
the shards of one weight; with TP 1 nothing is reduced. DP replicas keep their own scales (as
Megatron's ``--tp-only-amax-red``): they see different data, and nothing requires equal scales.

Under ``--recompute-granularity`` the recomputed GEMMs enter their autocast again in backward, so
they quantize with the scales as updated after the original forward (TE's own checkpoint function
would replay the old ones): the gradient is exact for the recomputed forward, which differs from
the original by that re-quantization only.

FP8 scaling state (scales, amax histories) lives in the TE modules, which are not registered
submodules; under FP8 each routed layer hands it to the checkpoint through ``rank_local_state`` /
``load_rank_local_state`` (``checkpoint/checkpointing.py``), per rank, restored at the same layout.

Only imported on request (``pretrain.build_model``), after ``config.validate_kernels`` has checked
that TE is installed and CUDA is present: nothing imports TE at start.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_ds.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_ds.parallel.topology import group_size
from megatron_ds.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)


def fp8_recipe(fp8_format: str, reduce_amax: bool = True):
    """TE's delayed-scaling recipe for ``--fp8-format`` ('e4m3' or 'hybrid')."""
    from transformer_engine.common.recipe import DelayedScaling, Format

    fmt = {"e4m3": Format.E4M3, "hybrid": Format.HYBRID}[fp8_format]
    return DelayedScaling(fp8_format=fmt, amax_history_len=1024, amax_compute_algo="max",
                          reduce_amax=reduce_amax)


def amax_reduction(tp_group) -> tuple[object, bool]:
    """(fp8_group, reduce_amax) for a layer's GEMM: its TP group when TP > 1, else no reduction.

    Never (None, True): TE reads a None group as the whole world (see the module docstring).
    """
    if group_size(tp_group) > 1:
        return tp_group, True
    return None, False


class _TEGemm:
    """Y = X W^T on this rank by a TE Linear sharing the layer's weight Parameter; optional FP8 autocast."""

    def __init__(self, weight: nn.Parameter, recipe, fp8_group=None):
        import transformer_engine.pytorch as te

        out_features, in_features = weight.shape
        self.te = te
        self.recipe = recipe
        self.fp8_group = fp8_group
        self.linear = te.Linear(in_features, out_features, bias=False, params_dtype=weight.dtype,
                                device=weight.device)
        # Drop TE's own weight and hand it ours: one Parameter, two holders.
        del self.linear.weight
        self.linear.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe is None:
            return self.linear(x)
        with self.te.fp8_autocast(enabled=True, fp8_recipe=self.recipe, fp8_group=self.fp8_group):
            return self.linear(x)

    def fp8_state(self) -> torch.Tensor:
        """Scales and amax histories, serialized by TE into a CPU uint8 tensor (empty before any FP8 step)."""
        return self.linear.get_extra_state()

    def load_fp8_state(self, state: torch.Tensor) -> None:
        self.linear.set_extra_state(state)


class TEColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear whose local GEMM runs in TE (same contract and communication)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group, tensor_parallel_output_grad=True)
        else:
            x = copy_to_tensor_model_parallel_region(x, self.tp_group)
        y = self._te_gemm(x)  # [s, b, out/tp]
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y, self.tp_group)
        return y


class TERowParallelLinear(RowParallelLinear):
    """RowParallelLinear whose local GEMM runs in TE (same contract and communication)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.tp_group)
        y = self._te_gemm(x)  # [s, b, out], partial over this rank's in/tp columns
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(y, self.tp_group)
        return reduce_from_tensor_model_parallel_region(y, self.tp_group)


def use_transformer_engine(model: nn.Module, fp8_format: Optional[str] = None) -> int:
    """Route the GEMMs of the linear layers under ``model.layers`` through TE; returns how many were routed."""
    routed = 0
    for module in model.layers.modules():
        if type(module) is ColumnParallelLinear:
            module.__class__ = TEColumnParallelLinear
        elif type(module) is RowParallelLinear:
            module.__class__ = TERowParallelLinear
        else:
            continue
        fp8_group, reduce_amax = amax_reduction(module.tp_group)
        recipe = fp8_recipe(fp8_format, reduce_amax) if fp8_format else None
        gemm = _TEGemm(module.weight, recipe, fp8_group)
        # Not a registered submodule: parameter names and the state dict stay exactly as before.
        object.__setattr__(module, "_te_gemm", gemm)
        if recipe is not None:
            # The checkpoint's per-rank module-state protocol (checkpoint/checkpointing.py).
            object.__setattr__(module, "rank_local_state", gemm.fp8_state)
            object.__setattr__(module, "load_rank_local_state", gemm.load_fp8_state)
        routed += 1
    return routed
