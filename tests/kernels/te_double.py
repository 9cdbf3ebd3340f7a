"""A stand-in for the part of Transformer Engine's API that megatron_ds/kernels/te.py calls, so the
adapters' own logic (class routing, the shared weight, the TP communication around the local GEMM,
the amax-reduction group, FP8 state through checkpoints) runs in CI, where TE cannot be installed.

It mirrors TE's signatures, not its numerics: ``Linear`` is a plain local GEMM holding ``weight``
that records the largest |input| it saw as its "amax history"; ``get_extra_state`` serializes that
into a uint8 tensor as TE does (a pickle in the bytes); ``fp8_autocast`` records its arguments.
The real library is exercised by tests/gpu/test_transformer_engine.py on a CUDA machine.
"""

from __future__ import annotations

import contextlib
import enum
import pickle
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

AUTOCASTS: list[tuple] = []
"""(recipe, fp8_group) of every fp8_autocast entered."""


class Format(enum.Enum):
    E4M3 = "e4m3"
    HYBRID = "hybrid"


@dataclass
class DelayedScaling:
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    reduce_amax: bool = True


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__()
        assert bias is False  # DeepSeek's linears have none, and te.py asks for none
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
        self.amax_history = torch.zeros(2)

    def forward(self, x):
        self.amax_history = torch.roll(self.amax_history, 1)
        self.amax_history[0] = x.detach().abs().max()
        return F.linear(x, self.weight)

    def get_extra_state(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(pickle.dumps({"amax_history_fwd": self.amax_history.clone()})),
                                dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        if state.numel():
            self.amax_history = pickle.loads(state.numpy().tobytes())["amax_history_fwd"]


@contextlib.contextmanager
def fp8_autocast(enabled=True, fp8_recipe=None, fp8_group=None):
    AUTOCASTS.append((fp8_recipe, fp8_group))
    yield


def install() -> None:
    """Put ``transformer_engine.pytorch`` and ``transformer_engine.common.recipe`` in sys.modules."""
    root = types.ModuleType("transformer_engine")
    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.Linear, pytorch.fp8_autocast = Linear, fp8_autocast
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.DelayedScaling, recipe.Format = DelayedScaling, Format
    root.pytorch, root.common, common.recipe = pytorch, common, recipe
    sys.modules.update({"transformer_engine": root, "transformer_engine.pytorch": pytorch,
                        "transformer_engine.common": common, "transformer_engine.common.recipe": recipe})


def uninstall() -> None:
    for name in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.common",
                 "transformer_engine.common.recipe"):
        sys.modules.pop(name, None)
    AUTOCASTS.clear()
