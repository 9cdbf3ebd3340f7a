"""Atomic and asynchronous saving: a crash at any point of a save leaves the previous checkpoint
loadable, the partial one is ignored and removed by the next save; the async copy is taken at
the step boundary; pruning; the preemption flag."""

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from megatron_ds.checkpoint import save as save_mod
from megatron_ds.checkpoint.format import complete_checkpoints
from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import load_model, model_sharded_tensors
from megatron_ds.checkpoint.preemption import PreemptionHandler
from megatron_ds.checkpoint.save import AsyncCheckpointWriter, save_checkpoint
from tests.checkpoint.helpers import config, new_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_loads_as(root, expected, iteration):
    reader = CheckpointReader(root)
    assert reader.iteration == iteration
    model = new_model(seed=99)
    load_model(model, reader)
    for n, p in model.named_parameters():
        rows = config().vocab_size if n in ("embedding.weight", "lm_head.weight") else None
        assert torch.equal(p[:rows], expected[n][:rows]), n


# The files of one save in the order they are finished; the last is the rename of iter_N.tmp,
# after which only the `latest` pointer is still old.
@pytest.mark.parametrize("stop_after", ["rank_00000.safetensors", "rank_00000.json", "metadata.json",
                                        "iter_0000002"])
def test_sigkill_during_async_save_leaves_previous_checkpoint(tmp_path, stop_after):
    root = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "tests.checkpoint.crash_during_save", root, stop_after],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("STOPPED"), f"the save never reached {stop_after}: {line!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    iter1 = _params(new_model(seed=1))
    _assert_loads_as(root, iter1, iteration=1)  # `latest` still names iteration 1
    leftovers = [f for f in os.listdir(root) if f.endswith(".tmp")]
    assert leftovers == ([] if stop_after == "iter_0000002" else ["iter_0000002.tmp"])

    model = new_model(seed=3)
    save_checkpoint(root, 3, model_sharded_tensors(model), config=config())
    assert not [f for f in os.listdir(root) if f.endswith(".tmp")]  # the next save cleaned up
    _assert_loads_as(root, _params(model), iteration=3)


def test_async_save_copies_at_the_step_boundary_and_overlaps_training(tmp_path):
    model = new_model(seed=4)
    before = _params(model)
    release = threading.Event()
    save_mod.after_file_written = lambda path: release.wait()
    try:
        writer = AsyncCheckpointWriter()
        save_checkpoint(str(tmp_path), 7, model_sharded_tensors(model), config=config(), writer=writer)
        assert writer.busy  # returned while the writer is still on its first file
        with torch.no_grad():  # "training" changes the weights during the write
            for p in model.parameters():
                p.mul_(-2.0)
        release.set()
        writer.wait()
    finally:
        save_mod.after_file_written = None
    _assert_loads_as(str(tmp_path), before, iteration=7)


def test_async_writer_errors_surface_at_the_next_wait(tmp_path):
    def boom(path):
        raise OSError("disk full")

    save_mod.after_file_written = boom
    try:
        writer = AsyncCheckpointWriter()
        save_checkpoint(str(tmp_path), 1, model_sharded_tensors(new_model()), writer=writer)
        with pytest.raises(Exception, match="disk full"):
            writer.wait()
    finally:
        save_mod.after_file_written = None


def test_keep_last_n_prunes_older_checkpoints(tmp_path):
    model = new_model(seed=2)
    for it in (1, 2, 3, 4):
        save_checkpoint(str(tmp_path), it, model_sharded_tensors(model), keep_last_n=2)
    assert [it for it, _ in complete_checkpoints(str(tmp_path))] == [3, 4]
    assert CheckpointReader(str(tmp_path)).iteration == 4


def test_sigterm_sets_a_flag_for_the_step_boundary():
    handler = PreemptionHandler().install()
    try:
        assert not handler.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.requested and handler.agreed()
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGTERM) is not handler._handle
