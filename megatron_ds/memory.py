"""Memory per rank for a layout: parameters, gradients, optimizer state, activations.

Parameter counts come from the model itself built on the meta device (model/param_count.py), so
they are exact for every TP rank and pipeline stage. The other parts follow from how this code
base stores things (optim/distributed_optimizer.py, parallel/grad_buffer.py):

    per parameter, bytes          plain DP                 ZeRO-1 (--use-distributed-optimizer)
    params (model dtype)          2 (bf16) / 4 (fp32)      same
    main grads (fp32 buffer)      4                        4 + 4/DP (the reduce-scattered shard)
    Adam moments (fp32)           8                        8/DP
    fp32 master weights           4 (bf16) / 0 (fp32)      4/DP

Activations are an estimate (autograd's saved tensors per layer, derived for this decoder: pre-norm
RMSNorm, GQA attention through flash/efficient SDPA (no s x s matrix), SwiGLU, no dropout), in
the activation dtype, for one micro-batch of b sequences of s tokens:

    per layer, elements saved                              (t = TP, n_q/n_kv heads of size d, f = FFN)
    2 norm inputs                  2 s b h / t_sp          (t_sp = t under SP, else 1)
    QKV and gate/up inputs         2 s b h / t_sp          (under SP the local shard: backward gathers
                                                            it again, parallel/linear_comm.py)
    q, k pre- and post-rotary, v   s b d (2 n_q + 3 n_kv) / t
    attention output               s b d n_q / t           (input of the out-projection)
    SwiGLU gate, up, product       3 s b f / t
  full recompute keeps only each layer's input (s b h / t_sp) and one layer's worth during backward;
  selective recompute (the attention core) drops the attention output and the post-rotary q, k.
  The last stage adds the logits (s b V / t): in the model dtype with the fused cross-entropy (the
  default), which saves the logits themselves and writes its gradient over them; the reference
  (--no-fused-kernels) also holds an fp32 softmax of the same shape (4 more bytes per element).
Under 1F1B pipeline stage r holds up to (PP - r) micro-batches in flight; ``in_flight`` says so.
Backward adds, once, what lives only while it runs (``backward_transient``): each weight's gradient is
written in the model dtype and then added into its fp32 main grad and freed, so the largest weight's
(the LM head's V/t x h on the last stage, the fused gate/up 2f/t x h elsewhere) is alive beside all
of a micro-batch's activations, with the gradient of the hidden states, s b h.

The estimate is held against what a run really allocates: ``measure_peak_cpu_tensor_bytes`` gives the
peak of the tensor bytes a call allocates on CPU (tests/planner/test_memory_measured.py runs the tiny
model at several layouts with it: within 4%). Left out here: the embedding's output, rotary tables,
norm statistics, batches and the collectives' staging copies; not seen there: memory that is not a
torch tensor (gloo's own buffers, the allocator's slack).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

from megatron_ds.config import ModelConfig

T = TypeVar("T")

GiB = 1024**3


@dataclass
class MemoryEstimate:
    """Bytes on one rank."""

    params: int
    grads: int
    optimizer: int
    """Adam moments plus fp32 master weights when they are not the params themselves."""
    activations_per_microbatch: int
    in_flight: int
    """Micro-batches whose activations are alive at once (1F1B: PP - pp_rank; 1 without PP)."""
    num_params: int
    """Parameters on this rank."""
    backward_transient: int = 0
    """Alive only inside backward, beside all the activations: a weight's gradient in the model dtype until
    its hook adds it into main_grad, and the gradient of the hidden states it comes with (see the module
    docstring)."""

    @property
    def activations(self) -> int:
        return self.activations_per_microbatch * self.in_flight

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.backward_transient

    def summary(self) -> str:
        unit, name = (GiB, "GiB") if self.total >= GiB else (2**20, "MiB")  # tiny models read in MiB
        g = lambda n: f"{n / unit:.2f} {name}"  # noqa: E731
        return (f"memory per rank (estimate): params {g(self.params)} | grads {g(self.grads)} | optimizer "
                f"{g(self.optimizer)} | activations {g(self.activations_per_microbatch)} x {self.in_flight} "
                f"micro-batch(es) + {g(self.backward_transient)} in backward | total {g(self.total)}")


def stage_layer_ranges(num_layers: int, pp: int, counts: Optional[Sequence[int]] = None) -> list[range]:
    """Layer range of each stage: ``counts`` if given, else as even as possible (extra layers go last)."""
    if counts is None:
        base, extra = divmod(num_layers, pp)
        counts = [base + (1 if i >= pp - extra else 0) for i in range(pp)]
    ranges, start = [], 0
    for n in counts:
        ranges.append(range(start, start + n))
        start += n
    return ranges


def activation_elements_per_layer(config: ModelConfig, *, tp: int, sp: bool, seq: int, micro_batch: int,
                                  recompute: Optional[str] = None) -> int:
    """Elements autograd keeps for one layer and one micro-batch (see the module docstring)."""
    s, b, h, d, f = seq, micro_batch, config.hidden_size, config.head_dim, config.ffn_hidden_size
    nq, nkv = config.num_attention_heads, config.num_kv_heads
    t_sp = tp if sp and tp > 1 else 1
    nkv_local = max(nkv, tp)  # KV heads replicated when TP exceeds them: one per rank
    layer_input = s * b * h // t_sp
    if recompute == "full":
        return layer_input
    norms = 2 * s * b * h // t_sp
    linear_inputs = 2 * s * b * h // t_sp  # QKV and gate/up: kept as the local shard under SP
    qkv = s * b * d * (2 * nq + 3 * nkv_local) // tp
    attn_out = s * b * d * nq // tp
    mlp = 3 * s * b * f // tp
    if recompute == "selective":
        qkv -= s * b * d * (nq + nkv_local) // tp
        attn_out = 0
    return norms + linear_inputs + qkv + attn_out + mlp


def estimate(config: ModelConfig, *, tp: int = 1, pp: int = 1, dp: int = 1, sp: bool = False,
             recompute: Optional[str] = None, micro_batch: int = 1, seq: int = 4096, bf16: bool = True,
             distributed_optimizer: bool = False, pp_rank: Optional[int] = None,
             stage_layers: Optional[Sequence[int]] = None, fused_cross_entropy: bool = True) -> MemoryEstimate:
    """Bytes on TP rank 0 of pipeline stage ``pp_rank`` (None: the stage with the largest total).

    ``fused_cross_entropy``: the csrc/ cross-entropy, which keeps no fp32 copy of the logits (False:
    the reference, under --no-fused-kernels or without the extension).
    """
    from megatron_ds.model.param_count import count_model_parameters

    if pp_rank is None:
        return max((estimate(config, tp=tp, pp=pp, dp=dp, sp=sp, recompute=recompute, micro_batch=micro_batch,
                             seq=seq, bf16=bf16, distributed_optimizer=distributed_optimizer, pp_rank=r,
                             stage_layers=stage_layers, fused_cross_entropy=fused_cross_entropy)
                    for r in range(pp)), key=lambda e: e.total)
    ranges = stage_layer_ranges(config.num_layers, pp, stage_layers)
    first, last = pp_rank == 0, pp_rank == pp - 1
    n = count_model_parameters(config, tp, ranges[pp_rank], pre_process=first, post_process=last)
    p_bytes = 2 if bf16 else 4
    params = n * p_bytes
    if distributed_optimizer:
        grads = 4 * n + 4 * n // dp
        optimizer = (8 + 4) * n // dp
    else:
        grads = 4 * n
        optimizer = 8 * n + (4 * n if bf16 else 0)
    act = activation_elements_per_layer(config, tp=tp, sp=sp, seq=seq, micro_batch=micro_batch,
                                        recompute=recompute) * len(ranges[pp_rank]) * p_bytes
    if recompute == "full" and len(ranges[pp_rank]):
        # backward recomputes one layer at a time and holds its activations meanwhile
        act += activation_elements_per_layer(config, tp=tp, sp=sp, seq=seq, micro_batch=micro_batch) * p_bytes
    if last:
        v = config.padded_vocab_size(tp) // tp
        # the logits; the reference cross-entropy adds its fp32 softmax (the fused one reuses the logits)
        act += seq * micro_batch * v * (p_bytes + (0 if fused_cross_entropy else 4))
    # The peak comes early in a backward, with a micro-batch's activations all alive: the gradient of
    # the stage's largest weight (the LM head's [V/t, h] on the last stage, else the fused gate/up
    # [2f/t, h]) and of its input [s, b, h] (under SP, before its reduce-scatter) are held then, and
    # under SP also that input gathered again for the weight's gradient [s, b, h].
    # The embedding's gradient [V/t, h] comes at the end of stage 0's backward, after its activations.
    h = config.hidden_size
    largest_weight = (config.padded_vocab_size(tp) // tp if last else 2 * config.ffn_hidden_size // tp) * h
    regathered = seq * micro_batch * h if sp and tp > 1 else 0
    transient = (largest_weight + seq * micro_batch * h + regathered) * p_bytes
    return MemoryEstimate(params=params, grads=grads, optimizer=optimizer, activations_per_microbatch=act,
                          in_flight=pp - pp_rank if pp > 1 else 1, num_params=n, backward_transient=transient)


def estimate_for_config(cfg, dp_size: int, pp_rank: Optional[int] = None) -> MemoryEstimate:
    """``estimate`` for a Config (what the trainer prints at start)."""
    p, t = cfg.parallel, cfg.training
    return estimate(cfg.model, tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, dp=dp_size,
                    sp=p.sequence_parallel, recompute=getattr(t, "recompute_granularity", None),
                    micro_batch=t.micro_batch_size, seq=t.seq_length, bf16=getattr(t, "bf16", False),
                    distributed_optimizer=getattr(t, "use_distributed_optimizer", False), pp_rank=pp_rank,
                    # the configured kernels; a build without the csrc/ extension falls back to the
                    # reference cross-entropy (with a warning), and then this is under by its softmax
                    fused_cross_entropy=not getattr(getattr(cfg, "kernels", None), "no_fused_kernels", False))


def measure_peak_cpu_tensor_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), peak bytes of the CPU tensors allocated during the call and alive at once)``, all threads.

    The process's RSS cannot show this for a small model: the torch libraries and gloo's buffers
    dwarf it. torch's CPU allocator can count its live bytes itself (c10's
    ``caffe2_report_cpu_memory_usage`` flag, on for the call): a size table of every block and their
    total, on every thread, so a tensor that a process-group thread frees leaves the count when it
    does. The profiler (``profile_memory``) reports that total at every allocation and free of the
    calling thread, which does almost all of them (autograd runs CPU backward on it too); the peak is
    the largest report, less the total when the call began. Blocks from before the call are not in
    the table and do not count when freed. Slow (every op is recorded): for tests and one-off
    measurements, not for every training step.
    """
    import ctypes
    import gc
    import os

    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    libc10 = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    try:  # a c10 flag without a Python setter: the exported global itself
        flag = ctypes.c_bool.in_dll(ctypes.CDLL(libc10), "FLAGS_caffe2_report_cpu_memory_usage")
    except (OSError, ValueError) as e:
        raise RuntimeError(f"measure_peak_cpu_tensor_bytes: this torch does not export c10's "
                           f"caffe2_report_cpu_memory_usage flag from {libc10} ({e})") from e
    was = flag.value
    flag.value = True
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch.empty(1)  # the first report: the total the call starts from
            out = fn()
            gc.collect()  # blocks held only by reference cycles leave the table while it is kept
    finally:
        flag.value = was
    # Allocation events are leaves of the event tree (the FunctionEvent list folds them into their op).
    reports, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            reports.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
    reports.sort()
    _, first_size, first_total = reports[0]
    start = first_total - first_size
    return out, max(total for _, _, total in reports) - start
