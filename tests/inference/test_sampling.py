"""Token choice: the top-k / top-p / temperature filters against direct per-row implementations,
draws that follow the filtered distribution, and the same draws on every rank of a TP x PP layout."""

import pytest
import torch

from megatron_ds.inference import SamplingParams, filtered_logits, generate, sample_next, top_k_filter, top_p_filter
from megatron_ds.parallel.topology import ParallelState, build_parallel_state
from tests.inference.helpers import PROMPT, build_chunks, tiny_config
from tests.multiproc import run_world


def _nucleus(probs: list[float], p: float) -> set[int]:
    """Direct top-p: walk the tokens from most to least likely, keep each until the kept mass reaches p."""
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


def _logits(rows=6, vocab=50, seed=0):
    # Spread-out logits, so no two tokens tie and no cumulative sum sits within rounding of p.
    return 3.0 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.75, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = _logits()
    kept = torch.isfinite(top_p_filter(logits, p))
    for row, mask in zip(logits.softmax(-1), kept):
        assert set(mask.nonzero().flatten().tolist()) == _nucleus(row.tolist(), p)


def test_top_p_of_one_and_top_k_of_zero_keep_everything():
    logits = _logits()
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert torch.equal(top_k_filter(logits, 0), logits)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_keeps_the_k_largest(k):
    logits = _logits()
    kept = torch.isfinite(top_k_filter(logits, k))
    for row, mask in zip(logits, kept):
        assert set(mask.nonzero().flatten().tolist()) == set(sorted(range(50), key=lambda i: -row[i])[:k])


def test_temperature_divides_the_logits_before_the_filters():
    logits = _logits()
    # Top-p acts on the tempered distribution (HF's order): the set is the nucleus of softmax(logits / T).
    out = filtered_logits(logits, SamplingParams(temperature=2.0, top_p=0.6))
    for row, filt in zip(logits, out):
        tempered = (row / 2.0).softmax(-1).tolist()
        assert set(torch.isfinite(filt).nonzero().flatten().tolist()) == _nucleus(tempered, 0.6)
        kept = torch.isfinite(filt)
        assert torch.allclose(filt[kept], row[kept].float() / 2.0)


def test_draws_follow_the_filtered_distribution():
    # 8 tokens, 20000 draws: a frequency's standard error is at most sqrt(0.25 / 20000) = 0.0035;
    # 0.02 is over 5 of them, while a wrong filter moves some frequency by >= 0.05.
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]]).expand(20000, 8)
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.8, seed=3)
    draws = sample_next(logits, params, torch.Generator().manual_seed(params.seed))
    freq = torch.bincount(draws, minlength=8).double() / draws.numel()
    expected = filtered_logits(logits[:1], params).softmax(-1)[0].double()
    assert (freq - expected).abs().max() < 0.02
    assert freq[expected == 0].sum() == 0  # nothing outside the filtered set, ever


def test_greedy_is_the_argmax():
    logits = _logits()
    assert torch.equal(sample_next(logits, SamplingParams(), torch.Generator()), logits.argmax(-1))


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)])
def test_out_of_range_settings_are_refused_naming_the_flag(bad):
    with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
        SamplingParams(**bad)


SAMPLING = SamplingParams(temperature=0.8, top_k=100, top_p=0.9, seed=11)


def _sample_tp2_pp2():
    state = build_parallel_state(2, 2)
    chunks = build_chunks(tiny_config(), state.tp_group, 2, state.pp_rank)
    return generate(chunks, state, PROMPT, 12, sampling=SAMPLING).tokens


def test_every_rank_of_tp2_pp2_draws_the_same_tokens_as_one_process():
    model = build_chunks(tiny_config())[0]
    single = generate(model, ParallelState(), PROMPT, 12, sampling=SAMPLING).tokens
    greedy = generate(model, ParallelState(), PROMPT, 12).tokens
    other_seed = generate(model, ParallelState(), PROMPT, 12,
                          sampling=SamplingParams(temperature=0.8, top_k=100, top_p=0.9, seed=12)).tokens
    assert not torch.equal(single, greedy) and not torch.equal(single, other_seed)  # it does sample
    # The TP-gathered logits equal the single process's to ~1e-7 (summation order); a draw could
    # only differ if its uniform fell within that of a bucket edge (probability ~1e-6 per test).
    for rank, tokens in enumerate(run_world(4, _sample_tp2_pp2)):
        assert torch.equal(tokens, single), (rank, tokens, single)
