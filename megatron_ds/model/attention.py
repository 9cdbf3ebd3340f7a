"""Causal self-attention with grouped-query heads, split over tensor parallelism by heads.

Master weights (the single-process model): one fused ``qkv`` [(nq + 2 nkv) d, h] whose rows are
[q heads | k heads | v heads], head-major, exactly Hugging Face's q_proj/k_proj/v_proj stacked.
Query head i attends with KV head i // (nq / nkv) (HF's ``repeat_kv``).

Two TP layouts, chosen by the number of KV heads nkv against the TP size tp:

- nkv % tp == 0 (MHA, or GQA with enough KV heads): one ColumnParallelLinear ``qkv`` with
  partition_sizes [nq d, nkv d, nkv d]; rank r holds query heads r*nq/tp... and KV heads
  r*nkv/tp..., which are exactly the KV heads its query heads use.
- tp % nkv == 0 and tp > nkv (e.g. 67B's 8 KV heads at TP 16): KV heads cannot be split, so they
  are replicated. ``q`` is a ColumnParallelLinear of the query rows; ``kv`` holds the full
  [2 nkv d, h] K/V rows on every rank and each rank uses only the KV head of its query heads
  (head r // (tp / nkv)). Each rank therefore produces a partial gradient of ``kv.weight`` (only
  its own query heads' contribution), marked ``sum_grad_over_tp = True``: the trainer must SUM
  such grads over the TP group, always (with or without sequence parallelism).

Both draw their initial values from the same fused [(nq + 2 nkv) d, h] generator draw as the
single-process model, so init does not depend on the layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ds.config import ModelConfig
from megatron_ds.kernels import Kernels, select_kernels
from megatron_ds.model.kv_cache import KVCache
from megatron_ds.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_ds.parallel.linear_comm import linear_with_tp_comm
from megatron_ds.parallel.random import InitMethod, init_method_normal, param_generator
from megatron_ds.parallel.topology import group_rank, group_size


def kv_heads_replicated(config: ModelConfig, tp: int) -> bool:
    """True when TP exceeds the KV heads and each rank needs a replicated copy of one KV head."""
    nkv = config.num_kv_heads
    if nkv % tp == 0:
        return False
    if tp % nkv == 0:
        return True
    raise ValueError(f"--tensor-model-parallel-size {tp} neither divides nor is a multiple of the "
                     f"{nkv} KV heads (--num-query-groups); pick a TP size that divides or is a multiple of {nkv}")


def fused_rows_init(init_method: InitMethod, fused_rows: int, start: int) -> InitMethod:
    """An init method that draws the full fused master [fused_rows, in] and keeps rows [start, start + n).

    Handed to a layer whose own master has n rows, it reproduces the rows that the single-process
    fused layer drew for it from the same generator seed.
    """

    def init_(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        fused = torch.empty((fused_rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        init_method(fused, generator)
        with torch.no_grad():
            return tensor.copy_(fused[start:start + tensor.shape[0]])

    return init_


class ReplicatedKVLinear(nn.Module):
    """K/V projection replicated over TP: every rank holds W[2 nkv d, h] (rows [k heads | v heads]),
    computes only KV head ``kv_head``: X [s,b,h] replicated (SP: own [s/tp,b,h]) -> [s,b,2d] = [k | v];
    fwd identity (SP: all-gather dim 0), bwd all-reduce of dX (SP: reduce-scatter dim 0).

    The weight grad on each rank is partial (``sum_grad_over_tp = True``); see the module docstring.
    """

    def __init__(self, hidden_size: int, num_kv_heads: int, head_dim: int, kv_head: int, *, tp_group,
                 init_method: InitMethod, init_generator: torch.Generator, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_kv_heads, self.head_dim, self.kv_head = num_kv_heads, head_dim, kv_head
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(2 * num_kv_heads * head_dim, hidden_size,
                                               dtype=params_dtype, device=device))
        self.weight.sum_grad_over_tp = True
        if self.weight.device.type != "meta":
            master = torch.empty(self.weight.shape, dtype=torch.float32, device=init_generator.device)
            init_method(master, init_generator)
            with torch.no_grad():
                self.weight.copy_(master)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h = self.head_dim, self.weight.shape[1]
        w = self.weight.view(2, self.num_kv_heads, d, h)[:, self.kv_head].reshape(2 * d, h)
        # The consumer (this rank's query heads) is TP-sharded: dX is partial, so it is summed over TP
        # (reduce-scattered under SP), as for a column-parallel linear.
        return linear_with_tp_comm(x, w, self.tp_group, self.sequence_parallel)  # [s, b, 2d]

    def extra_repr(self) -> str:
        return f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, uses_kv_head={self.kv_head}, replicated"


class Attention(nn.Module):
    """[s,b,h] (SP: [s/tp,b,h]) -> QKV -> RoPE -> causal SDPA over this rank's heads -> out-proj -> same shape."""

    def __init__(self, config: ModelConfig, layer_number: int, *, tp_group=None, sequence_parallel: bool = False,
                 seed: int = 1234, params_dtype: torch.dtype = torch.float32, device=None,
                 kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or select_kernels()
        tp, rank = group_size(tp_group), group_rank(tp_group)
        h, d = config.hidden_size, config.head_dim
        nq, nkv = config.num_attention_heads, config.num_kv_heads
        if nq % tp != 0:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide {nq} attention heads")
        if nq % nkv != 0:
            raise ValueError(f"--num-query-groups {nkv} does not divide --num-attention-heads {nq}")
        self.layer_number = layer_number
        self.head_dim = d
        self.num_local_heads = nq // tp
        self.replicated_kv = kv_heads_replicated(config, tp)
        self.num_local_kv_heads = 1 if self.replicated_kv else nkv // tp

        prefix = f"layers.{layer_number}.attention"
        init = init_method_normal(config.init_method_std)
        common = dict(tp_group=tp_group, sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device)
        fused_rows = (nq + 2 * nkv) * d
        if not self.replicated_kv:
            self.qkv = ColumnParallelLinear(h, fused_rows, init_method=init,
                                            init_generator=param_generator(seed, f"{prefix}.qkv", device),
                                            partition_sizes=[nq * d, nkv * d, nkv * d], **common)
        else:
            # Both halves re-draw the fused master from the same (seed, key) and keep their rows.
            self.q = ColumnParallelLinear(h, nq * d, init_method=fused_rows_init(init, fused_rows, 0),
                                          init_generator=param_generator(seed, f"{prefix}.qkv", device), **common)
            self.kv = ReplicatedKVLinear(h, nkv, d, kv_head=rank // (tp // nkv),
                                         init_method=fused_rows_init(init, fused_rows, nq * d),
                                         init_generator=param_generator(seed, f"{prefix}.qkv", device), **common)
        self.out = RowParallelLinear(nq * d, h, init_method=init, input_is_parallel=True,
                                     init_generator=param_generator(seed, f"{prefix}.out", device), **common)

    def extra_repr(self) -> str:
        return (f"local_heads={self.num_local_heads}, local_kv_heads={self.num_local_kv_heads}, "
                f"head_dim={self.head_dim}, replicated_kv={self.replicated_kv}")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """attention_mask: None for plain causal attention, or bool [b, 1, s, s] with True where
        query i may attend key j (it must include causality; see deepseek.document_causal_mask).
        kv_cache (inference only): x holds the s tokens after the cache's seq_len cached ones; their
        K/V are appended and the queries attend over all seq_len + s positions."""
        d, nq, nkv = self.head_dim, self.num_local_heads, self.num_local_kv_heads
        if self.replicated_kv:
            # Under SP both q and kv all-gather x: twice the gather of the fused case, but only in
            # this TP > KV-heads layout, and it keeps both layers' backward contracts plain.
            # RoPE on all of q, and on the k half of kv (its first head); the fused kernel works in place.
            q = self.kernels.apply_rotary_qk(self.q(x), nq, d, cos, sin)  # [s, b, nq d]
            k, v = self.kernels.apply_rotary_qk(self.kv(x), 1, d, cos, sin).split([d, d], dim=-1)  # [s, b, d] each
        else:
            # RoPE on the first nq + nkv heads of [q | k | v]: q and k.
            qkv = self.kernels.apply_rotary_qk(self.qkv(x), nq + nkv, d, cos, sin)
            q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
        s, b = q.shape[:2]
        q, k, v = q.view(s, b, nq, d), k.view(s, b, nkv, d), v.view(s, b, nkv, d)
        # SDPA wants [b, n, s, d]; query head i uses KV head i // (nq / nkv), as HF's repeat_kv.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        is_causal = attention_mask is None
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_number, k, v)  # [b, nkv, L + s, d]
            if is_causal and k.shape[2] > s:
                # Queries at positions L..L+s-1 over keys 0..L+s-1: SDPA's is_causal would align them top-left.
                attention_mask, is_causal = kv_cache.causal_mask(s), False
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=is_causal,
                                           enable_gqa=nq != nkv)  # [b, nq, s, d]
        o = o.permute(2, 0, 1, 3).reshape(s, b, nq * d)
        return self.out(o)  # [s, b, h] (SP: [s/tp, b, h])
