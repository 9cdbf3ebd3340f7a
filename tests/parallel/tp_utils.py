"""Shared pieces of the tensor-parallel tests: master weights drawn the single-process way, and
the slice of them (or of their grads) that a TP rank should hold."""

from __future__ import annotations

import torch

from megatron_ds.parallel.random import init_method_normal, param_generator

SEED = 1234
# O(1) activations so that absolute and relative tolerances mean the same thing.
INIT = init_method_normal(0.3)


def generator(key: str) -> torch.Generator:
    return param_generator(SEED, key, "cpu")


def master_weight(shape, key: str) -> torch.Tensor:
    """The single-process weight for ``key``: what an unsharded layer would hold, fp32."""
    w = torch.empty(shape)
    INIT(w, generator(key))
    return w


def shard(full: torch.Tensor, dim: int, tp: int, rank: int, parts=None) -> torch.Tensor:
    """This rank's chunk of each part of ``full`` along ``dim``, concatenated (the layers' layout)."""
    parts = [full.shape[dim]] if parts is None else parts
    return torch.cat([p.chunk(tp, dim=dim)[rank] for p in full.split(parts, dim=dim)], dim=dim)


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # fp32 sums of <= 64 O(1) terms, regrouped into TP partial sums and computed by matmul kernels
    # of other shapes (other blockings): reassociation error <~ k * eps32 * max|term|
    # = 64 * 6e-8 ~ 4e-6, so 1e-5 absolute and relative.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
