"""Configuration: dataclasses with a docstring per field, model presets, and the CLI derived from them.

Each field's docstring (the string literal under it, torchtitan's habit) is also its ``--help``.
Flag names are Megatron-LM's: field ``tensor_model_parallel_size`` is ``--tensor-model-parallel-size``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import textwrap
from dataclasses import dataclass, field
from typing import Optional

from megatron_ds.errors import ConfigError  # noqa: F401 - re-exported: callers import it from here
from megatron_ds.layer_split import check_pipeline_config



@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-LLM-style decoder."""

    num_layers: int = 4
    """Number of transformer layers (7B: 30, 67B: 95)."""
    hidden_size: int = 128
    """Model width d_model (7B: 4096, 67B: 8192)."""
    ffn_hidden_size: int = 352
    """SwiGLU intermediate size (7B: 11008, 67B: 22016)."""
    num_attention_heads: int = 8
    """Query heads (7B: 32, 67B: 64)."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means multi-head (= num_attention_heads)."""
    kv_channels: Optional[int] = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    max_position_embeddings: int = 4096
    """Longest sequence the rotary tables are built for."""
    vocab_size: int = 102400
    """The model's vocabulary (before padding): the --model preset's unless given. Not read from
    --tokenizer-model: a tokenizer with more tokens than this is an error, one with fewer leaves the rest
    of the embedding unused; token ids in the data must be below it."""
    make_vocab_size_divisible_by: int = 128
    """The model vocabulary is padded to a multiple of this times the TP size."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    init_method_std: float = 0.006
    """Standard deviation of the normal initialization of every weight matrix (the paper's 0.006)."""

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class ParallelConfig:
    """How the model and batch are split across processes."""

    tensor_model_parallel_size: int = 1
    """Ranks that split each layer's weights (TP)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages (PP). The data-parallel size is world size / (TP * PP)."""
    sequence_parallel: bool = False
    """Split activations outside attention/MLP along the sequence across the TP group."""
    decoder_first_pipeline_num_layers: Optional[int] = None
    """Layers on the first pipeline stage when it differs from the rest (uneven split, e.g. 67B's 95 layers
    on 8 stages: 11, then 12 each); the other stages share the remaining layers evenly."""
    decoder_last_pipeline_num_layers: Optional[int] = None
    """Layers on the last pipeline stage when it differs from the rest; the others share the remainder evenly."""
    pipeline_layer_split: Optional[str] = None
    """Layers of every pipeline stage as a comma list, first stage first (e.g. '11,12,12,12,12,12,12,12');
    must add up to --num-layers. Excludes --decoder-first/last-pipeline-num-layers."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Interleaved 1F1B: each rank holds several model chunks of this many layers (virtual stages); chunk c
    of rank r is virtual stage c * PP + r. Needs an even split and micro-batches a multiple of PP."""


@dataclass
class TrainingConfig:
    """The optimization loop."""

    micro_batch_size: int = 2
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step across all data-parallel ranks and micro-batches."""
    seq_length: int = 128
    """Tokens per training sequence."""
    train_iters: int = 100
    """Optimizer steps to run."""
    lr: float = 1e-3
    """Peak learning rate (reached at the end of warmup)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    lr_warmup_iters: int = 0
    """Steps of linear warmup from 0 to --lr."""
    lr_decay_style: str = "multistep"
    """'multistep' (DeepSeek: x0.316 at 80%, x0.1 at 90% of training; --lr-decay-milestones/-factors), 'cosine'
    (to --min-lr), 'constant', or 'wsd' (warmup-stable-decay: the peak until the last --lr-wsd-decay-iters,
    then down to --min-lr)."""
    lr_decay_iters: Optional[int] = None
    """Steps over which the schedule decays; None means --train-iters."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norm weights)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (across all ranks) to this value; 0 disables."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon (the paper does not state it; 1e-8 is PyTorch's default)."""
    seed: int = 1234
    """Seed of initialization and data order."""
    log_interval: int = 10
    """Print and write TensorBoard scalars every this many steps."""
    eval_interval: int = 0
    """Compute the validation loss every this many steps; 0 disables."""
    eval_iters: int = 10
    """Validation batches (of global-batch size) per evaluation."""
    save: Optional[str] = None
    """Directory to write the final (and periodic) checkpoint to; it must exist or be creatable, and be
    writable (checked at startup)."""
    save_interval: int = 0
    """Save every this many steps; 0 saves only at the end."""
    save_interval_minutes: float = 0.0
    """Also save whenever this many minutes have passed since the last save (all ranks agree at a step
    boundary); 0 disables. The paper saves every 5 minutes."""
    keep_last_n: Optional[int] = None
    """Keep only the newest this many checkpoints under --save (and the one `latest` names); None keeps all."""
    async_save: bool = True
    """Write checkpoints in the background: the copy off the parameters happens at the step boundary, the
    writing overlaps training (--no-async-save writes before training goes on)."""
    load: Optional[str] = None
    """Checkpoint directory to start from: a --save directory (its `latest`) or one iter_N directory; any
    TP/PP/DP layout. Restores weights, optimizer state, iteration, data position and RNG. A --load without a
    checkpoint is an error, unless it is also --save (a resumable job's first start: it starts from scratch)."""
    finetune: bool = False
    """With --load: take the weights only; iteration, data position, optimizer state and RNG start afresh."""
    no_load_optim: bool = False
    """With --load: do not load the optimizer state (Adam moments start at zero, master weights from the
    loaded params); iteration and data position are still restored."""
    no_load_rng: bool = False
    """With --load: keep this run's seeded RNG streams instead of the checkpoint's."""
    override_tokenizer_check: bool = False
    """With --load: go on when the checkpoint records another tokenizer (content hash) than --tokenizer-model,
    which is otherwise an error: token ids would mean other text than the weights learned. For a deliberate
    switch of tokenizer (e.g. a retrained tokenizer.json with the same ids); the log still warns."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard event files here (a directory that exists or can be created; checked at startup)."""
    bucket_size_mb: float = 25.0
    """Size of each data-parallel gradient all-reduce bucket, in MB of fp32 gradients."""
    generate_prompt: Optional[str] = None
    """After training, print the model's greedy continuation of this text (needs --tokenizer-model)."""
    generate_tokens: int = 32
    """Tokens to generate for --generate-prompt."""
    lr_decay_milestones: str = "0.8,0.9"
    """Multi-step: fractions of training (steps or tokens) from which each of --lr-decay-factors applies."""
    lr_decay_factors: str = "0.316,0.1"
    """Multi-step: LR multipliers of the peak from each milestone on (the paper's x0.316 and x0.1)."""
    lr_wsd_decay_iters: Optional[int] = None
    """Warmup-stable-decay (--lr-decay-style wsd): steps of the final decay to --min-lr."""
    lr_wsd_decay_style: str = "linear"
    """Shape of the WSD final decay: 'linear', 'cosine' or '1-sqrt'."""
    lr_warmup_tokens: Optional[float] = None
    """Warmup length in tokens; with --lr-decay-tokens the schedule counts tokens, not steps."""
    lr_decay_tokens: Optional[float] = None
    """Schedule length in tokens (e.g. 2e12); when set, milestones are fractions of it and the warmup and
    WSD lengths are read from --lr-warmup-tokens / --lr-wsd-decay-tokens."""
    lr_wsd_decay_tokens: Optional[float] = None
    """WSD final decay in tokens (with --lr-decay-tokens)."""
    bf16: bool = False
    """bf16 parameters and activations; fp32 main grads accumulated across micro-batches and fp32 master
    weights owned by the optimizer."""
    use_distributed_optimizer: bool = False
    """ZeRO-1: each data-parallel rank keeps the fp32 master weights and Adam state of one contiguous 1/DP
    shard; gradients are reduce-scattered, updated parameters all-gathered."""
    overlap_param_gather: bool = False
    """ZeRO-1: leave the all-gather of the updated parameters in flight after the optimizer step and
    let each module's forward wait only for the buckets holding its own parameters, so the gather
    overlaps the next forward. Pays where the collective runs beside the compute (NCCL on GPUs); on
    CPU gloo it competes with the compute for the same cores. Needs --use-distributed-optimizer."""
    recompute_granularity: Optional[str] = None
    """Activation recomputation: 'full' (whole layers) or 'selective' (the attention core); None keeps
    every activation."""
    auto_hparams: bool = False
    """Set --lr and --global-batch-size from the paper's Eq. 1 for C = M x (train-iters x batch tokens)
    (see tools/scaling_laws.py)."""
    peak_tflops: Optional[float] = None
    """Dense peak TFLOP/s of one device in the training dtype, the denominator of the logged MFU; None
    looks it up from the GPU's name (A100, H100, H200: megatron_ds/flops.py) and logs no MFU on CPU."""


@dataclass
class DataConfig:
    """Where the tokens come from."""

    data_path: Optional[list[str]] = None
    """Prefix of a .bin/.idx pair written by tools/preprocess_data.py (without the extension), or
    weight/prefix pairs to blend several ('0.7 web 0.3 code'); always a list once parsed."""
    split: str = "969,30,1"
    """Train/valid/test proportions of the documents, Megatron-style."""
    tokenizer_model: Optional[str] = None
    """HF tokenizer.json (or a directory holding one)."""
    eod_mask_loss: bool = False
    """Do not train on predicting the token after an end-of-document."""
    mock_data: bool = False
    """Train on random tokens (no --data-path needed): for benchmarks and smoke tests."""
    reset_position_ids: bool = False
    """Restart position ids at 0 after every end-of-document token."""
    reset_attention_mask: bool = False
    """Document-level causal attention: no token attends across an end-of-document token (the batch
    carries 'document_ids', the model builds the mask)."""
    data_cache_path: Optional[str] = None
    """Directory for the cached document/sample/shuffle index .npy files (rank 0 builds, the others
    memory-map); default: index-cache/ beside the first --data-path prefix."""


@dataclass
class KernelConfig:
    """Which implementation of the fused ops and of the linear layers the model runs."""

    no_fused_kernels: bool = False
    """Use the pure-PyTorch reference of every fused op (RMSNorm, rotary, SwiGLU, cross-entropy) instead of
    the compiled csrc/ kernels (which are the default, and fall back to the references with a warning when
    the extension was not built)."""
    transformer_impl: str = "local"
    """Linear layers: 'local' (this package's) or 'transformer_engine' (NVIDIA Transformer Engine's GEMMs, same
    parameter names in checkpoints; needs TE installed and CUDA)."""
    fp8_format: Optional[str] = None
    """Train the linear layers in FP8 with TE's delayed scaling: 'e4m3' (every GEMM in E4M3) or 'hybrid' (E4M3
    forward, E5M2 gradients). Needs --transformer-impl transformer_engine."""


@dataclass
class Config:
    """Everything one run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    preset: str = "tiny"


# Presets are data: the architecture fields a --model name fills.
PRESETS: dict[str, dict] = {
    # 4-layer GQA model that trains for a few hundred steps on 2 CPU cores in minutes.
    "tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=352, num_attention_heads=8,
                 num_query_groups=4, max_position_embeddings=1024, vocab_size=4096),
    # A slightly larger CPU model for benchmarks.
    "small": dict(num_layers=8, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
                  num_query_groups=4, max_position_embeddings=2048, vocab_size=8192),
    # DeepSeek LLM 7B: 30 layers, d 4096, MHA 32 heads, SwiGLU 11008, vocab 102400.
    "deepseek-7b": dict(num_layers=30, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
                        num_query_groups=32, max_position_embeddings=4096, vocab_size=102400),
    # DeepSeek LLM 67B: 95 layers, d 8192, 64 query heads over 8 KV heads, SwiGLU 22016.
    "deepseek-67b": dict(num_layers=95, hidden_size=8192, ffn_hidden_size=22016, num_attention_heads=64,
                         num_query_groups=8, max_position_embeddings=4096, vocab_size=102400),
}


def model_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"--model {name!r} is not a preset; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])


def count_parameters(cfg: ModelConfig, padded_vocab: Optional[int] = None) -> int:
    """Parameters of the decoder (untied embeddings, no biases), computed from the shapes alone."""
    v = padded_vocab if padded_vocab is not None else cfg.vocab_size
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    attn = h * cfg.num_attention_heads * d * 2 + h * cfg.num_kv_heads * d * 2  # q, o + k, v
    mlp = 3 * h * f  # gate, up, down
    per_layer = attn + mlp + 2 * h  # + input and post-attention RMSNorm weights
    return cfg.num_layers * per_layer + 2 * v * h + h  # + embedding, LM head, final norm


# ---------------------------------------------------------------------------------------------
# CLI: one flag per field, help from the field docstrings.


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_sections(config_cls: type = Config) -> dict[str, type]:
    """The flag sections of a run config: each field of ``config_cls`` that is itself a dataclass.
    Entry points with flags of their own (sft.py, dpo.py) subclass Config with one more section."""
    return {f.name: f.default_factory
            for f in dataclasses.fields(config_cls)
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(f: dataclasses.Field):
    t = f.type if not isinstance(f.type, str) else f.type
    text = str(t)
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name in text:
            return typ
    raise TypeError(f"unsupported config field type {text}")


PRETRAIN_DESCRIPTION = "Megatron-style 3D-parallel trainer for DeepSeek LLM models."


def build_parser(prog: str = "megatron_ds.pretrain", config_cls: type = Config,
                 description: str = PRETRAIN_DESCRIPTION) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", default="tiny", help=f"architecture preset: {', '.join(PRESETS)}; single flags override it")
    for section, cls in config_sections(config_cls).items():
        group = parser.add_argument_group(section)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            typ = _base_type(f)
            kwargs = dict(dest=f"{section}.{f.name}", default=None, help=docs.get(f.name, "").replace("%", "%%"))
            if typ is bool:  # a flag that is on by default gets its --no- form
                action = argparse.BooleanOptionalAction if f.default is True else "store_true"
                group.add_argument(_flag(f.name), action=action, **kwargs)
            elif "list[" in str(f.type):  # e.g. --data-path: one or more values
                group.add_argument(_flag(f.name), type=typ, nargs="+", metavar=f.name.upper(), **kwargs)
            else:
                group.add_argument(_flag(f.name), type=typ, metavar=f.name.upper(), **kwargs)
    return parser


def config_from_args(argv: Optional[list[str]] = None, config_cls: type = Config,
                     prog: str = "megatron_ds.pretrain", description: str = PRETRAIN_DESCRIPTION) -> Config:
    """Parse Megatron-style flags into a Config (or the entry point's subclass ``config_cls``):
    preset first, then explicit flags on top. ``description`` heads --help."""
    parser = build_parser(prog, config_cls, description)
    ns = vars(parser.parse_args(argv))
    preset = ns.pop("model")
    cfg = config_cls(model=model_preset(preset), preset=preset)
    for key, value in ns.items():
        if value is None:  # flag not given: keep the preset's or the dataclass default
            continue
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def validate_kernels(k: KernelConfig) -> None:
    """--transformer-impl / --fp8-format: known values, and TE present with CUDA (found without importing TE)."""
    import importlib.util

    if k.transformer_impl not in ("local", "transformer_engine"):
        raise ConfigError(f"--transformer-impl {k.transformer_impl!r}: choose local or transformer_engine")
    if k.fp8_format not in (None, "e4m3", "hybrid"):
        raise ConfigError(f"--fp8-format {k.fp8_format!r}: choose e4m3 or hybrid")
    if k.fp8_format is not None and k.transformer_impl != "transformer_engine":
        raise ConfigError(f"--fp8-format {k.fp8_format} needs --transformer-impl transformer_engine")
    if k.transformer_impl == "transformer_engine":
        import torch

        if importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError("--transformer-impl transformer_engine: Transformer Engine is not installed "
                              "(pip install 'megatron-ds[te]' on a CUDA machine), or use --transformer-impl local")
        if not torch.cuda.is_available():
            raise ConfigError("--transformer-impl transformer_engine needs a CUDA GPU, and none is available; "
                              "use --transformer-impl local")


def check_parallel_sizes(p: ParallelConfig) -> None:
    """TP and PP are at least 1."""
    if p.tensor_model_parallel_size < 1 or p.pipeline_model_parallel_size < 1:
        raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")


def check_tensor_split(m: ModelConfig, p: ParallelConfig) -> None:
    """TP divides what each layer splits: attention heads, FFN, KV heads (or is a multiple of them), vocabulary."""
    tp = p.tensor_model_parallel_size
    for what, n in (("attention heads (--num-attention-heads)", m.num_attention_heads),
                    ("FFN size (--ffn-hidden-size)", m.ffn_hidden_size)):
        if n % tp != 0:
            raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide {n} {what}")
    kv = m.num_kv_heads
    if m.num_attention_heads % kv != 0:
        raise ConfigError(f"--num-query-groups {kv} does not divide --num-attention-heads {m.num_attention_heads}")
    if kv % tp != 0 and tp % kv != 0:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide {kv} KV heads (--num-query-groups) "
            f"and is not a multiple of it; pick a TP size that divides or is a multiple of {kv}"
        )
    if m.padded_vocab_size(tp) % tp != 0:  # cannot happen with the padding rule, kept as a guard
        raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the padded vocabulary")


def check_model_layout(m: ModelConfig, p: ParallelConfig, num_microbatches: int = 1) -> None:
    """The rules of ``validate`` on how a model is split over TP x PP alone (no world size, no batch):
    what the offline checkpoint tools check their target layout with. ``num_microbatches`` matters
    only with interleaving."""
    check_parallel_sizes(p)
    check_tensor_split(m, p)
    check_pipeline_config(m.num_layers, p, num_microbatches)


def validate(cfg: Config, world_size: int) -> None:
    """Checks that need no data: a layout that does not divide is a one-line ConfigError."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    check_parallel_sizes(p)
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not a multiple of --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}; launch TP*PP*DP processes"
        )
    dp = world_size // (tp * pp)
    check_tensor_split(m, p)
    if p.sequence_parallel and t.seq_length % tp != 0:
        raise ConfigError(f"--sequence-parallel needs --seq-length {t.seq_length} divisible by --tensor-model-parallel-size {tp}")
    if t.seq_length > m.max_position_embeddings:
        raise ConfigError(f"--seq-length {t.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}")
    if t.global_batch_size % (t.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not a multiple of --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}"
        )
    # Layer split and interleaving rules are written once, in layer_split.py.
    check_pipeline_config(m.num_layers, p, t.global_batch_size // (t.micro_batch_size * dp))
    if t.keep_last_n is not None and t.keep_last_n < 1:
        raise ConfigError(f"--keep-last-n {t.keep_last_n}: keep at least 1 checkpoint")
    if t.overlap_param_gather and not t.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather overlaps ZeRO-1's parameter all-gather: add --use-distributed-optimizer")
    if t.save_interval < 0 or t.save_interval_minutes < 0:
        raise ConfigError("--save-interval and --save-interval-minutes must be >= 0")
    if t.lr_decay_style not in ("multistep", "cosine", "constant", "wsd"):
        raise ConfigError(f"--lr-decay-style {t.lr_decay_style!r}: choose multistep, cosine, constant or wsd")
    if t.recompute_granularity not in (None, "full", "selective"):
        raise ConfigError(f"--recompute-granularity {t.recompute_granularity!r}: choose full or selective")
    validate_kernels(cfg.kernels)
    if m.hidden_size != m.num_attention_heads * m.head_dim and m.kv_channels is None:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} does not divide --hidden-size {m.hidden_size}")
