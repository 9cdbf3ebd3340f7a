"""The mesh follows Megatron's rank order: tp fastest, then dp, then pp."""

import torch.distributed as dist

from megatron_ds.parallel.topology import build_parallel_state, group_size
from tests.multiproc import run_world


def _coords(tp, pp):
    s = build_parallel_state(tp=tp, pp=pp)
    tp_ranks = [None] * s.tp_size
    if s.tp_group is not None:
        dist.all_gather_object(tp_ranks, dist.get_rank(), group=s.tp_group)
    return dict(rank=dist.get_rank(), tp=s.tp_rank, dp=s.dp_rank, pp=s.pp_rank, dp_size=s.dp_size,
                tp_ranks=tp_ranks, pp_ranks=s.pp_ranks, mp=group_size(s.mp_group))


def test_megatron_rank_order_tp2_pp2_dp2():
    out = run_world(8, _coords, tp=2, pp=2)
    for r, c in enumerate(out):
        assert c["rank"] == r
        # rank = pp * (tp*dp) + dp * tp + tp
        assert r == c["pp"] * 4 + c["dp"] * 2 + c["tp"]
        assert c["dp_size"] == 2
        assert c["tp_ranks"] == [r - c["tp"], r - c["tp"] + 1]
        assert c["pp_ranks"] == [r % 4, r % 4 + 4]
        assert c["mp"] == 4
