"""The DeepSeek-LLM decoder (Llama architecture): embedding, pre-norm layers, final norm, LM head.

One instance is one rank's piece of the model: the TP shard given by ``tp_group`` and the
pipeline stage given by ``pre_process`` / ``post_process`` / ``layer_range``. It holds no
process-group state beyond ``tp_group``.

Parameter names are global and map 1:1 onto Hugging Face Llama names (see ``hf_names.py``):

    embedding.weight                         model.embed_tokens.weight       (vocab rows padded)
    layers.{i}.input_norm.weight             model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.qkv.weight          ...self_attn.{q,k,v}_proj.weight (rows stacked)
      (KV heads replicated: attention.q.weight -> q_proj, attention.kv.weight -> {k,v}_proj)
    layers.{i}.attention.out.weight          ...self_attn.o_proj.weight
    layers.{i}.post_attention_norm.weight    model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.gate_up.weight            ...mlp.{gate,up}_proj.weight     (rows stacked)
    layers.{i}.mlp.down.weight               ...mlp.down_proj.weight
    final_norm.weight                        model.norm.weight
    lm_head.weight                           lm_head.weight                  (vocab rows padded)

``layers`` is a ModuleDict keyed by the *global* layer index, so a pipeline stage holding layers
30..59 names them ``layers.30`` ... like the single-process model does.

Initialization: every weight matrix is N(0, init_method_std) drawn from
``param_generator(seed, key)`` with key its module's global name ("layers.7.attention.qkv"),
as a full fp32 master that the rank slices; norm weights are ones. So any TP layout and any
pipeline split starts from the single-process model's weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_ds.config import ModelConfig
from megatron_ds.kernels import Kernels, rotary_cos_sin, select_kernels
from megatron_ds.model.kv_cache import KVCache
from megatron_ds.model.rmsnorm import RMSNorm
from megatron_ds.model.transformer_layer import TransformerLayer
from megatron_ds.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron_ds.parallel.random import init_method_normal, param_generator
from megatron_ds.parallel.topology import group_size


class DeepSeekModel(nn.Module):
    """One rank's shard of the decoder; see ``forward`` for what each pipeline stage takes and returns."""

    def __init__(self, config: ModelConfig, *, tp_group=None, sequence_parallel: bool = False,
                 pre_process: bool = True, post_process: bool = True, layer_range: Optional[range] = None,
                 seed: int = 1234, device=None, params_dtype: torch.dtype = torch.float32,
                 kernels: Optional[Kernels] = None):
        super().__init__()
        # The ops every layer calls: fused (csrc/) by default, the pure-PyTorch references when
        # handed select_kernels(fused=False) (--no-fused-kernels).
        self.kernels = kernels = kernels or select_kernels(device=device)
        tp = group_size(tp_group)
        layer_range = range(config.num_layers) if layer_range is None else layer_range
        if len(layer_range) and (layer_range[0] < 0 or layer_range[-1] >= config.num_layers):
            raise ValueError(f"layer_range {layer_range} lies outside the model's {config.num_layers} layers")
        self.config = config
        self.tp_group, self.tp_size = tp_group, tp
        self.sequence_parallel = sequence_parallel and tp > 1
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_range = layer_range
        self.padded_vocab_size = config.padded_vocab_size(tp)

        h = config.hidden_size
        init = init_method_normal(config.init_method_std)
        common = dict(tp_group=tp_group, sequence_parallel=self.sequence_parallel,
                      params_dtype=params_dtype, device=device)
        if pre_process:
            self.embedding = VocabParallelEmbedding(self.padded_vocab_size, h, init_method=init,
                                                    init_generator=param_generator(seed, "embedding", device), **common)
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, i, seed=seed, kernels=kernels, **common) for i in layer_range})
        if post_process:
            self.final_norm = RMSNorm(h, config.norm_epsilon, sequence_parallel=self.sequence_parallel, kernels=kernels,
                                      params_dtype=params_dtype, device=device)
            # Under SP the LM head's input is [s/tp, b, h]; the ColumnParallelLinear all-gathers it.
            self.lm_head = ColumnParallelLinear(h, self.padded_vocab_size, init_method=init, gather_output=False,
                                                init_generator=param_generator(seed, "lm_head", device), **common)

    def forward(self, input_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, hidden_states: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                last_token_logits: bool = False) -> torch.Tensor:
        """Run this rank's stage.

        input_ids [b, s] (first stage) or hidden_states [s, b, h] (other stages; [s/tp, b, h] under SP);
        position_ids [b, s] default 0..s-1 for every sequence.
        document_ids [b, s] int (--reset-attention-mask; the batch key "document_ids"): when given,
        token i attends token j only if j <= i and both have the same id; default plain causal.
        kv_cache (generation; see model/kv_cache.py): this chunk's cache; the input holds the tokens
        after its ``seq_len`` cached ones, position_ids default seq_len.., and the cache advances by s.
        It needs sequence parallelism off (SP changes no weight: build the inference model without it).
        last_token_logits (generation, no labels, SP off): the LM head runs on the last position only,
        so a prompt's prefill does not pay s x V for logits nobody reads; the logits are [b, 1, V_padded/tp].
        Returns, last stage: per-token loss [b, s] fp32 if labels [b, s] are given, else this rank's
        vocab-parallel logits [b, s, V_padded/tp] (a transposed view of [s, b, ...]; columns at
        global index >= config.vocab_size are padding). Other stages: hidden [s, b, h] ([s/tp, b, h] under SP).
        """
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids [b, s]")
            hidden = self.embedding(input_ids)  # [s, b, h] (SP: [s/tp, b, h])
        else:
            if hidden_states is None:
                raise ValueError("a pipeline stage after the first needs hidden_states [s, b, h] from the previous one")
            hidden = hidden_states

        seq_len = hidden.shape[0] * (self.tp_size if self.sequence_parallel else 1)
        start = 0
        if kv_cache is not None:
            if self.sequence_parallel or document_ids is not None:
                raise ValueError("the KV cache runs without sequence parallelism and document masks")
            start = kv_cache.seq_len
        if position_ids is None:
            position_ids = torch.arange(start, start + seq_len, device=hidden.device).expand(hidden.shape[1], seq_len)
        # Every layer rotates the full sequence (attention gathers it under SP): tables [s, b, 1, d].
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rotary_base, dtype=hidden.dtype)

        attention_mask = None if document_ids is None else document_causal_mask(document_ids)
        if kv_cache is None:
            for layer in self.layers.values():
                hidden = layer(hidden, cos, sin, attention_mask)
        else:
            for layer in self.layers.values():
                hidden = layer(hidden, cos, sin, kv_cache=kv_cache)
            kv_cache.advance(seq_len)
        if not self.post_process:
            return hidden

        if last_token_logits:
            if labels is not None or self.sequence_parallel:
                raise ValueError("last_token_logits is for generation: no labels, sequence parallelism off")
            hidden = hidden[-1:]  # [1, b, h]
        logits = self.lm_head(self.final_norm(hidden))  # [s, b, V_padded/tp]
        if labels is None:
            return logits.transpose(0, 1)
        # Loss in the [s, b] layout the logits already have; only the small loss tensor is transposed.
        # (The fused cross-entropy writes its gradient over `logits`, which nothing else reads.)
        loss = self.kernels.cross_entropy(logits, labels.t(), self.tp_group, vocab_size=self.config.vocab_size)
        return loss.t()  # [b, s] fp32


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> bool [b, 1, s, s]: True where query i may attend key j, i.e.
    j <= i and the same document (every row keeps its diagonal, so no row is fully masked)."""
    s = document_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [b, s, s]
    return (same_doc & causal).unsqueeze(1)
