"""What the trainer calls: save and load a run (model chunks, optimizer pieces, RNG, counters).

    writer = AsyncCheckpointWriter() if async else None
    save(args.save, it, [model], state, consumed_samples=n, config=cfg, rng_tracker=tracker,
         common_state={"lr_schedule": ...}, optimizer_tensors=optimizer.sharded_tensors(),
         tokenizer=tokenizer_identity(tok), keep_last_n=k, writer=writer)
    ...
    ckpt = load(args.load, [model], state, rng_tracker=tracker)   # any TP/PP/DP layout
    ckpt.iteration, ckpt.consumed_samples, ckpt.common_state, ckpt.reader (for the optimizer)

Both are collective in the sense that every rank calls them; ``load`` has no collectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import load_model, model_sharded_tensors
from megatron_ds.checkpoint.save import AsyncCheckpointWriter, save_checkpoint
from megatron_ds.checkpoint.sharded_tensor import ShardedTensor
from megatron_ds.parallel.topology import ParallelState


def layout_of(state: ParallelState) -> dict:
    return {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size}


def tokenizer_identity(tokenizer) -> Optional[dict]:
    """What a checkpoint records of a ``data.tokenizer.Tokenizer``: its file and content hash."""
    if tokenizer is None:
        return None
    return {"path": os.path.abspath(tokenizer.path), "sha256_16": tokenizer.identity(),
            "vocab_size": tokenizer.vocab_size}


def rng_state(rng_tracker=None, device: Optional[torch.device] = None) -> dict:
    """This rank's RNG streams: CPU, CUDA (when computing on it) and the TP tracker's."""
    out = {"cpu": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    if rng_tracker is not None:
        out["tracker"] = rng_tracker.get_states()
    return out


def set_rng_state(saved: dict, rng_tracker=None, device: Optional[torch.device] = None) -> None:
    torch.set_rng_state(saved["cpu"])
    if "cuda" in saved and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(saved["cuda"], device)
    if rng_tracker is not None and "tracker" in saved:
        rng_tracker.set_states(saved["tracker"])


def module_states(model_chunks: Sequence[torch.nn.Module]) -> dict:
    """State that modules keep beside their parameters, this rank's own: every module with a
    ``rank_local_state()`` method (the TE layers' FP8 scales and amax histories), keyed
    ``"<chunk>.<module name>"``. Tensors and plain types only (the rank file is loaded weights_only)."""
    return {f"{i}.{name}": m.rank_local_state()
            for i, chunk in enumerate(model_chunks) for name, m in chunk.named_modules()
            if callable(getattr(m, "rank_local_state", None))}


def restore_module_states(model_chunks: Sequence[torch.nn.Module], saved: Optional[dict]) -> tuple[int, int]:
    """Hand each module with ``load_rank_local_state`` its saved state; returns (restored, wanted).

    A module whose key is absent (a checkpoint from a BF16 run, or from before TE was used) keeps
    its fresh state; saved states no module wants (this run is BF16) are ignored."""
    saved = saved or {}
    restored = wanted = 0
    for i, chunk in enumerate(model_chunks):
        for name, m in chunk.named_modules():
            if not callable(getattr(m, "load_rank_local_state", None)):
                continue
            wanted += 1
            key = f"{i}.{name}"
            if key in saved:
                m.load_rank_local_state(saved[key])
                restored += 1
    return restored, wanted


def save(root: str, iteration: int, model_chunks: Sequence[torch.nn.Module], state: ParallelState, *,
         consumed_samples: int, config=None, tokenizer: Optional[dict] = None,
         optimizer_tensors: Sequence[ShardedTensor] = (), common_state=None, rng_tracker=None,
         keep_last_n: Optional[int] = None, writer: Optional[AsyncCheckpointWriter] = None) -> str:
    """Save this rank's model chunks (DP rank 0 writes them), its optimizer pieces (written by
    whoever the pieces say: replica_id 0), its RNG streams and module states, and the shared state."""
    tensors = [t for chunk in model_chunks for t in model_sharded_tensors(chunk, dp_rank=state.dp_rank)]
    tensors += list(optimizer_tensors)
    rank_state = {"rng": rng_state(rng_tracker, state.device)}
    modules = module_states(model_chunks)
    if modules:
        rank_state["modules"] = modules
    return save_checkpoint(root, iteration, tensors, consumed_samples=consumed_samples, config=config,
                           tokenizer=tokenizer, common_state=common_state,
                           rank_state=rank_state, layout=layout_of(state),
                           keep_last_n=keep_last_n, writer=writer)


@dataclass
class LoadedCheckpoint:
    reader: CheckpointReader
    """Open reader: the optimizer reads its pieces with ``reader.read_into``."""
    iteration: int
    consumed_samples: int
    common_state: object
    rng_restored: bool
    """False when the checkpoint came from another layout (or --no-load-rng): RNG stays as seeded."""
    module_states: tuple[int, int] = (0, 0)
    """(restored, wanted) module states (TE FP8 scaling); fresh ones at another layout re-warm."""


def load(root: str, model_chunks: Sequence[torch.nn.Module], state: ParallelState, *, rng_tracker=None,
         load_rng: bool = True, verify: bool = True) -> LoadedCheckpoint:
    """Load the newest checkpoint under ``root`` into this rank's model chunks, at any layout."""
    import torch.distributed as dist

    reader = CheckpointReader(root, verify=verify)
    for chunk in model_chunks:
        load_model(chunk, reader)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    # Per-rank state only carries over to the same layout: rank_state is None at another one.
    saved = reader.rank_state(rank, layout=layout_of(state)) or {}
    # FP8 scales belong with the weights they were measured on, so they load even when RNG does not.
    modules = restore_module_states(model_chunks, saved.get("modules"))
    restored = False
    if load_rng and "rng" in saved:
        set_rng_state(saved["rng"], rng_tracker, state.device)
        restored = True
    return LoadedCheckpoint(reader, reader.iteration, reader.consumed_samples, reader.common_state(), restored,
                            modules)
