"""Layout planner: enumerate TP x PP x DP x micro-batch x recompute (x interleaving) for a model on a
cluster, estimate memory per GPU (``megatron_ds.memory``) and step time, and rank what fits.

Step-time model (one optimizer step, every quantity per GPU):

    compute per micro-batch on a stage   F_stage / (TP * peak * gemm_efficiency)
        F per token = 6 x GEMM weights + 12 h s per layer (megatron_ds/flops.py, no causal discount),
        + 6 h V for the LM head on the last stage; recompute 'full' adds one more forward of the
        layers (x 4/3), 'selective' the attention core's forward (4 h s per layer and token).
    TP (SP) comm per layer per micro-batch, over NVLink, 10 transfers of the (s b h) bf16 activation,
        each moving (t-1)/t of it per GPU  ->  10 (t-1)/t * s b h * 2 bytes:
        forward 2 all-gathers + 2 reduce-scatters; backward the 2 all-gathers of the row-parallel
        outputs' grads, and in each column-parallel backward (QKV, gate/up) the re-gather of its
        input and the reduce-scatter of its input grad (parallel/linear_comm.py); full recompute
        adds the forward's 4 again. The column-parallel ones overlap a GEMM each (the re-gather the
        dX GEMM, the reduce-scatter the dW GEMM, each 2 s b h out / t FLOPs) and are exposed only
        by what exceeds it; ``tp_overlap`` of the other 6 (10 under full recompute) is hidden.
    PP p2p per micro-batch per stage: the stage's output forward and its gradient backward, each
        s b h * 2 / t bytes (SP: each TP rank sends its sequence shard), x V when interleaved; over IB
        when the next stage is on another node, NVLink otherwise.
    pipeline: step = t_mb * (M + (P-1)/V); bubble = ((P-1)/V) / (M + (P-1)/V)
        (t_mb: the slowest stage's forward + backward of one micro-batch; M micro-batches per DP rank).
    ZeRO-1 per step: reduce-scatter of fp32 grads (4 bytes) and all-gather of bf16 params (2 bytes) of the
        rank's parameters n, each (d-1)/d * n * bytes over IB (NVLink if the DP group stays in a node);
        ``dp_overlap`` of the reduce-scatter hides behind the last micro-batch's backward, and
        ``param_gather_overlap`` of the all-gather behind the next step's first forward
        (--overlap-param-gather, which the launch scripts set).

Every collective also pays ``latency_us``. Nothing here is measured; the figures are settable.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_ds.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainingConfig, model_preset, validate
from megatron_ds.flops import PEAK_TFLOPS, head_forward_flops_per_token, layer_forward_flops_per_token
from megatron_ds.memory import GiB, MemoryEstimate, estimate


@dataclass
class GPUSpec:
    """One GPU type: memory, dense bf16 peak, and achievable per-GPU bus bandwidths (GB/s = 1e9 B/s)."""

    name: str
    memory_gib: float
    peak_bf16_tflops: float
    nvlink_gbps: float
    """Intra-node bus bandwidth per GPU a ring collective reaches (nccl-tests busbw), not the link's peak."""
    ib_gbps: float
    """Inter-node bandwidth per GPU (one NIC per GPU: 200 Gb/s HDR ~ 23, 400 Gb/s NDR ~ 45 achievable)."""


# Dense (no sparsity) bf16 peaks of the SXM parts; bandwidths are what NCCL reaches, about 75-80% of the link.
GPUS: dict[str, GPUSpec] = {
    "a100": GPUSpec("a100", 80, PEAK_TFLOPS["a100"]["bf16"], 230, 23),
    "h100": GPUSpec("h100", 80, PEAK_TFLOPS["h100"]["bf16"], 360, 45),
    "h200": GPUSpec("h200", 141, PEAK_TFLOPS["h200"]["bf16"], 360, 45),
}


@dataclass
class Cluster:
    num_gpus: int
    gpus_per_node: int = 8
    gpu: GPUSpec = field(default_factory=lambda: GPUS["h100"])
    gemm_efficiency: float = 0.55
    """Fraction of peak the GEMMs (and flash attention) reach."""
    headroom: float = 0.15
    """Share of GPU memory kept free: CUDA context, NCCL buffers, allocator fragmentation, and the
    estimate's own error (memory.py is held to within 15% of measured peaks)."""
    latency_us: float = 15.0
    """Fixed cost of each collective or p2p transfer."""
    dp_overlap: float = 0.5
    """Share of the ZeRO-1 reduce-scatter hidden behind the last micro-batch's backward."""
    param_gather_overlap: float = 0.5
    """Share of the ZeRO-1 parameter all-gather hidden behind the next step's first forward
    (--overlap-param-gather); 0 models a run without that flag."""
    tp_overlap: float = 0.0
    """Share of the TP/SP communication outside the column-parallel backward (forward, row-parallel
    backward) hidden behind GEMMs (0: this trainer does not overlap those)."""

    @property
    def budget_bytes(self) -> float:
        return self.gpu.memory_gib * (1 - self.headroom) * GiB


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    recompute: Optional[str]
    vpp: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    stage_layers: tuple = ()

    def flags(self, num_layers: int) -> list[str]:
        """The pretrain flags for this layout, with what its estimates assume: bf16 params, ZeRO-1
        (--use-distributed-optimizer) and the all-gather overlapped with the next forward
        (--overlap-param-gather)."""
        out = ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp),
               "--micro-batch-size", str(self.micro_batch), "--bf16", "--use-distributed-optimizer",
               "--overlap-param-gather"]
        if self.tp > 1:
            out.append("--sequence-parallel")
        out += split_flags(list(self.stage_layers)) if self.pp > 1 and self.vpp == 1 else []
        if self.vpp > 1:
            out += ["--num-layers-per-virtual-pipeline-stage", str(num_layers // (self.pp * self.vpp))]
        if self.recompute:
            out += ["--recompute-granularity", self.recompute]
        return out

    def name(self) -> str:
        v = f" V{self.vpp}" if self.vpp > 1 else ""
        return f"TP{self.tp} PP{self.pp}{v} DP{self.dp} mb{self.micro_batch} rc={self.recompute or 'none'}"


@dataclass
class Plan:
    layout: Layout
    feasible: bool
    reason: str = ""
    memory: Optional[MemoryEstimate] = None
    memory_stage: int = 0
    num_microbatches: int = 0
    step_s: float = math.inf
    compute_s: float = 0.0
    tp_comm_s: float = 0.0
    pp_comm_s: float = 0.0
    dp_comm_s: float = 0.0
    bubble: float = 0.0
    mfu: float = 0.0

    @property
    def memory_gib(self) -> float:
        return self.memory.total / GiB if self.memory else math.nan

    @property
    def comm_share(self) -> float:
        return (self.tp_comm_s + self.pp_comm_s + self.dp_comm_s) / self.step_s if self.step_s else 0.0

    def reasoning(self) -> str:
        if not self.feasible:
            return self.reason
        m = self.memory
        g = lambda n: f"{n / GiB:.1f}"  # noqa: E731
        return (f"stage {self.memory_stage}: params {g(m.params)} + grads {g(m.grads)} + optim {g(m.optimizer)} + "
                f"act {g(m.activations_per_microbatch)}x{m.in_flight} GiB; bubble {self.bubble:.1%}; "
                f"comm {self.comm_share:.1%} (tp {self.tp_comm_s:.2f}s pp {self.pp_comm_s:.2f}s "
                f"dp {self.dp_comm_s:.2f}s exposed)")


def split_flags(counts: list[int]) -> list[str]:
    """Pretrain flags for a layer split: nothing if even, first/last flags if only those differ."""
    if len(set(counts)) == 1:
        return []
    first, mid, last = counts[0], counts[1:-1], counts[-1]
    if len(counts) > 2 and len(set(mid)) == 1:
        out = []
        if first != mid[0]:
            out += ["--decoder-first-pipeline-num-layers", str(first)]
        if last != mid[0]:
            out += ["--decoder-last-pipeline-num-layers", str(last)]
        return out
    return ["--pipeline-layer-split", ",".join(map(str, counts))]


def layer_flops_per_token(config: ModelConfig, seq: int) -> float:
    """Forward + backward FLOPs of one transformer layer per token (megatron_ds/flops.py, x3)."""
    return 3.0 * layer_forward_flops_per_token(config, seq)


def head_flops_per_token(config: ModelConfig) -> float:
    """Forward + backward FLOPs of the LM head per token (6 h V; the cross-entropy is negligible)."""
    return 3.0 * head_forward_flops_per_token(config)


def balanced_split(num_layers: int, pp: int, head_layers: float) -> list[int]:
    """Layers per stage minimizing the slowest stage when the last also runs the LM head (worth
    ``head_layers`` layers): cap every stage at T layers (the last at T - head), raise T until the
    caps hold all layers, then take the excess off stages first-to-last, round-robin (the first stage
    holds the most micro-batches in flight under 1F1B, so it is the one to lighten)."""
    for cap in range(math.ceil(num_layers / pp), num_layers + 1):
        caps = [cap] * (pp - 1) + [max(1, math.floor(cap - head_layers + 1e-9))]
        excess = sum(caps) - num_layers
        if excess < 0:
            continue
        counts, i = caps[:], 0
        while excess > 0:
            j = i % (pp - 1) if pp > 1 else 0
            if counts[j] > 1:
                counts[j] -= 1
                excess -= 1
            i += 1
        if min(counts) >= 1:
            return counts
    raise ConfigError(f"cannot split {num_layers} layers into {pp} pipeline stages")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _memory(config: ModelConfig, lay: Layout, seq: int) -> tuple[MemoryEstimate, int]:
    """The largest per-stage estimate and its stage. Only a few stages can be the largest: the first,
    the last, and the lowest-numbered stage of each layer count (fewer micro-batches in flight further on)."""
    counts = list(lay.stage_layers)
    ranks = {0, lay.pp - 1}
    for n in set(counts):
        ranks.add(counts.index(n))
    best = None
    for r in sorted(ranks):
        e = estimate(config, tp=lay.tp, pp=lay.pp, dp=lay.dp, sp=lay.tp > 1, recompute=lay.recompute,
                     micro_batch=lay.micro_batch, seq=seq, bf16=True, distributed_optimizer=True, pp_rank=r,
                     stage_layers=counts)
        if lay.vpp > 1:
            # memory.py models plain 1F1B; interleaving keeps (P-1)/(P V) more layer-micro-batches on rank 0
            # (Megatron's warmup of 2(P-r-1) + (V-1)P chunk micro-batches).
            extra = 1 + (lay.pp - 1) / (lay.pp * lay.vpp) if r == 0 else 1
            e = dataclasses.replace(e, activations_per_microbatch=int(e.activations_per_microbatch * extra))
        if best is None or e.total > best[0].total:
            best = (e, r)
    return best


def comm_time(bytes_: float, gbps: float, cluster: Cluster, count: int = 1) -> float:
    return bytes_ / (gbps * 1e9) + count * cluster.latency_us * 1e-6


def tp_bytes_per_layer(config: ModelConfig, tp: int, seq: int, micro_batch: int, recompute: Optional[str]) -> float:
    """Bytes each GPU moves for TP/SP in one layer's forward + backward of one micro-batch (bf16)."""
    if tp == 1:
        return 0.0
    collectives = 10 + (4 if recompute == "full" else 0)
    return collectives * (tp - 1) / tp * seq * micro_batch * config.hidden_size * 2


def tp_time_per_layer(config: ModelConfig, cluster: Cluster, tp: int, seq: int, micro_batch: int,
                      recompute: Optional[str], rate: float) -> float:
    """Exposed seconds of one layer's TP/SP communication for one micro-batch (see the module
    docstring); ``rate`` is the FLOP/s of the TP group."""
    if tp == 1:
        return 0.0
    s, b, h = seq, micro_batch, config.hidden_size
    one = (tp - 1) / tp * s * b * h * 2  # bytes of one all-gather or reduce-scatter of the activation
    t_one = comm_time(one, cluster.gpu.nvlink_gbps, cluster)
    plain = (6 + (4 if recompute == "full" else 0)) * t_one * (1 - cluster.tp_overlap)
    qkv_rows = (config.num_attention_heads + 2 * config.num_kv_heads) * config.head_dim
    overlapped = 0.0
    for out in (qkv_rows, 2 * config.ffn_hidden_size):  # the two column-parallel GEMMs
        gemm = 2 * s * b * h * out / rate  # one backward GEMM (dX or dW) on each rank of the TP group
        overlapped += 2 * max(0.0, t_one - gemm)
    return plain + overlapped


def pp_bytes_per_microbatch(config: ModelConfig, tp: int, seq: int, micro_batch: int) -> float:
    """Bytes a stage sends per micro-batch: its output forward and the input gradient backward (bf16, /TP)."""
    return 2 * seq * micro_batch * config.hidden_size * 2 / tp


def zero1_bytes(num_params: int, dp: int) -> tuple[float, float]:
    """(reduce-scatter of fp32 grads, all-gather of bf16 params) bytes per GPU per step."""
    if dp == 1:
        return 0.0, 0.0
    return (dp - 1) / dp * num_params * 4, (dp - 1) / dp * num_params * 2


def evaluate(config: ModelConfig, cluster: Cluster, lay: Layout, *, global_batch: int, seq: int) -> Plan:
    """Memory and step time of one layout (infeasible with the reason if it breaks a rule or does not fit)."""
    plan = Plan(layout=lay, feasible=False)
    if lay.tp > cluster.gpus_per_node or cluster.gpus_per_node % lay.tp:
        plan.reason = f"TP {lay.tp} does not fit in a {cluster.gpus_per_node}-GPU node (TP traffic must stay on NVLink)"
        return plan
    par = ParallelConfig(tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp,
                         sequence_parallel=lay.tp > 1)
    if lay.vpp > 1:
        par.num_layers_per_virtual_pipeline_stage = config.num_layers // (lay.pp * lay.vpp)
    elif lay.pp > 1:
        par.pipeline_layer_split = ",".join(map(str, lay.stage_layers))
    cfg = Config(model=config, parallel=par,
                 training=TrainingConfig(micro_batch_size=lay.micro_batch, global_batch_size=global_batch,
                                         seq_length=seq, bf16=True, use_distributed_optimizer=True,
                                         recompute_granularity=lay.recompute))
    try:
        validate(cfg, lay.tp * lay.pp * lay.dp)  # the trainer's own divisibility rules
    except ConfigError as e:
        plan.reason = str(e)
        return plan
    mem, stage = _memory(config, lay, seq)
    plan.memory, plan.memory_stage = mem, stage
    if mem.total > cluster.budget_bytes:
        plan.reason = (f"out of memory: stage {stage} needs {mem.total / GiB:.1f} GiB > "
                       f"{cluster.budget_bytes / GiB:.1f} GiB budget ({mem.summary()})")
        return plan

    gpu, s, b = cluster.gpu, seq, lay.micro_batch
    M = global_batch // (b * lay.dp)
    rate = lay.tp * gpu.peak_bf16_tflops * 1e12 * cluster.gemm_efficiency  # FLOP/s of one TP group
    f_layer = layer_flops_per_token(config, s)
    if lay.recompute == "full":
        f_layer_run = f_layer * 4 / 3
    elif lay.recompute == "selective":
        f_layer_run = f_layer + 4 * config.hidden_size * s
    else:
        f_layer_run = f_layer
    f_head = head_flops_per_token(config)
    # the tokens of one micro-batch through each stage (all V chunks of a rank)
    layers_per_rank = [config.num_layers // lay.pp] * lay.pp if lay.vpp > 1 else list(lay.stage_layers)
    stage_compute = [(n * f_layer_run + (f_head if r == lay.pp - 1 else 0)) * s * b / rate
                     for r, n in enumerate(layers_per_rank)]
    tp_layer = tp_time_per_layer(config, cluster, lay.tp, s, b, lay.recompute, rate)
    # Megatron rank order (tp fastest, then dp, then pp): neighbouring stages are tp*dp ranks apart.
    pp_gbps = gpu.ib_gbps if lay.tp * lay.dp >= cluster.gpus_per_node else gpu.nvlink_gbps
    pp_mb = comm_time(pp_bytes_per_microbatch(config, lay.tp, s, b) * lay.vpp, pp_gbps, cluster,
                      count=2 * lay.vpp) if lay.pp > 1 else 0.0
    stage_time = [c + n * tp_layer + pp_mb for c, n in zip(stage_compute, layers_per_rank)]
    slow = max(range(lay.pp), key=lambda r: stage_time[r])
    t_mb = stage_time[slow]
    slots = M + (lay.pp - 1) / lay.vpp
    pipeline_s = t_mb * slots

    dp_gbps = gpu.ib_gbps if lay.tp * lay.dp > cluster.gpus_per_node else gpu.nvlink_gbps
    rs, ag = zero1_bytes(mem.num_params, lay.dp)
    t_rs = comm_time(rs, dp_gbps, cluster) if rs else 0.0
    t_ag = comm_time(ag, dp_gbps, cluster) if ag else 0.0
    hidden = min(cluster.dp_overlap * t_rs, stage_compute[0] * 2 / 3)  # the last backward is ~2/3 of t_mb
    # Stage 0's first forward (~1/3 of t_mb) is the shortest window: later stages start theirs later.
    hidden_ag = min(cluster.param_gather_overlap * t_ag, stage_compute[0] / 3)
    dp_s = t_rs - hidden + t_ag - hidden_ag

    plan.feasible = True
    plan.num_microbatches = M
    plan.step_s = pipeline_s + dp_s
    plan.compute_s = stage_compute[slow] * M
    plan.tp_comm_s = layers_per_rank[slow] * tp_layer * M
    plan.pp_comm_s = pp_mb * M
    plan.dp_comm_s = dp_s
    plan.bubble = ((lay.pp - 1) / lay.vpp) / slots
    model_flops = (config.num_layers * f_layer + f_head) * global_batch * s
    plan.mfu = model_flops / (plan.step_s * cluster.num_gpus * gpu.peak_bf16_tflops * 1e12)
    return plan


def candidates(config: ModelConfig, cluster: Cluster, *, global_batch: int, seq: int,
               micro_batches=(1, 2, 4), recomputes=(None, "selective", "full"), max_vpp: int = 4) -> list[Layout]:
    n, L = cluster.num_gpus, config.num_layers
    head_layers = head_flops_per_token(config) / layer_flops_per_token(config, seq)
    out = []
    for tp in _divisors(n):
        if tp > cluster.gpus_per_node:
            continue
        for pp in _divisors(n // tp):
            if pp > L:
                continue
            dp = n // (tp * pp)
            split = tuple(balanced_split(L, pp, head_layers)) if pp > 1 else (L,)
            vpps = [1] + [v for v in range(2, max_vpp + 1) if pp > 1 and L % (pp * v) == 0]
            for b in micro_batches:
                for rc in recomputes:
                    for v in vpps:
                        out.append(Layout(tp, pp, dp, b, rc, v, split if v == 1 else (L // pp,) * pp))
    return out


def plan_layouts(config: ModelConfig, cluster: Cluster, *, global_batch: int, seq: int = 4096, prune: bool = True,
                 **kwargs) -> list[Plan]:
    """Every candidate evaluated; feasible ones first, fastest first, then the rejected ones.

    ``prune`` skips the memory estimate (meta-device builds, most of the run time) of layouts that must be out
    of memory because a lighter one of the same TP/PP already is: activations grow linearly with the
    micro-batch, and keeping every activation (no recompute) holds at least as much as either recompute mode.
    """
    oom: dict[tuple, list[Plan]] = {}
    plans = []
    cands = candidates(config, cluster, global_batch=global_batch, seq=seq, **kwargs)
    for lay in sorted(cands, key=lambda c: (c.tp, c.pp, c.vpp, c.micro_batch, c.recompute is None)):
        group = oom.setdefault((lay.tp, lay.pp, lay.vpp), [])
        lighter = next((o for o in group if o.layout.micro_batch <= lay.micro_batch
                        and (o.layout.recompute == lay.recompute or lay.recompute is None)), None) if prune else None
        if lighter is not None:
            plans.append(Plan(layout=lay, feasible=False, reason=(
                f"out of memory: needs at least what {lighter.layout.name()} needs, "
                f"{lighter.memory_gib:.1f} GiB > {cluster.budget_bytes / GiB:.1f} GiB budget")))
            continue
        plan = evaluate(config, cluster, lay, global_batch=global_batch, seq=seq)
        if plan.memory is not None and not plan.feasible:
            group.append(plan)
        plans.append(plan)
    # rejected: memory rejections (the informative ones) before rule violations
    return sorted(plans, key=lambda p: (not p.feasible, p.step_s, p.memory is None, p.memory_gib if p.memory else 0))


def propose(preset: str, num_gpus: int, gpu: str = "h100", *, global_batch: int, seq: int = 4096,
            gpus_per_node: int = 8, **cluster_kwargs) -> Plan:
    """The fastest layout that fits (raises ConfigError if none does)."""
    config = model_preset(preset)
    cluster = Cluster(num_gpus=num_gpus, gpus_per_node=gpus_per_node, gpu=GPUS[gpu], **cluster_kwargs)
    plans = plan_layouts(config, cluster, global_batch=global_batch, seq=seq)
    if not plans or not plans[0].feasible:
        raise ConfigError(f"no layout of {preset} fits on {num_gpus} x {gpu}")
    return plans[0]
