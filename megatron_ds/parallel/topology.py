"""Process topology: the tensor x data x pipeline mesh in Megatron's rank order.

Megatron orders ranks with tensor parallelism fastest, then data, then pipeline:

    rank = pp_rank * (tp * dp) + dp_rank * tp + tp_rank

so a TP group is a block of consecutive ranks (one node's NVLink domain on a cluster) and the
pipeline axis is the outermost (stages may span nodes over InfiniBand).

A group of size 1 is represented by ``None``: every collective in ``parallel/`` is a no-op on it,
which lets the unsharded reference and the sharded model run the same code in the same process.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class TopologyError(ValueError):
    """A layout that cannot be built; the message names the flag to change."""


@dataclass(frozen=True)
class VirtualGroup:
    """A stand-in for a process group that is never communicated over.

    Used to build one rank's shard of a layout without launching it, e.g. the 67B model at TP=8
    on the meta device in one process to count its parameters. Any collective on it is a bug.
    """

    size: int
    """Number of ranks the group would have."""
    rank: int
    """This (imagined) rank's index in it."""


def group_size(group) -> int:
    """World size of ``group``; ``None`` stands for a group of one rank."""
    if group is None:
        return 1
    if isinstance(group, VirtualGroup):
        return group.size
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This rank's index inside ``group``; 0 for ``None``."""
    if group is None:
        return 0
    if isinstance(group, VirtualGroup):
        return group.rank
    return dist.get_rank(group)


@dataclass
class ParallelState:
    """The process groups of one rank and its coordinates on the mesh.

    Parallel layers are handed the group they need (``tp_group`` ...) explicitly; nothing reads
    this object as a global.
    """

    tp_size: int = 1
    """Tensor-parallel size (``--tensor-model-parallel-size``)."""
    pp_size: int = 1
    """Pipeline-parallel size (``--pipeline-model-parallel-size``)."""
    dp_size: int = 1
    """Data-parallel size: world size / (tp * pp)."""
    tp_rank: int = 0
    """Index of this rank in its tensor-parallel group."""
    pp_rank: int = 0
    """Index of this rank's pipeline stage."""
    dp_rank: int = 0
    """Index of this rank in its data-parallel group."""
    tp_group: object = None
    """Ranks that share one layer's shards; None when tp_size == 1."""
    pp_group: object = None
    """Ranks that hold the stages of one model replica; None when pp_size == 1."""
    dp_group: object = None
    """Ranks that hold the same shard of different replicas; None when dp_size == 1."""
    mp_group: object = None
    """tp x pp ranks of one replica (reductions over the whole model, e.g. the grad norm)."""
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    """Global ranks of the pipeline stages of this rank's replica, stage order."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Device that this rank computes on (cuda:local_rank or cpu)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.dp_size


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """Global rank of mesh coordinates, Megatron order (tp fastest, pp slowest)."""
    return pp_rank * (tp * dp) + dp_rank * tp + tp_rank


def initialize_distributed(timeout_minutes: int = 30) -> torch.device:
    """Start torch.distributed if nobody has: NCCL on CUDA, gloo on CPU.

    Under torchrun the env:// rendezvous is used; run as a plain ``python`` process we start a
    world of one over a file store so the same code path serves the single-process case.
    """
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return device
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        store_file = tempfile.NamedTemporaryFile(prefix="megatron_ds_store_", delete=False).name
        dist.init_process_group(
            backend=backend, init_method=f"file://{store_file}", rank=0, world_size=1, timeout=timeout
        )
    return device


def build_parallel_state(tp: int = 1, pp: int = 1, device: torch.device | None = None) -> ParallelState:
    """Split the default world into tp x dp x pp groups (collective: every rank must call it).

    The data-parallel size is what remains: world_size / (tp * pp).
    """
    world = dist.get_world_size()
    rank = dist.get_rank()
    if tp < 1 or pp < 1:
        raise TopologyError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if world % (tp * pp) != 0:
        raise TopologyError(
            f"world size {world} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes"
        )
    dp = world // (tp * pp)
    pp_rank, rem = divmod(rank, tp * dp)
    dp_rank, tp_rank = divmod(rem, tp)

    def new_groups(rank_lists):
        # new_group is collective over the whole world: every rank creates every group, keeps its own.
        mine = None
        for ranks in rank_lists:
            g = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine = g
        return mine

    tp_lists = [[rank_of(t, d, p, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_lists = [[rank_of(t, d, p, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_lists = [[rank_of(t, d, p, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    mp_lists = [sorted(rank_of(t, d, p, tp, dp) for p in range(pp) for t in range(tp)) for d in range(dp)]
    state = ParallelState(
        tp_size=tp, pp_size=pp, dp_size=dp, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
        tp_group=new_groups(tp_lists), dp_group=new_groups(dp_lists),
        pp_group=new_groups(pp_lists), mp_group=new_groups(mp_lists),
        pp_ranks=[rank_of(tp_rank, dp_rank, p, tp, dp) for p in range(pp)],
        device=device if device is not None else torch.device("cpu"),
    )
    return state


def single_process_state(device: torch.device | None = None) -> ParallelState:
    """A mesh of one rank: every group is None, every collective a no-op."""
    return ParallelState(device=device if device is not None else torch.device("cpu"))
