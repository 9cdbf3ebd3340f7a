"""Hugging Face Llama checkpoints (the form DeepSeek LLM releases take) to and from ours.

Export writes ``config.json``, ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
and, when the checkpoint records a tokenizer, its files with ``tokenizer_config.json``,
``special_tokens_map.json`` and ``generation_config.json`` (AutoTokenizer and ``generate`` see our
BOS / EOD / PAD); import reads that form (sharded or one ``model.safetensors``) and writes
our format for a target TP x PP. Both stream: each HF tensor is one block of one of our global
tensors (``hf_names.py``: ``qkv`` is [q; k; v] rows, ``gate_up`` is [gate; up]), read or written alone.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Optional

import torch
from safetensors import safe_open

from megatron_ds.checkpoint.format import TMP_SUFFIX, CheckpointError
from megatron_ds.checkpoint.load import CheckpointReader
from megatron_ds.checkpoint.model_state import MODEL_PREFIX
from megatron_ds.checkpoint.offline import check_save_dir, check_target_layout, write_layout
from megatron_ds.checkpoint.safetensors_io import SafetensorsWriter, fsync_dir, write_file_atomic_bytes
from megatron_ds.config import ModelConfig
from megatron_ds.model.hf_names import hf_names
from megatron_ds.paths import check_writable_dir

INDEX = "model.safetensors.index.json"
_HF_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def global_keys(config: ModelConfig) -> list[str]:
    """Our global parameter names of the whole model (layout-free: fused ``qkv`` always)."""
    keys = ["embedding.weight"]
    for i in range(config.num_layers):
        keys += [f"layers.{i}.{rest}" for rest in ("input_norm.weight", "attention.qkv.weight", "attention.out.weight",
                                                   "post_attention_norm.weight", "mlp.gate_up.weight",
                                                   "mlp.down.weight")]
    return keys + ["final_norm.weight", "lm_head.weight"]


def part_rows(config: ModelConfig, key: str) -> list[int]:
    """Row counts of the HF parts stacked in our global tensor ``key``."""
    d = config.head_dim
    if key.endswith("attention.qkv.weight"):
        return [config.num_attention_heads * d, config.num_kv_heads * d, config.num_kv_heads * d]
    if key.endswith("mlp.gate_up.weight"):
        return [config.ffn_hidden_size] * 2
    return [-1]


def hf_parts(config: ModelConfig, key: str, global_shape) -> list[tuple[str, int, tuple]]:
    """(HF name, row offset in ours, HF shape) of every part of our global tensor ``key``."""
    rows = part_rows(config, key)
    if rows == [-1]:
        rows = [global_shape[0]]
    out, start = [], 0
    for name, n in zip(hf_names(key), rows):
        out.append((name, start, (n, *global_shape[1:])))
        start += n
    return out


def hf_config(config: ModelConfig, dtype: torch.dtype, bos_id: Optional[int], eos_id: Optional[int],
              pad_id: Optional[int] = None) -> dict:
    """config.json for transformers' LlamaForCausalLM (formats.md, "Hugging Face checkpoint")."""
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.hidden_size, "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_epsilon, "rope_theta": config.rotary_base, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings, "tie_word_embeddings": False,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "initializer_range": config.init_method_std, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "torch_dtype": _HF_DTYPES.get(dtype, "float32"),
    }
    if pad_id is not None:
        out["pad_token_id"] = pad_id
    return out


def model_config_from_hf(cfg: dict, path: str) -> ModelConfig:
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in cfg.get("architectures", []):
        raise CheckpointError(f"{path}: not a Llama checkpoint (model_type {cfg.get('model_type')!r})")
    if cfg.get("tie_word_embeddings"):
        raise CheckpointError(f"{path}: tie_word_embeddings is true; DeepSeek LLM has an untied LM head")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{path}: attention_bias / mlp_bias are set; this model has no biases")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return ModelConfig(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads, num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=None if head_dim * heads == cfg["hidden_size"] else head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096), vocab_size=cfg["vocab_size"],
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6), rotary_base=cfg.get("rope_theta", 10000.0),
        init_method_std=cfg.get("initializer_range", 0.006))


# --- export -----------------------------------------------------------------------------------


def _recorded_tokenizer(tokenizer: Optional[dict]):
    """(path of the tokenizer file or directory, our Tokenizer) from the checkpoint's record, or
    (None, None) when it records none or the path is gone."""
    path = (tokenizer or {}).get("path")
    if not path or not os.path.exists(path):
        return None, None
    from megatron_ds.data.tokenizer import build_tokenizer

    return path, build_tokenizer(path)


TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"


def hf_tokenizer_files(tok, config: ModelConfig, source_config: Optional[dict] = None) -> dict:
    """{file name: JSON} that let ``transformers.AutoTokenizer`` load the exported tokenizer.json
    with our special tokens, and ``generate`` stop at our EOD: tokenizer_config.json,
    special_tokens_map.json and generation_config.json. BOS / PAD appear only where the tokenizer
    has them. A ``chat_template`` of the source's own tokenizer_config.json is kept."""
    special = {name: tok.token_text(i) for name, i in
               (("bos_token", tok.bos), ("eos_token", tok.eod), ("pad_token", tok.pad)) if i is not None}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                  "model_max_length": config.max_position_embeddings,
                  "clean_up_tokenization_spaces": False}
    if (source_config or {}).get("chat_template"):
        tok_config["chat_template"] = source_config["chat_template"]
    gen = {"bos_token_id": tok.bos, "eos_token_id": tok.eod}
    if tok.pad is not None:
        gen["pad_token_id"] = tok.pad
    return {TOKENIZER_CONFIG: tok_config, SPECIAL_TOKENS_MAP: special,
            GENERATION_CONFIG: {k: v for k, v in gen.items() if v is not None}}


HF_CONFIG = "config.json"
EXPORT_TMP = ".export" + TMP_SUFFIX
_HF_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
_HF_INDEXES = (INDEX, "pytorch_model.bin.index.json")


def hf_model_files(path: str) -> list[str]:
    """Names of the files in ``path`` that make it a Hugging Face model: config.json, the weight
    files (``model[-0000i-of-0000n].safetensors``, ``pytorch_model*.bin``) and their indexes."""
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path)
                  if n == HF_CONFIG or n in _HF_INDEXES or _HF_WEIGHTS.match(n))


def _write_json(path: str, obj) -> None:
    write_file_atomic_bytes(path, json.dumps(obj, indent=2).encode())


def _commit_export(save: str, tmp: str, written: list[str]) -> None:
    """Move the files of a complete export from ``tmp`` into ``save``, removing the old model's.

    The old config.json and index go first and the new ones come last, so that a crash in between
    leaves a directory no loader takes for a complete model rather than a mix of two; old weight
    files the new index does not name (a second export with fewer shards) are removed.
    """
    for name in (HF_CONFIG, *_HF_INDEXES):
        if os.path.exists(os.path.join(save, name)):
            os.remove(os.path.join(save, name))
    for name in hf_model_files(save):
        if name not in written:
            os.remove(os.path.join(save, name))
    last = (INDEX, HF_CONFIG)
    for name in [n for n in written if n not in last] + [n for n in last if n in written]:
        os.replace(os.path.join(tmp, name), os.path.join(save, name))
    os.rmdir(tmp)
    fsync_dir(save)


def export_hf(load: str, save: str, max_shard_bytes: int = 2 << 30, verify: bool = True,
              force: bool = False) -> list[str]:
    """Write our checkpoint at ``load`` as a HF Llama checkpoint in ``save``; returns the files written.

    A ``save`` that already holds a HF model is an error unless ``force``; then that model is
    replaced: the export is written into ``save/.export.tmp`` and moved into place once complete,
    and the old model's files it does not rewrite (stale shards) are removed. Other files in
    ``save`` (a README) are left alone; the tokenizer files and generation_config.json are
    replaced when the checkpoint records a tokenizer, left alone otherwise.
    """
    check_writable_dir(save, "--save")
    existing = hf_model_files(save)
    if existing and not force:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise CheckpointError(f"--save {save} already holds a Hugging Face model ({shown}); write to a new "
                              "directory, or pass --force to replace it")
    reader = CheckpointReader(load, verify=verify)
    if reader.model_config is None:
        raise CheckpointError(f"{reader.dir}/metadata.json: no model config recorded")
    config = ModelConfig(**reader.model_config)
    # Plan: every HF tensor, in model order, as a block of one of ours; then cut into shards by size.
    plan = []
    for key in global_keys(config):
        full = MODEL_PREFIX + key
        shape = reader.global_shape(full)
        for name, row, hf_shape in hf_parts(config, key, shape):
            plan.append((name, full, row, hf_shape, reader.dtype(full)))
    shards, current, size = [], [], 0
    for item in plan:
        n = torch.empty((), dtype=item[4]).element_size() * int(torch.Size(item[3]).numel())
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    shards.append(current)
    tok_path, tok = _recorded_tokenizer(reader.tokenizer)
    bos, eos, pad = (tok.bos, tok.eod, tok.pad) if tok is not None else (None, None, None)
    os.makedirs(save, exist_ok=True)
    tmp = os.path.join(save, EXPORT_TMP)
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted export's
    os.makedirs(tmp)
    try:
        weight_map, total, written = {}, 0, []
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            writer = SafetensorsWriter(os.path.join(tmp, fname), [(n, dt, s) for n, _, _, s, dt in shard],
                                       metadata={"format": "pt"})
            for name, key, row, shape, _ in shard:
                writer.write(name, reader.read(key, (row,) + (0,) * (len(shape) - 1), shape))
                weight_map[name] = fname
            total += writer.close()["bytes"]
            written.append(fname)
        if tok_path is not None:
            # Our tokenizer_config.json / special_tokens_map.json replace a source directory's
            # (only its chat_template is kept): they must name the special tokens we train with.
            ours = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
            files = [tok_path] if os.path.isfile(tok_path) else sorted(
                f for f in glob.glob(os.path.join(tok_path, "tokenizer*")) if os.path.basename(f) not in ours)
            for src in files:
                shutil.copy(src, os.path.join(tmp, os.path.basename(src)))
                written.append(os.path.basename(src))
            source_config = None
            if os.path.isdir(tok_path) and os.path.isfile(os.path.join(tok_path, TOKENIZER_CONFIG)):
                try:
                    with open(os.path.join(tok_path, TOKENIZER_CONFIG)) as f:
                        source_config = json.load(f)
                except (OSError, ValueError):
                    source_config = None
            for name, obj in hf_tokenizer_files(tok, config, source_config).items():
                _write_json(os.path.join(tmp, name), obj)
                written.append(name)
        _write_json(os.path.join(tmp, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
        dtype = reader.dtype(MODEL_PREFIX + "embedding.weight")
        _write_json(os.path.join(tmp, HF_CONFIG), hf_config(config, dtype, bos, eos, pad))
        written += [INDEX, HF_CONFIG]
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit_export(save, tmp, written)
    return written


# --- import -----------------------------------------------------------------------------------


class HFSource:
    """A HF Llama checkpoint seen as our global tensors: ``read(key, offsets, shape)`` reads the
    block from the HF parts it spans, as slices of the memory-mapped safetensors files."""

    def __init__(self, path: str):
        self.path = path
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"{cfg_path}: not found; --hf must be a Hugging Face model directory")
        with open(cfg_path) as f:
            self.hf_config = json.load(f)
        self.config = model_config_from_hf(self.hf_config, cfg_path)
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
            self.weight_map = {}
            for fpath in files:
                with safe_open(fpath, framework="pt") as f:
                    self.weight_map.update({k: os.path.basename(fpath) for k in f.keys()})
        self._files: dict[str, object] = {}
        self._shapes = {}
        for key in global_keys(self.config):
            parts = [self._slice(n) for n in hf_names(key)]
            rows = sum(p.get_shape()[0] for p in parts)
            self._shapes[MODEL_PREFIX + key] = (rows, *parts[0].get_shape()[1:])
            self._dtype = parts[0].get_dtype()

    def __repr__(self) -> str:
        return self.path

    def _slice(self, name: str):
        fname = self.weight_map.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: no weight {name!r} in the checkpoint (is it a Llama model of "
                                  "the shape its config.json gives?)")
        if fname not in self._files:
            fpath = os.path.join(self.path, fname)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"{fpath}: listed in {INDEX} but missing")
            self._files[fname] = safe_open(fpath, framework="pt")
        return self._files[fname].get_slice(name)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def global_shape(self, key: str) -> tuple:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        from megatron_ds.checkpoint.safetensors_io import DTYPES_BY_NAME

        name = hf_names(key[len(MODEL_PREFIX):])[0]
        return DTYPES_BY_NAME[self._slice(name).get_dtype()]

    def read(self, key: str, offsets, shape) -> torch.Tensor:
        local = key[len(MODEL_PREFIX):]
        out = torch.empty(shape, dtype=self.dtype(key))
        cols = tuple(slice(o, o + s) for o, s in zip(offsets[1:], shape[1:]))
        for name, row, hf_shape in hf_parts(self.config, local, self._shapes[key]):
            lo, hi = max(offsets[0], row), min(offsets[0] + shape[0], row + hf_shape[0])
            if lo < hi:
                out[lo - offsets[0]:hi - offsets[0]] = self._slice(name)[(slice(lo - row, hi - row),) + cols]
        return out


def import_hf(hf_path: str, save: str, target_tp: int = 1, target_pp: int = 1,
              tokenizer_path: Optional[str] = None, *, force: bool = False, set_latest: bool = False) -> str:
    """Write the HF Llama checkpoint at ``hf_path`` in our format for TP x PP (iteration 0).

    ``force`` and ``set_latest``: as in ``offline.write_layout`` (a ``save`` holding a checkpoint is
    refused unless ``force``)."""
    check_save_dir(save, 0, force)  # before the HF model is read
    source = HFSource(hf_path)
    check_target_layout(source.config, target_tp, target_pp)  # before the weights are read
    if tokenizer_path is None and os.path.isfile(os.path.join(hf_path, "tokenizer.json")):
        tokenizer_path = os.path.join(hf_path, "tokenizer.json")
    tokenizer = None
    if tokenizer_path is not None:
        from megatron_ds.data.tokenizer import build_tokenizer

        tokenizer = {"path": os.path.abspath(tokenizer_path), "sha256_16": build_tokenizer(tokenizer_path).identity()}
    return write_layout(save, source, source.config, target_tp, target_pp, tokenizer=tokenizer,
                        extra_metadata={"imported_from": os.path.abspath(hf_path)}, force=force,
                        set_latest=set_latest)


