"""The KV cache changes nothing but the cost: cached generation picks the tokens that re-running the
whole sequence every step picks, and each step's logits equal the full forward's last position.

Tolerance 1e-5 of the logits' max magnitude: the same fp32 weights and ops, differing only in the
attention's summation shapes (one query over the cache vs the full causal square) and, across
layouts, in the TP all-reduce order; measured about 1e-6 and below. A wrong position id or a
stale cache entry moves the logits by 1e-1 of their scale.
"""

import torch
import torch.distributed as dist

from megatron_ds.inference import generate
from megatron_ds.model.kv_cache import KVCache
from megatron_ds.parallel.topology import ParallelState, build_parallel_state
from megatron_ds.training.sample import greedy_generate
from tests.inference.helpers import PROMPT, build_chunks, max_rel_err, tiny_config
from tests.multiproc import run_world

TOL = 1e-5  # of the logits' scale; see the module docstring
NEW = 12


def _reference(num_kv_heads: int = 2):
    """Single process, no cache: (tokens [1, NEW], per-step logits)."""
    model = build_chunks(tiny_config(num_kv_heads))[0]
    r = generate(model, ParallelState(), PROMPT, NEW, use_kv_cache=False, return_logits=True)
    return r.tokens, r.step_logits


def test_cached_greedy_equals_uncached_in_one_process():
    model = build_chunks(tiny_config())[0]
    cached = generate(model, ParallelState(), PROMPT, NEW, return_logits=True)
    tokens, logits = _reference()
    assert torch.equal(cached.tokens, tokens)
    assert len(cached.step_logits) == len(logits) == NEW
    for step, (a, b) in enumerate(zip(cached.step_logits, logits)):
        assert max_rel_err(a, b) < TOL, step
    assert len(set(tokens[0].tolist())) > 3  # not one token repeated: the comparison means something


def test_cached_forward_of_each_new_token_equals_the_full_forward():
    """The model API itself: prefill 6 tokens, then 2 at once, then 1 (the cache's causal mask for
    several new queries), against one forward over all 9 positions."""
    model = build_chunks(tiny_config())[0].eval()
    ids = torch.tensor([PROMPT + [9, 33, 250]])
    with torch.no_grad():
        full = model(input_ids=ids)  # [1, 9, V_padded]
        cache = KVCache.for_model(model, 1, 16)
        parts = [model(input_ids=ids[:, a:b], kv_cache=cache) for a, b in ((0, 6), (6, 8), (8, 9))]
    assert cache.seq_len == 9
    assert max_rel_err(torch.cat(parts, dim=1), full) < TOL


def test_last_token_logits_are_the_full_forwards_last_position():
    """Generation runs the LM head on the last position only (prefill pays no s x V); the logits are
    the full forward's last row, with and without the cache."""
    model = build_chunks(tiny_config())[0].eval()
    ids = torch.tensor([PROMPT + [9, 33, 250], PROMPT + [4, 4, 5]])
    with torch.no_grad():
        full = model(input_ids=ids)  # [2, 9, V_padded]
        last = model(input_ids=ids, last_token_logits=True)
        cache = KVCache.for_model(model, 2, 16)
        model(input_ids=ids[:, :8], kv_cache=cache, last_token_logits=True)
        cached = model(input_ids=ids[:, 8:], kv_cache=cache, last_token_logits=True)
    assert last.shape == cached.shape == (2, 1, full.shape[-1])
    assert max_rel_err(last, full[:, -1:]) < TOL and max_rel_err(cached, full[:, -1:]) < TOL
    try:
        model(input_ids=ids, labels=ids, last_token_logits=True)
    except ValueError as e:
        assert "generation" in str(e)
    else:
        raise AssertionError("labels with last_token_logits must be refused")


def test_a_batch_of_prompts_generates_each_row_as_alone():
    model = build_chunks(tiny_config())[0]
    other = [3, 1, 4, 1, 5, 9]
    batch = generate(model, ParallelState(), [PROMPT, other], NEW).tokens
    for row, prompt in zip(batch, (PROMPT, other)):
        assert torch.equal(row, generate(model, ParallelState(), prompt, NEW, use_kv_cache=False).tokens[0])


def test_generation_stops_at_eos_and_at_the_last_position():
    model = build_chunks(tiny_config())[0]
    tokens, _ = _reference()
    eos = int(tokens[0, 3])  # the 4th greedy token: generation must end right there
    first = tokens[0].tolist().index(eos)
    stopped = generate(model, ParallelState(), PROMPT, NEW, eos_id=eos).tokens[0]
    assert stopped.tolist() == tokens[0, :first + 1].tolist()
    # max_position_embeddings 64: a 60-token prompt leaves room for 4 new tokens only.
    assert generate(model, ParallelState(), list(range(60)), NEW).tokens.shape == (1, 4)


def _layout_generate(tp, pp, virtual, num_kv_heads, sequence_parallel):
    state = build_parallel_state(tp, pp)
    chunks = build_chunks(tiny_config(num_kv_heads), state.tp_group, pp, state.pp_rank, virtual, sequence_parallel)
    cached = generate(chunks, state, PROMPT, NEW, return_logits=True)
    sp_restored = all(m.sequence_parallel == sequence_parallel for c in chunks for m in c.modules()
                      if hasattr(m, "sequence_parallel") and c.tp_size > 1)
    greedy = greedy_generate(chunks, state, PROMPT, NEW, tiny_config().vocab_size, pad_multiple=tp)
    return {"tokens": cached.tokens, "logits": cached.step_logits if state.is_last_stage else None,
            "greedy": greedy, "sp_restored": sp_restored, "rank": dist.get_rank()}


def _check_layout(results, num_kv_heads):
    tokens, logits = _reference(num_kv_heads)
    for r in results:
        assert torch.equal(r["tokens"], tokens), r["rank"]
        assert r["greedy"] == tokens[0].tolist(), r["rank"]
        assert r["sp_restored"], r["rank"]
        if r["logits"] is not None:
            for step, (a, b) in enumerate(zip(r["logits"], logits)):
                assert max_rel_err(a, b) < TOL, (r["rank"], step)
    assert sum(r["logits"] is not None for r in results) == 2  # the last stage's two TP ranks


def test_cached_generation_at_tp2_pp2_interleaved_with_replicated_kv_equals_the_single_process():
    # 1 KV head at TP2: each rank caches a replicated copy; 2 chunks per rank, one layer each.
    _check_layout(run_world(4, _layout_generate, tp=2, pp=2, virtual=2, num_kv_heads=1, sequence_parallel=False), 1)


def test_a_sequence_parallel_model_generates_with_sp_off_and_gets_it_back():
    # Built for training with --sequence-parallel: generation flips SP off (no weight changes) and restores it.
    _check_layout(run_world(4, _layout_generate, tp=2, pp=2, virtual=1, num_kv_heads=2, sequence_parallel=True), 2)
