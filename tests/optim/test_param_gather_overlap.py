"""--overlap-param-gather: ZeRO-1's parameter all-gather overlaps the next forward, and nothing
reads a parameter before its bucket has arrived.

A real all-gather on gloo usually lands before anyone looks, so a missing wait would go unseen.
These tests replace it with a *deferred* one: the collective runs at once into a scratch buffer, but
the parameters are written only when the handle is waited for. Any read without a wait then sees
the previous step's weights of the other ranks' chunks, deterministically.

Through ``pretrain.run`` at TP1 x PP2 x DP2 with interleaved chunks, ZeRO-1 and bf16, with
evaluations and a final save:

- with the overlap, the losses, validation losses and checkpoint are bitwise those of the run
  without it (every gather completed inside ``step``);
- the same run without the forward pre-hooks differs: the comparison sees a missed wait;
- the first module's forward waits for its own buckets only; later layers' buckets are still in
  flight at that moment (the overlap is real, not one wait for everything).
"""

import os
import shutil
import tempfile

import pytest

from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.config import config_from_args, validate
from megatron_ds.parallel.topology import build_parallel_state
from tests.multiproc import run_world

STEPS = 6
FLAGS = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--vocab-size", "500", "--seq-length", "32", "--max-position-embeddings", "64",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "2",
         "--mock-data", "--log-interval", "1000", "--use-distributed-optimizer", "--bf16",
         "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
         "--num-layers-per-virtual-pipeline-stage", "1", "--eval-interval", "3", "--eval-iters", "1",
         "--train-iters", str(STEPS)]
# Small buckets (8 KB of fp32 grads): every layer spans several, so waiting for one module's
# buckets leaves others in flight.
BUCKETS = ["--bucket-size-mb", "0.008"]


class _Deferred:
    """An all-gather handle whose result reaches the parameters only at ``wait``."""

    def __init__(self, out, gathered, log):
        self.out, self.gathered, self.log = out, gathered, log

    def wait(self):
        self.out.copy_(self.gathered)
        self.log.append("wait")
        return True


def _run(root: str, mode: str):
    import torch

    import megatron_ds.parallel.grad_buffer as gb_mod
    from megatron_ds.optim.distributed_optimizer import MegatronOptimizer
    from megatron_ds.pretrain import run

    real = gb_mod._all_gather
    log: list[str] = []

    def deferred(out, inp, group=None, async_op=False):
        scratch = torch.empty_like(out)
        real(scratch, inp, group=group)
        return _Deferred(out, scratch, log)

    hook = MegatronOptimizer._hook_forward
    first_forward = {}

    def recording_hooks(self, chunk, gb):
        hook(self, chunk, gb)
        # After the optimizer's own pre-hook: what is still in flight when the module computes.
        def seen(module, _args):
            if self._gathering and "in_flight" not in first_forward:
                own = {id(gb.bucket_of(p)) for p in module.parameters(recurse=False) if p.requires_grad}
                first_forward["own_waited"] = all(b.gather is None for b in gb.buckets if id(b) in own)
                first_forward["in_flight"] = sum(b.gather is not None for b in gb.buckets)
        for m in chunk.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                m.register_forward_pre_hook(seen)

    gb_mod._all_gather = deferred
    if mode == "overlap_no_hooks":
        MegatronOptimizer._hook_forward = lambda self, chunk, gb: None
    elif mode == "overlap":
        MegatronOptimizer._hook_forward = recording_hooks
    overlap = [] if mode == "in_step" else ["--overlap-param-gather"]
    try:
        cfg = config_from_args(FLAGS + BUCKETS + overlap + ["--save", os.path.join(root, mode)])
        validate(cfg, 4)
        res = run(cfg, build_parallel_state(1, 2), log=False)
    finally:
        gb_mod._all_gather, MegatronOptimizer._hook_forward = real, hook
    return {"losses": res.losses, "eval": res.eval_losses, "waits": len(log), **first_forward}


def _all_modes(root):
    return {mode: _run(root, mode) for mode in ("in_step", "overlap", "overlap_no_hooks")}


@pytest.fixture(scope="module")
def results():
    root = tempfile.mkdtemp(prefix="param_gather_")
    try:
        ranks = run_world(4, _all_modes, root=root)
        readers = {m: CheckpointReader(os.path.join(root, m)) for m in ranks[0]}
        yield ranks, readers
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_overlap_gives_bitwise_the_run_without_it(results):
    import torch

    ranks, readers = results
    for r in ranks:
        assert r["overlap"]["waits"] > 0 and r["in_step"]["waits"] > 0
        assert r["overlap"]["losses"] == r["in_step"]["losses"]
        assert r["overlap"]["eval"] == r["in_step"]["eval"] and len(r["in_step"]["eval"]) == 2
    in_step, overlap = readers["in_step"], readers["overlap"]
    assert in_step.keys() == overlap.keys()
    for k in in_step.keys():
        assert torch.equal(in_step.read(k), overlap.read(k)), k


def test_without_the_forward_hooks_the_comparison_sees_stale_weights(results):
    ranks, _ = results
    r = ranks[0]
    assert r["overlap_no_hooks"]["losses"][0] == r["in_step"]["losses"][0]  # before any step: nothing in flight
    assert r["overlap_no_hooks"]["losses"][1:] != r["in_step"]["losses"][1:]


def test_a_module_waits_for_its_own_buckets_and_later_ones_stay_in_flight(results):
    ranks, _ = results
    for r in ranks:
        assert r["overlap"]["own_waited"] is True
        assert r["overlap"]["in_flight"] > 0


def test_the_flag_needs_the_distributed_optimizer():
    from megatron_ds.errors import ConfigError

    flags = [f for f in FLAGS if f != "--use-distributed-optimizer"] + ["--overlap-param-gather"]
    with pytest.raises(ConfigError, match="--overlap-param-gather .* add --use-distributed-optimizer"):
        validate(config_from_args(flags), 4)
