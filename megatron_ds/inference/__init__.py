"""Generation: the KV-cached decoding loop (generate.py), token choice (sampling.py), and loading a
checkpoint into an inference model at any TP x PP layout (loading.py; tools/generate.py is its CLI)."""

from megatron_ds.inference.generate import GenerationResult, gather_vocab, generate
from megatron_ds.inference.sampling import SamplingParams, filtered_logits, sample_next, top_k_filter, top_p_filter

__all__ = ["GenerationResult", "SamplingParams", "filtered_logits", "gather_vocab", "generate", "sample_next",
           "top_k_filter", "top_p_filter"]
