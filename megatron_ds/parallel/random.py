"""Randomness that does not depend on the parallel layout.

Two separate concerns:

1. Parameter initialization. Every parameter gets its own generator, seeded from (seed, key) by a
   stable hash, and a parallel layer fills the FULL fp32 master weight with it before keeping its
   shard. So the weights of any TP layout are slices of the single-process weights, bit for bit
   (for generators on the same device type: CPU and CUDA streams differ).

2. Runtime randomness (dropout). Megatron's RNG-tracker idea, device-agnostic: named RNG states that
   are swapped into the device's default generator inside ``tracker.fork(name)``. Dropout on
   activations that are sharded over TP (e.g. attention probabilities of this rank's heads) runs
   inside ``fork(MODEL_PARALLEL_RNG)`` and gets a stream distinct per TP rank; dropout on replicated
   activations runs on the default generator, which is seeded the same on every TP rank.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
"""Tracker name of the per-TP-rank stream used inside tensor-parallel regions."""

InitMethod = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# --- initialization ----------------------------------------------------------------------------


def param_generator(seed: int, key: str, device=None) -> torch.Generator:
    """A generator seeded from ``(seed, key)`` by SHA-256, identical in every process and run.

    ``key`` names the parameter (e.g. ``"layers.3.attention.query_key_value.weight"``). Python's
    ``hash`` is salted per process, so it cannot be used here. The meta device has no generators;
    a CPU one is returned for it (layers skip initialization on meta anyway).
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "meta":
        device = torch.device("cpu")
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def init_method_normal(std: float) -> InitMethod:
    """``fn(tensor, generator)`` filling ``tensor`` in place with N(0, std**2) from ``generator``."""

    def init_(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            return tensor.normal_(mean=0.0, std=std, generator=generator)

    return init_


def scaled_init_method_normal(std: float, num_layers: int) -> InitMethod:
    """N(0, (std / sqrt(2 * num_layers))**2): Megatron's init for the projections into the residual
    stream (attention out-proj, MLP down-proj), so the residual's variance does not grow with depth."""
    return init_method_normal(std / (2.0 * num_layers) ** 0.5)


# --- runtime RNG streams -----------------------------------------------------------------------


def _get_rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named RNG streams for one device, each swapped into the device's default generator by ``fork``.

    The default generator of ``device`` (``torch.get_rng_state`` on CPU, ``torch.cuda`` on CUDA) is
    what dropout and ``torch.rand`` draw from, so code inside ``fork`` needs no generator argument.
    """

    def __init__(self, device=None):
        self.device = torch.device("cpu" if device is None else device)
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: set[int] = set()

    def add(self, name: str, seed: int) -> None:
        """Start a stream ``name`` from ``seed``; names and seeds must be unique."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already used by another RNG stream")
        saved = _get_rng_state(self.device)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self._states[name] = _get_rng_state(self.device)
        _set_rng_state(saved, self.device)
        self._seeds.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Draw from stream ``name`` inside the block; the default stream resumes untouched after it."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added; known: {sorted(self._states)}")
        saved = _get_rng_state(self.device)
        _set_rng_state(self._states[name], self.device)
        try:
            yield
        finally:
            # Keep where the stream got to, so the next fork continues it rather than repeating it.
            self._states[name] = _get_rng_state(self.device)
            _set_rng_state(saved, self.device)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of every stream's state, for a checkpoint."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore streams saved by ``get_states`` (replaces all of them)."""
        self._states = {name: state.clone() for name, state in states.items()}


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int) -> int:
    """Seed of the per-TP-rank stream: distinct for every (tp_rank, pp_rank) with tp < 100.

    The 2718 offset keeps it away from the default stream's seed (``seed + 100 * pp_rank``).
    """
    return seed + 2718 + tp_rank + 100 * pp_rank


def model_parallel_manual_seed(seed: int, tp_rank: int, pp_rank: int, device=None) -> RNGStatesTracker:
    """Seed this rank's default generator (same on all TP ranks of a stage) and return a tracker
    holding the per-TP-rank stream ``MODEL_PARALLEL_RNG``. Called once by the trainer at start-up."""
    device = torch.device("cpu" if device is None else device)
    default_seed = seed + 100 * pp_rank
    torch.manual_seed(default_seed)  # seeds CPU and every CUDA device
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(seed, tp_rank, pp_rank))
    return tracker
