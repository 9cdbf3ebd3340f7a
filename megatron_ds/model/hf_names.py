"""Our parameter names <-> Hugging Face Llama names, and moving weights between the two.

Every one of our weights is the row-wise concatenation of one or more HF tensors ("parts"):
the fused ``qkv`` is [q_proj; k_proj; v_proj], ``gate_up`` is [gate_proj; up_proj], the
replicated-KV ``kv`` is [k_proj; v_proj], the rest are one part. A TP-sharded weight holds chunk
``tp_rank`` of each part along its partition dim, concatenated (the ``partition_sizes`` rule of
``parallel/layers.py``). Embedding and LM head carry extra zero rows: the vocabulary padded to
``config.padded_vocab_size(tp)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from megatron_ds.config import ModelConfig
from megatron_ds.model.attention import kv_heads_replicated
from megatron_ds.parallel.topology import group_rank, group_size

_TOP = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER = {
    "input_norm.weight": ["input_layernorm.weight"],
    "attention.qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attention.q.weight": ["self_attn.q_proj.weight"],
    "attention.kv.weight": ["self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attention.out.weight": ["self_attn.o_proj.weight"],
    "post_attention_norm.weight": ["post_attention_layernorm.weight"],
    "mlp.gate_up.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.down.weight": ["mlp.down_proj.weight"],
}
_VOCAB_PADDED = ("embedding.weight", "lm_head.weight")


def hf_names(name: str) -> list[str]:
    """HF names of the parts that make up our parameter ``name``, in row order."""
    if name in _TOP:
        return [_TOP[name]]
    head, sep, tail = name.partition(".")
    index, _, rest = tail.partition(".")
    if head == "layers" and sep and index.isdigit() and rest in _LAYER:
        return [f"model.layers.{index}.{part}" for part in _LAYER[rest]]
    raise KeyError(f"{name!r} is not a DeepSeekModel parameter name")


class _Layout(NamedTuple):
    hf: list[str]
    partition_dim: Optional[int]  # None: replicated over TP


def parameter_layout(config: ModelConfig, tp_size: int) -> dict[str, _Layout]:
    """Every parameter of the full model at this TP size: its HF parts and TP partition dim."""
    dims = {"input_norm.weight": None, "post_attention_norm.weight": None, "attention.out.weight": 1,
            "mlp.gate_up.weight": 0, "mlp.down.weight": 1}
    if kv_heads_replicated(config, tp_size):
        dims.update({"attention.q.weight": 0, "attention.kv.weight": None})
    else:
        dims["attention.qkv.weight"] = 0
    layout = {"embedding.weight": _Layout(hf_names("embedding.weight"), 0)}
    for i in range(config.num_layers):
        for rest, dim in dims.items():
            name = f"layers.{i}.{rest}"
            layout[name] = _Layout(hf_names(name), dim)
    layout["final_norm.weight"] = _Layout(hf_names("final_norm.weight"), None)
    layout["lm_head.weight"] = _Layout(hf_names("lm_head.weight"), 0)
    return layout


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])


def shard_hf_state_dict_for_tp(hf_sd: dict[str, torch.Tensor], config: ModelConfig, tp_rank: int,
                               tp_size: int) -> dict[str, torch.Tensor]:
    """Our state dict for TP rank ``tp_rank`` of ``tp_size`` from a HF Llama state dict.

    Covers every parameter whose HF parts are all present (so a partial HF dict gives a partial
    result); vocab rows are zero-padded to ``config.padded_vocab_size(tp_size)``.
    """
    out = {}
    for name, (parts_names, dim) in parameter_layout(config, tp_size).items():
        if not all(n in hf_sd for n in parts_names):
            continue
        parts = [hf_sd[n] for n in parts_names]
        if name in _VOCAB_PADDED:
            parts = [_pad_vocab(parts[0], config.padded_vocab_size(tp_size))]
        if dim is None:
            out[name] = torch.cat(parts, dim=0)
        else:
            out[name] = torch.cat([p.chunk(tp_size, dim=dim)[tp_rank] for p in parts], dim=dim)
    return out


def load_hf_state_dict(model: nn.Module, hf_sd: dict[str, torch.Tensor]) -> None:
    """Copy HF Llama weights into ``model`` (any TP shard, any pipeline stage: it takes what it holds).

    Raises if a parameter of ``model`` has no HF counterpart in ``hf_sd``; HF entries the model
    does not hold (other stages' layers) are ignored.
    """
    ours = shard_hf_state_dict_for_tp(hf_sd, model.config, group_rank(model.tp_group), group_size(model.tp_group))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(ours))
    if missing:
        raise KeyError(f"the HF state dict lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != ours[name].shape:
                raise ValueError(f"{name}: HF weights give shape {tuple(ours[name].shape)}, the model has {tuple(p.shape)}")
            p.copy_(ours[name])


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF Llama state dict of a TP=1 model (or pipeline stage): fused weights split, vocab padding dropped."""
    if group_size(model.tp_group) != 1:
        raise ValueError("to_hf_state_dict needs the unsharded (TP=1) model; gather the TP shards first")
    out = {}
    for name, p in model.named_parameters():
        names = hf_names(name)
        t = p.detach()
        if name in _VOCAB_PADDED:
            t = t[:model.config.vocab_size]
        if len(names) == 1:
            out[names[0]] = t.clone()
            continue
        # qkv / gate_up record their row parts; the replicated kv is [k; v] of equal size.
        sizes = getattr(p, "partition_sizes", None) or [t.shape[0] // len(names)] * len(names)
        for hf_name, part in zip(names, t.split(sizes, dim=0)):
            out[hf_name] = part.clone()
    return out
