"""Per-rank checkpoints in Megatron's directory layout, written atomically.

    SAVE/latest_checkpointed_iteration.txt       the iteration of the newest complete checkpoint
    SAVE/iter_0000200/config.json                the run's Config
    SAVE/iter_0000200/mp_rank_{tp:02d}_{pp:03d}/model_optim.pt
        model shard, optimizer state, iteration, consumed samples

Only DP rank 0 of each (tp, pp) coordinate writes: without ZeRO every DP rank holds the same
model and optimizer state. Everything goes into ``iter_N.tmp`` first; after a barrier rank 0
renames it and then rewrites the tracker file through a temporary file, so a crash at any moment
leaves the previous checkpoint loadable and never a complete-looking partial one.

Loading needs the layout the checkpoint was saved with; a layout-free format with resharding
replaces this module in the checkpoint issue.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
import torch.distributed as dist

from megatron_ds.config import Config
from megatron_ds.parallel.topology import ParallelState

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the directory and what to do."""


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _shard_name(state: ParallelState) -> str:
    return f"mp_rank_{state.tp_rank:02d}_{state.pp_rank:03d}"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(root: str, iteration: int, consumed_samples: int, cfg: Config, state: ParallelState,
                    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> str:
    """Collective: every rank must call it. Returns the final checkpoint directory."""
    final = _iter_dir(root, iteration)
    tmp = final + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    _barrier()
    if state.dp_rank == 0:
        shard_dir = os.path.join(tmp, _shard_name(state))
        os.makedirs(shard_dir, exist_ok=True)
        payload = {
            # Interleaved pipeline: one state dict per model chunk, chunk order.
            "model": [m.state_dict() for m in model] if isinstance(model, (list, tuple)) else model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "iteration": iteration,
            "consumed_train_samples": consumed_samples,
            "tp_size": state.tp_size,
            "pp_size": state.pp_size,
        }
        path = os.path.join(shard_dir, "model_optim.pt")
        torch.save(payload, path + ".part")
        with open(path + ".part", "rb") as f:
            os.fsync(f.fileno())
        os.replace(path + ".part", path)
    _barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _barrier()
    return final


def load_checkpoint(root: str, state: ParallelState, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> tuple[int, int]:
    """Load this rank's shard of the newest checkpoint; returns (iteration, consumed_samples)."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"--load {root}: no {TRACKER} there; point --load at a directory written by --save")
    with open(tracker) as f:
        iteration = int(f.read().strip())
    path = os.path.join(_iter_dir(root, iteration), _shard_name(state), "model_optim.pt")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"--load {root}: no shard {_shard_name(state)} for iteration {iteration}; was it saved with "
            f"--tensor-model-parallel-size {state.tp_size} --pipeline-model-parallel-size {state.pp_size}?")
    payload = torch.load(path, map_location=state.device, weights_only=False)
    if (payload["tp_size"], payload["pp_size"]) != (state.tp_size, state.pp_size):
        raise CheckpointError(
            f"--load {root}: saved at TP {payload['tp_size']} x PP {payload['pp_size']}, this run is "
            f"TP {state.tp_size} x PP {state.pp_size}; use the layout it was saved with")
    if isinstance(model, (list, tuple)):
        for m, sd in zip(model, payload["model"], strict=True):
            m.load_state_dict(sd)
    else:
        model.load_state_dict(payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return payload["iteration"], payload["consumed_train_samples"]
