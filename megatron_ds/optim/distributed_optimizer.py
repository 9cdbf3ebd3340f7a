"""The optimizer the trainer steps: fp32 master weights, fused AdamW, global-norm clipping, for
plain data parallelism and for ZeRO-1 (``--use-distributed-optimizer``), fp32 or bf16 params.

One object, one path; what differs is only who owns which elements:

                         grads after sync          master weights + Adam state     model params after step
    plain DP (fp32)      full buffer, DP-summed    the param buffer itself          updated in place
    plain DP (bf16)      full buffer, DP-summed    fp32 copy of the whole buffer    bf16 copy of the master
    ZeRO-1               own 1/DP chunk per bucket fp32, own chunks only (1/DP)     own chunks, all-gathered

Layout: every model chunk's params become views into one contiguous *param buffer* laid out like
its ``GradBuffer`` (reverse order, buckets padded to a multiple of DP under ZeRO-1), so a rank's
shard of params, grads, master weights and both moments are the same index range, and AdamW is
one fused pass per weight-decay segment of it.

Step (``step(lr) -> grad_norm``):
  1. finish the DP grad collectives (all-reduce, or reduce-scatter under ZeRO-1);
  2. SUM over TP the grads of TP-replicated params whose grad is partial on each rank (norm weights
     under SP, replicated KV heads): the shard's index ranges match across TP ranks, so this works
     on the shard as on the full buffer;
  3. global grad norm: sum of squares over the local shard (TP-replicated params on TP rank 0 only),
     all-reduced over DP (ZeRO-1: the shards are disjoint) and over the model-parallel group;
  4. clip; 5. fused AdamW on the shard; 6. copy to the model params (bf16) and all-gather (ZeRO-1).

``overlap_param_gather`` (``--overlap-param-gather``, ZeRO-1): ``step`` returns with one async
all-gather per bucket still in flight, and a forward pre-hook on every module that owns parameters
waits for just the buckets holding them, so layer i computes while the buckets of later layers
still arrive. Whoever reads the params outside a forward (checkpoint save, the end of training)
calls ``finish_param_sync`` first; ``step`` itself does before it writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_ds.optim.fused_adamw import fused_adamw_
from megatron_ds.parallel.grad_buffer import GradBuffer
from megatron_ds.parallel.topology import ParallelState, group_size


def _merge(segments: list[tuple[int, int, object]]) -> list[tuple[int, int, object]]:
    """Join adjacent (start, end, tag) segments with equal tags."""
    out: list[tuple[int, int, object]] = []
    for s, e, tag in segments:
        if out and out[-1][1] == s and out[-1][2] == tag:
            out[-1] = (out[-1][0], e, tag)
        elif e > s:
            out.append((s, e, tag))
    return out


def _needs_tp_sum(p) -> bool:
    return getattr(p, "sequence_parallel", False) or getattr(p, "sum_grad_over_tp", False)


@dataclass
class _Shard:
    """What one rank owns of one model chunk's buffers (all flat, same index range)."""

    grad_buffer: GradBuffer
    param_buffer: torch.Tensor
    """(numel,) model-dtype params of the chunk, every param a view of it."""
    grad: torch.Tensor
    """(S,) fp32: DP-summed grads of the owned elements."""
    master: torch.Tensor
    """(S,) fp32 master weights (aliases param_buffer for plain-DP fp32)."""
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    ranges: list[tuple[int, int, int]]
    """(param buffer offset, shard offset, length) of every owned piece."""
    decay_segments: list = field(default_factory=list)
    """(start, end, weight_decay) in shard coordinates, covering [0, S)."""
    norm_segments: list = field(default_factory=list)
    """(start, end, _) of the elements this rank counts in the grad norm."""
    tp_sum_segments: list = field(default_factory=list)
    """(start, end, _) of grads to SUM over TP."""

    @property
    def master_is_param_buffer(self) -> bool:
        return self.master.data_ptr() == self.param_buffer.data_ptr()


class MegatronOptimizer:
    """AdamW with fp32 master weights, optionally sharded over DP (ZeRO-1); see the module docstring.

    The trainer calls::

        opt = MegatronOptimizer(model_chunks, state, lr=..., weight_decay=..., betas=..., eps=...,
                                clip_grad=..., bucket_size=..., distributed=cfg.use_distributed_optimizer)
        opt.zero_grad()                              # before the micro-batches of a step
        ... forward/backward, handing opt.grad_buffers to the schedule (is_last_microbatch) ...
        grad_norm = opt.step(lr)                     # sync, clip, AdamW, params updated everywhere
    """

    def __init__(self, model_chunks, state: ParallelState, *, lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, clip_grad: float = 1.0,
                 bucket_size: int = 25_000_000, distributed: bool = False, overlap: bool = True,
                 overlap_param_gather: bool = False, use_fused_kernel: bool = True):
        chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.state = state
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.clip_grad = clip_grad
        self.distributed = distributed
        self.use_fused_kernel = use_fused_kernel
        self.iteration = 0  # Adam's t: updates taken so far
        self.shards = [self._build_shard(c, bucket_size, overlap) for c in chunks]
        self.grad_buffers = [s.grad_buffer for s in self.shards]
        self._gathering = False  # ZeRO-1: parameter all-gathers in flight since the last step
        self.overlap_param_gather = overlap_param_gather and distributed and group_size(state.dp_group) > 1
        self._hooks = []
        if self.overlap_param_gather:
            for c, s in zip(chunks, self.shards):
                self._hook_forward(c, s.grad_buffer)

    # -- construction --------------------------------------------------------------------------

    def _build_shard(self, chunk: torch.nn.Module, bucket_size: int, overlap: bool) -> _Shard:
        params = [p for p in chunk.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise ValueError(f"all trainable params of a model chunk must share one dtype, got {sorted(map(str, dtypes))}")
        dtype = dtypes.pop() if dtypes else torch.float32
        device = params[0].device if params else torch.device("cpu")
        gb = GradBuffer(params, self.state.dp_group, bucket_size=bucket_size, overlap=overlap,
                        distributed=self.distributed)
        # Move every param into one flat buffer in the grad buffer's layout (padding stays zero).
        param_buffer = torch.zeros(gb.numel, dtype=dtype, device=device)
        for p in gb.params:
            off = gb.param_offsets[id(p)]
            view = param_buffer[off: off + p.numel()]
            view.copy_(p.data.reshape(-1))
            p.data = view.view(p.shape)
        if self.distributed:
            ranges = gb.shard_ranges
            grad = gb.shard_grad
        else:
            ranges = [(0, 0, gb.numel)]
            grad = gb.buffer
        size = grad.numel()
        if not self.distributed and dtype == torch.float32:
            master = param_buffer  # plain DP in fp32: the params are the master weights
        else:
            master = torch.empty(size, dtype=torch.float32, device=device)
            for buf_off, sh_off, n in ranges:
                master[sh_off: sh_off + n].copy_(param_buffer[buf_off: buf_off + n])
        shard = _Shard(gb, param_buffer, grad, master, torch.zeros_like(master), torch.zeros_like(master), ranges)
        self._segments(shard)
        return shard

    def _segments(self, shard: _Shard) -> None:
        """Cut the shard into index ranges by weight decay, grad-norm membership and TP grad sum."""
        gb, st = shard.grad_buffer, self.state
        spans = sorted((gb.param_offsets[id(p)], p) for p in gb.params)  # buffer order, ascending
        decay, norm, tp_sum = [], [], []
        for buf_off, sh_off, n in shard.ranges:
            cursor = buf_off  # walk the owned buffer interval [buf_off, buf_off + n)
            for off, p in spans:
                lo, hi = max(off, buf_off), min(off + p.numel(), buf_off + n)
                if lo >= hi:
                    continue
                if lo > cursor:  # padding before this param
                    decay.append((cursor - buf_off + sh_off, lo - buf_off + sh_off, 0.0))
                s, e = lo - buf_off + sh_off, hi - buf_off + sh_off
                # Norm weights (1-D) are not decayed: the paper's recipe.
                decay.append((s, e, 0.0 if p.ndim == 1 else self.weight_decay))
                replicated = st.tp_size > 1 and not getattr(p, "tensor_model_parallel", False)
                if not (replicated and st.tp_rank != 0):
                    norm.append((s, e, None))
                if st.tp_size > 1 and _needs_tp_sum(p):
                    tp_sum.append((s, e, None))
                cursor = hi
            if cursor < buf_off + n:
                decay.append((cursor - buf_off + sh_off, n + sh_off, 0.0))
        shard.decay_segments = _merge(decay)
        shard.norm_segments = _merge(norm)
        shard.tp_sum_segments = _merge(tp_sum)

    def _hook_forward(self, chunk: torch.nn.Module, gb: GradBuffer) -> None:
        """A forward pre-hook on every module that owns trainable params: wait for their buckets."""
        for module in chunk.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            buckets = list({id(b): b for b in map(gb.bucket_of, own)}.values())

            def wait(_module, _args, gb=gb, buckets=buckets):
                if self._gathering:
                    gb.wait_param_gather(buckets)

            self._hooks.append(module.register_forward_pre_hook(wait))

    def finish_param_sync(self) -> None:
        """Complete the ZeRO-1 parameter all-gathers still in flight: after this every rank's model
        params are whole. Call before reading the params outside a forward."""
        if self._gathering:
            for s in self.shards:
                s.grad_buffer.wait_param_gather()
            self._gathering = False

    # -- the step ------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for s in self.shards:
            s.grad_buffer.zero_grad()

    def _sum_tp_replicated_grads(self) -> None:
        pieces = [s.grad[a:b] for s in self.shards for a, b, _ in s.tp_sum_segments]
        if not pieces or group_size(self.state.tp_group) == 1:
            return
        # One all-reduce for all of them: norm weights are tiny and a call each would be all latency.
        flat = torch.cat(pieces)
        dist.all_reduce(flat, group=self.state.tp_group)
        for g, reduced in zip(pieces, flat.split([g.numel() for g in pieces])):
            g.copy_(reduced)

    def grad_norm(self) -> float:
        """Global L2 norm of the (synced) gradient of the whole model, the same on every rank."""
        st = self.state
        # On the rank's device even with no shard here: NCCL has no CPU tensors.
        device = self.shards[0].grad.device if self.shards else st.device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for s in self.shards:
            for a, b, _ in s.norm_segments:
                g = s.grad[a:b]
                sq += torch.dot(g, g)
        if self.distributed and group_size(st.dp_group) > 1:
            dist.all_reduce(sq, group=st.dp_group)  # disjoint shards: the sum over DP is the whole
        if group_size(st.mp_group) > 1:
            dist.all_reduce(sq, group=st.mp_group)
        return math.sqrt(sq.item())

    @torch.no_grad()
    def step(self, lr: float | None = None) -> float:
        """Sync grads, clip to the global norm, AdamW on the owned shard, update the model params.

        Returns the grad norm before clipping. A non-finite norm skips the update (and says so by
        returning it), so one bad batch cannot write NaN into the master weights.
        """
        lr = self.lr if lr is None else lr
        self.finish_param_sync()  # a param no forward read may still be arriving; it is written below
        for s in self.shards:
            s.grad_buffer.finish_grad_sync()
        self._sum_tp_replicated_grads()
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return norm
        if self.clip_grad > 0:
            coef = self.clip_grad / (norm + 1e-6)  # torch's clip_grad_norm_ guard
            if coef < 1.0:
                for s in self.shards:
                    s.grad.mul_(coef)
        self.iteration += 1
        b1, b2 = self.betas
        for s in self.shards:
            for a, b, wd in s.decay_segments:
                fused_adamw_(s.master[a:b], s.grad[a:b], s.exp_avg[a:b], s.exp_avg_sq[a:b], lr=lr, beta1=b1,
                             beta2=b2, eps=self.eps, weight_decay=wd, step=self.iteration,
                             use_kernel=self.use_fused_kernel)
            if not s.master_is_param_buffer:
                for buf_off, sh_off, n in s.ranges:
                    s.param_buffer[buf_off: buf_off + n].copy_(s.master[sh_off: sh_off + n])
            if self.distributed:
                s.grad_buffer.start_param_gather(s.param_buffer)
        self._gathering = self.distributed and group_size(self.state.dp_group) > 1
        if not self.overlap_param_gather:
            self.finish_param_sync()  # else the next forward's pre-hooks wait, bucket by bucket
        return norm

    # -- state ---------------------------------------------------------------------------------

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Copy the model params into the fp32 master weights: call after loading model weights
        from a checkpoint that has no optimizer state (bf16 or ZeRO-1 keep a separate master)."""
        self.finish_param_sync()
        for s in self.shards:
            if not s.master_is_param_buffer:
                for buf_off, sh_off, n in s.ranges:
                    s.master[sh_off: sh_off + n].copy_(s.param_buffer[buf_off: buf_off + n])

    def state_numel(self) -> dict[str, int]:
        """Elements of optimizer state this rank holds: Adam moments and separate fp32 master weights."""
        moments = sum(s.exp_avg.numel() + s.exp_avg_sq.numel() for s in self.shards)
        master = sum(0 if s.master_is_param_buffer else s.master.numel() for s in self.shards)
        return {"moments": moments, "master": master}

    def state_dict(self) -> dict:
        """This rank's state (its shard under ZeRO-1): step count, moments, fp32 master weights when
        they are not the model params themselves."""
        return {
            "iteration": self.iteration,
            "distributed": self.distributed,
            "dp_size": self.state.dp_size,
            "shards": [{"exp_avg": s.exp_avg, "exp_avg_sq": s.exp_avg_sq,
                        "master": None if s.master_is_param_buffer else s.master} for s in self.shards],
        }

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        if sd["distributed"] != self.distributed or sd["dp_size"] != self.state.dp_size or \
                len(sd["shards"]) != len(self.shards):
            raise ValueError(f"optimizer state was saved with distributed={sd['distributed']} at DP {sd['dp_size']}; "
                             f"this run has distributed={self.distributed} at DP {self.state.dp_size}")
        self.iteration = sd["iteration"]
        for s, saved in zip(self.shards, sd["shards"]):
            s.exp_avg.copy_(saved["exp_avg"])
            s.exp_avg_sq.copy_(saved["exp_avg_sq"])
            if saved["master"] is not None and not s.master_is_param_buffer:
                s.master.copy_(saved["master"])


def build_optimizer(training_cfg, model_chunks, state: ParallelState) -> MegatronOptimizer:
    """The optimizer for a TrainingConfig (--use-distributed-optimizer, AdamW and clipping flags)."""
    t = training_cfg
    return MegatronOptimizer(model_chunks, state, lr=t.lr, weight_decay=t.weight_decay,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, clip_grad=t.clip_grad,
                             bucket_size=int(t.bucket_size_mb * 1024 * 1024 / 4),
                             distributed=getattr(t, "use_distributed_optimizer", False),
                             overlap_param_gather=getattr(t, "overlap_param_gather", False))
