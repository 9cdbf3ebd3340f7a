"""RNG: parameter generators are the same in every process; the TP stream differs per TP rank
while the default stream stays common, and forking never disturbs the default stream."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ds.parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    model_parallel_manual_seed,
    model_parallel_seed,
    param_generator,
)
from megatron_ds.parallel.topology import build_parallel_state
from tests.multiproc import run_world

SEED = 1234


def _draws(tp):
    st = build_parallel_state(tp=tp)
    out = {"param": torch.randn(4, generator=param_generator(7, "layers.0.mlp.weight"))}

    tracker = model_parallel_manual_seed(SEED, st.tp_rank, pp_rank=0)
    out["default_before"] = torch.rand(4)
    with tracker.fork():
        out["tp_1"] = torch.rand(4)
        out["dropout_mask"] = F.dropout(torch.ones(64), p=0.5) != 0
    out["default_after"] = torch.rand(4)
    with tracker.fork(MODEL_PARALLEL_RNG):
        out["tp_2"] = torch.rand(4)

    # A checkpoint of the streams replays them exactly.
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork():
        replay = torch.rand(4)
    assert torch.equal(first, replay)

    # The default stream after a fork is where it would be without the fork.
    torch.manual_seed(SEED)
    assert torch.equal(out["default_before"], torch.rand(4))
    assert torch.equal(out["default_after"], torch.rand(4))
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_stream_per_rank_default_stream_shared(tp):
    out = run_world(tp, _draws, tp=tp)
    for o in out[1:]:
        # Different processes (Python's hash is salted per process): same parameter draws.
        assert torch.equal(o["param"], out[0]["param"])
        assert torch.equal(o["default_before"], out[0]["default_before"])
        assert torch.equal(o["default_after"], out[0]["default_after"])
    for i in range(tp):
        for j in range(i):
            assert not torch.equal(out[i]["tp_1"], out[j]["tp_1"])
            assert not torch.equal(out[i]["dropout_mask"], out[j]["dropout_mask"])
    for o in out:
        assert not torch.equal(o["tp_1"], o["tp_2"])  # the stream continues, it does not restart


def test_param_generator_depends_on_seed_and_key():
    a = torch.randn(8, generator=param_generator(1, "w"))
    assert torch.equal(a, torch.randn(8, generator=param_generator(1, "w")))
    assert not torch.equal(a, torch.randn(8, generator=param_generator(2, "w")))
    assert not torch.equal(a, torch.randn(8, generator=param_generator(1, "v")))
    assert param_generator(1, "w", "meta").device.type == "cpu"


def test_tracker_rejects_duplicates_and_unknown_names():
    t = RNGStatesTracker()
    t.add("a", 1)
    with pytest.raises(ValueError):
        t.add("a", 2)
    with pytest.raises(ValueError):
        t.add("b", 1)
    with pytest.raises(KeyError):
        with t.fork("missing"):
            pass


def test_model_parallel_seeds_are_distinct():
    seeds = {model_parallel_seed(SEED, t, p) for t in range(8) for p in range(16)}
    assert len(seeds) == 8 * 16
