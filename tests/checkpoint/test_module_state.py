"""State that layers keep beside their weights (TE's FP8 scales and amax histories) is saved per
rank and restored at the same layout, without changing a tensor name of the checkpoint.

TE itself needs CUDA (tests/gpu/test_transformer_engine.py trains FP8, saves and resumes); here the
same protocol is driven by a holder that keeps a tensor outside the state dict, as TE's GEMMs do:
``rank_local_state()`` to save, ``load_rank_local_state(state)`` to restore.
"""

import torch

from megatron_ds.checkpoint.checkpointing import load, save
from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_ds.parallel.topology import ParallelState
from tests.checkpoint.helpers import hf_weights, model_with_weights, new_model


class _History:
    """A per-layer amax history that is not a parameter or buffer (as TE keeps its FP8 meta)."""

    def __init__(self):
        self.amax = torch.zeros(3, 8)

    def state(self) -> torch.Tensor:
        return self.amax.clone()

    def load(self, s: torch.Tensor) -> None:
        self.amax.copy_(s)


def _attach(model) -> dict[str, _History]:
    holders = {}
    for name, m in model.named_modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            h = holders[name] = _History()
            object.__setattr__(m, "rank_local_state", h.state)
            object.__setattr__(m, "load_rank_local_state", h.load)
    return holders


def _trained(tmp_path, with_state=True):
    model = model_with_weights(ParallelState(), hf_weights())
    holders = _attach(model) if with_state else {}
    g = torch.Generator().manual_seed(3)
    for h in holders.values():
        h.amax.copy_(torch.rand(3, 8, generator=g))
    save(str(tmp_path), 4, [model], ParallelState(), consumed_samples=32)
    return model, holders


def test_states_come_back_at_the_same_layout_even_without_rng(tmp_path):
    _, saved = _trained(tmp_path)
    fresh = new_model(seed=7)
    got = _attach(fresh)
    ckpt = load(str(tmp_path), [fresh], ParallelState(), load_rng=False)  # as --no-load-rng / DPO's reference
    n = len(saved)
    assert n == 4 * fresh.config.num_layers + 1  # qkv, dense, gate_up, down per layer; the LM head
    assert ckpt.module_states == (n, n)
    for name, h in got.items():
        assert torch.equal(h.amax, saved[name].amax), name


def test_tensor_names_do_not_change(tmp_path):
    _trained(tmp_path / "with", with_state=True)
    _trained(tmp_path / "without", with_state=False)
    assert CheckpointReader(str(tmp_path / "with")).keys() == CheckpointReader(str(tmp_path / "without")).keys()


def test_another_layout_leaves_states_fresh(tmp_path):
    _trained(tmp_path)
    stage = new_model(pre_process=False, layer_range=range(1, 2))
    got = _attach(stage)
    ckpt = load(str(tmp_path), [stage], ParallelState(pp_size=2, pp_rank=1))
    assert ckpt.module_states == (0, len(got))
    assert all(not h.amax.any() for h in got.values())


def test_checkpoint_without_states_and_model_without_holders(tmp_path):
    _trained(tmp_path / "bf16", with_state=False)
    fresh = new_model(seed=7)
    got = _attach(fresh)
    assert load(str(tmp_path / "bf16"), [fresh], ParallelState()).module_states == (0, len(got))
    assert all(not h.amax.any() for h in got.values())

    _trained(tmp_path / "fp8", with_state=True)
    plain = new_model(seed=7)
    assert load(str(tmp_path / "fp8"), [plain], ParallelState()).module_states == (0, 0)
