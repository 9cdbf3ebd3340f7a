"""Run by test_atomic.py as a subprocess: save iteration 1, then start an asynchronous save of
iteration 2 that stops, as if the machine were lost, after the file named on the command line.

    python -m tests.checkpoint.crash_during_save ROOT STOP_AFTER

The writer thread prints ``STOPPED <path>`` and blocks; the main thread keeps "training"; the
test then SIGKILLs the process.
"""

import os
import sys
import threading
import time

import torch

from megatron_ds.checkpoint import save as save_mod
from megatron_ds.checkpoint.model_state import model_sharded_tensors
from megatron_ds.checkpoint.save import AsyncCheckpointWriter, save_checkpoint
from tests.checkpoint.helpers import config, new_model


def main(root: str, stop_after: str) -> None:
    torch.set_num_threads(1)
    model = new_model(seed=1)
    writer = AsyncCheckpointWriter()
    save_checkpoint(root, 1, model_sharded_tensors(model), config=config(), writer=writer)
    writer.wait()

    def hook(path: str) -> None:
        if os.path.basename(path) == stop_after and "iter_0000002" in path:
            print(f"STOPPED {path}", flush=True)
            threading.Event().wait()  # the writer never gets further

    save_mod.after_file_written = hook
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(root, 2, model_sharded_tensors(model), config=config(), writer=writer)
    while True:  # training goes on while the writer is stuck
        time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
