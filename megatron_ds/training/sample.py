"""Greedy continuation of a prompt with the live (possibly tensor- and pipeline-parallel) model.

Used at the end of a run (``--generate-prompt``) to show what the model learned. It is the
generation loop of megatron_ds/inference with greedy sampling and the KV cache; see there for how
the pipeline stages pass the tokens along and how sequence parallelism is switched off for it.
"""

from __future__ import annotations

from megatron_ds.inference import SamplingParams, generate
from megatron_ds.parallel.topology import ParallelState


def greedy_generate(model, state: ParallelState, prompt_ids: list[int], max_new_tokens: int,
                    vocab_size: int, pad_multiple: int = 1, max_length: int | None = None,
                    use_kv_cache: bool = True) -> list[int]:
    """Collective over the TP and pipeline groups (``model``: this rank's module or model chunks).
    Returns the generated ids (prompt excluded) on every rank.

    ``pad_multiple`` is accepted for the callers written before the cache and ignored: generation
    runs with sequence parallelism off, so no length needs padding to a multiple of TP.
    """
    del pad_multiple
    ids = list(prompt_ids) or [0]
    result = generate(model, state, ids, max_new_tokens, sampling=SamplingParams(), vocab_size=vocab_size,
                      max_length=max_length, use_kv_cache=use_kv_cache)
    return result.tokens[0].tolist()
