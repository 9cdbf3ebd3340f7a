"""Optimizer state held the ZeRO-1 way (each DP rank a flat range of every local parameter) is
saved by its owners and read back at another TP x DP split, as blocks or as other flat ranges.

The state is a known function of the weights (exp_avg = 2 w + 1), so the expected value at any
layout is computed from the HF weights directly.
"""

import torch

from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import (
    buffer_sharded_tensors, model_sharded_tensors, param_sharded_tensors,
)
from megatron_ds.checkpoint.save import save_checkpoint
from megatron_ds.model.hf_names import shard_hf_state_dict_for_tp
from megatron_ds.parallel.topology import VirtualGroup
from tests.checkpoint.helpers import config, hf_weights, model_with_weights, new_model, parallel_state
from tests.multiproc import run_world

PREFIX = "optimizer/exp_avg/model/"


def _flat_range(n: int, dp_rank: int, dp: int) -> tuple[int, int]:
    return n * dp_rank // dp, n * (dp_rank + 1) // dp


def _save_zero(root, hf_sd):
    state = parallel_state(tp=2, pp=1)  # world 4: TP2 x DP2
    model = model_with_weights(state, hf_sd)
    pieces = model_sharded_tensors(model, dp_rank=state.dp_rank)
    for name, p in model.named_parameters():
        a, b = _flat_range(p.numel(), state.dp_rank, state.dp_size)
        exp_avg = (2 * p.detach() + 1).reshape(-1)[a:b]  # this DP rank's ZeRO shard
        pieces += param_sharded_tensors(model, name, exp_avg, prefix=PREFIX, flat_range=(a, b))
    save_checkpoint(root, 1, pieces, config=config())


def _expected(tp_rank, tp):
    sd = shard_hf_state_dict_for_tp(hf_weights(), config(), tp_rank, tp)
    out = {n: 2 * t + 1 for n, t in sd.items()}
    for n in ("embedding.weight", "lm_head.weight"):  # padding rows are not stored: they read as zero
        out[n][config().vocab_size - tp_rank * out[n].shape[0]:] = 0
    return out


def test_zero_shards_load_as_blocks_and_as_other_flat_ranges(tmp_path):
    root = str(tmp_path)
    run_world(4, _save_zero, root=root, hf_sd=hf_weights())
    reader = CheckpointReader(root)
    # TP1, whole tensors.
    model = new_model()
    want = _expected(0, 1)
    for name, p in model.named_parameters():
        buf = torch.zeros_like(p)
        for piece in param_sharded_tensors(model, name, buf, prefix=PREFIX):
            reader.read_into(piece)
        assert torch.equal(buf, want[name]), name
    # TP4 x DP3: flat ranges that cut the saved ranges anywhere (replicated KV heads included).
    for tp_rank in range(4):
        model = new_model(tp_group=VirtualGroup(4, tp_rank))
        want = _expected(tp_rank, 4)
        for name, p in model.named_parameters():
            for dp_rank in range(3):
                a, b = _flat_range(p.numel(), dp_rank, 3)
                buf = torch.zeros(b - a)
                for piece in param_sharded_tensors(model, name, buf, prefix=PREFIX, flat_range=(a, b)):
                    reader.read_into(piece)
                assert torch.equal(buf, want[name].reshape(-1)[a:b]), (name, tp_rank, dp_rank)


def _buffer_layout(model, dp):
    """Params packed in reverse order into one flat buffer padded to a multiple of dp (as the
    optimizer's grad buffers are); returns ({name: (start, end)}, total size)."""
    ranges, pos = {}, 0
    for name, p in reversed(list(model.named_parameters())):
        ranges[name] = (pos, pos + p.numel())
        pos += p.numel() + 3  # a gap, like bucket padding, that is never stored
    return ranges, -(-pos // dp) * dp


def _save_zero_buffer(root, hf_sd):
    state = parallel_state(tp=2, pp=1)  # world 4: TP2 x DP2
    model = model_with_weights(state, hf_sd)
    ranges, total = _buffer_layout(model, state.dp_size)
    buffer = torch.zeros(total)
    for name, p in model.named_parameters():
        buffer[ranges[name][0]:ranges[name][1]] = (2 * p.detach() + 1).reshape(-1)
    s, e = total * state.dp_rank // state.dp_size, total * (state.dp_rank + 1) // state.dp_size
    pieces = buffer_sharded_tensors(model, ranges, buffer[s:e].clone(), (s, e), PREFIX)
    save_checkpoint(root, 1, pieces, config=config())


def test_optimizer_buffer_shards_load_at_another_tp_and_dp(tmp_path):
    root = str(tmp_path)
    run_world(4, _save_zero_buffer, root=root, hf_sd=hf_weights())
    reader = CheckpointReader(root)
    for tp_rank in range(4):  # TP4 x DP3 over a buffer laid out for this layout
        model = new_model(tp_group=VirtualGroup(4, tp_rank))
        ranges, total = _buffer_layout(model, 3)
        buffer = torch.zeros(total)
        for dp_rank in range(3):
            s, e = total * dp_rank // 3, total * (dp_rank + 1) // 3
            for piece in buffer_sharded_tensors(model, ranges, buffer[s:e], (s, e), PREFIX):
                reader.read_into(piece)
        want = _expected(tp_rank, 4)
        for name, (a, b) in ranges.items():
            assert torch.equal(buffer[a:b], want[name].reshape(-1)), (name, tp_rank)
