import numpy as np
import pytest
import torch

from megatron_ds.data.sampler import MegatronPretrainingSampler, collate


def batches(total, consumed, mbs, rank, dp, drop_last=True):
    return list(MegatronPretrainingSampler(total, consumed, mbs, rank, dp, drop_last=drop_last))


def test_rank_takes_its_slice_of_each_step():
    # Step size 2 * 3 = 6: rank 1 gets ids 2, 3 of every 6.
    assert batches(18, 0, 2, 1, 3) == [[2, 3], [8, 9], [14, 15]]


@pytest.mark.parametrize("total,consumed,mbs,dp", [(100, 0, 4, 2), (97, 12, 3, 4), (50, 7, 1, 5)])
def test_union_over_ranks_is_the_single_rank_step(total, consumed, mbs, dp):
    per_rank = [batches(total, consumed, mbs, r, dp) for r in range(dp)]
    single = batches(total, consumed, mbs * dp, 0, 1)
    assert all(len(b) == len(single) for b in per_rank)
    for step, ids in enumerate(single):
        assert sum((per_rank[r][step] for r in range(dp)), []) == ids


@pytest.mark.parametrize("k", [0, 8, 24, 40])
def test_resume_gives_the_tail_of_the_uninterrupted_run(k):
    full = batches(64, 0, 4, 1, 2)
    steps_done = k // 8
    assert batches(64, k, 4, 1, 2) == full[steps_done:]


def test_len_and_ragged_last_step():
    s = MegatronPretrainingSampler(23, 0, 2, 1, 3)  # steps of 6: 3 full, 5 left over
    assert len(s) == len(list(s)) == 3
    # Without drop_last the leftover ids 18..22 split as [18,19] [20,21] [22].
    assert batches(23, 0, 2, 1, 3, drop_last=False)[-1] == [20, 21]
    assert batches(23, 0, 2, 2, 3, drop_last=False)[-1] == [22]
    for rank in range(3):
        s = MegatronPretrainingSampler(23, 0, 2, rank, 3, drop_last=False)
        assert len(s) == len(list(s)) == 4
    assert batches(20, 20, 2, 0, 1) == []


@pytest.mark.parametrize("args", [(0, 0, 1, 0, 1), (10, 11, 1, 0, 1), (10, 0, 0, 0, 1),
                                  (10, 0, 1, 2, 2)])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        MegatronPretrainingSampler(*args)


def test_collate_stacks_into_tensors():
    samples = [{"tokens": np.arange(4, dtype=np.int64) + i,
                "loss_mask": np.ones(4, dtype=np.float32)} for i in range(3)]
    batch = collate(samples)
    assert batch["tokens"].shape == (3, 4) and batch["tokens"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["tokens"][2].tolist() == [2, 3, 4, 5]
