"""Sampling: seeded and reproducible, temperature, top-k / top-p support, repetition controls.

    /work/venv/bin/pytest -x -q tests/test_sampling.py
"""
from __future__ import annotations

import pytest
import torch

from foodcap.decoding import generate_token_ids
from foodcap.sampling import (apply_repetition_penalty, ban_repeated_ngrams, nucleus_mask, sample_tokens,
                              sample_uniforms)

MAX_LEN = 16
PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])



@pytest.fixture(scope="module")
def gpt(peaky_gpt):
    return peaky_gpt


@pytest.fixture(scope="module")
def prefixes():
    return torch.randn(6, 3, 32, generator=torch.Generator().manual_seed(1))  # (B, P, D)


def sample(gpt, prefixes, **kw):
    kw = {"do_sample": True, "top_p": 1.0, "max_new_tokens": MAX_LEN, **kw}
    return generate_token_ids(gpt, prefixes, [], **kw)


def frequencies(logits: torch.Tensor, **kw) -> torch.Tensor:
    """How often each token is drawn for draws spread evenly over [0, 1)."""
    draws = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    tokens = sample_tokens(logits.expand(len(draws), -1), draws, **kw)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / len(draws)


# ---------------------------------------------------------------- on a fixed distribution
def test_without_limits_sampling_follows_the_distribution():
    assert torch.allclose(frequencies(PROBS.log()), PROBS.double(), atol=1e-3)


@pytest.mark.parametrize("top_k,top_p,support", [(0, 0.7, 3), (0, 0.3, 1), (2, 1.0, 2), (4, 0.5, 2), (0, 0.95, 5)])
def test_top_k_and_top_p_restrict_the_support(top_k, top_p, support):
    freq = frequencies(PROBS.log(), top_k=top_k, top_p=top_p)
    kept = PROBS.double().clone()
    kept[support:] = 0  # the most likely `support` tokens: the smallest set reaching top_p, within top_k
    assert torch.allclose(freq, kept / kept.sum(), atol=1e-3)


def test_temperature_reshapes_the_distribution():
    for temperature in (0.5, 2.0):
        tempered = PROBS.double() ** (1 / temperature)
        assert torch.allclose(frequencies(PROBS.log(), temperature=temperature), tempered / tempered.sum(), atol=1e-3)


def test_nucleus_keeps_the_token_that_crosses_top_p_and_always_the_best():
    keep = nucleus_mask(PROBS[None], top_k=0, top_p=0.64)[0]  # 0.4 + 0.25 crosses 0.64 at the second token
    assert keep.tolist() == [True, True, False, False, False, False]
    assert nucleus_mask(PROBS[None], top_k=0, top_p=1e-6)[0].tolist() == [True] + [False] * 5


def test_tokens_outside_the_support_are_never_drawn_even_at_the_extremes():
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.5]])
    for u in (0.0, 0.999999999):
        assert sample_tokens(logits, torch.tensor([u]), top_k=2).item() in (0, 1)
        assert sample_tokens(logits, torch.tensor([u])).item() != 2


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


@pytest.mark.parametrize("n,banned", [(1, {1, 2, 3}), (2, {3}), (3, {3}), (4, set())])
def test_no_repeat_ngram_bans_exactly_the_completing_tokens(n, banned):
    history = torch.tensor([[1, 2, 3, 1, 2]])  # next token 3 would repeat "2 3", "1 2 3"
    out = ban_repeated_ngrams(torch.zeros(1, 6), history, n)
    assert {i for i, v in enumerate(out[0].tolist()) if v == float("-inf")} == banned


# ---------------------------------------------------------------- through the decoder
def test_same_seed_same_captions_other_seed_other_captions(gpt, prefixes):
    assert sample(gpt, prefixes, seed=5) == sample(gpt, prefixes, seed=5)
    assert sample(gpt, prefixes, seed=5) != sample(gpt, prefixes, seed=6)


def test_low_temperature_approaches_greedy(gpt, prefixes):
    greedy = [s[0] for s in generate_token_ids(gpt, prefixes, [], max_new_tokens=MAX_LEN)]

    def agreement(temperature):
        same = total = 0
        for seed in range(3):
            for (seq,), ref in zip(sample(gpt, prefixes, temperature=temperature, seed=seed), greedy):
                first_difference = next((i for i, (a, b) in enumerate(zip(seq, ref)) if a != b), len(ref))
                same, total = same + first_difference, total + len(ref)
        return same / total

    high, mid, low = agreement(1.5), agreement(0.3), agreement(1e-3)
    assert high < mid < low == 1.0


def test_temperature_changes_sampled_captions(gpt, prefixes):
    assert sample(gpt, prefixes, temperature=0.7) != sample(gpt, prefixes, temperature=1.5)


def test_top_k_one_is_greedy(gpt, prefixes):
    greedy = generate_token_ids(gpt, prefixes, [], max_new_tokens=MAX_LEN)
    assert sample(gpt, prefixes, top_k=1, temperature=2.0) == greedy


def test_several_samples_per_image(gpt, prefixes):
    one = sample(gpt, prefixes, seed=3)
    three = sample(gpt, prefixes, seed=3, num_return_sequences=3)
    assert all(len(s) == 3 for s in three)
    assert [s[0] for s in three] == [s[0] for s in one]  # sample j uses stream j whatever the count
    assert any(len({tuple(x) for x in s}) == 3 for s in three)


def test_sample_streams_depend_only_on_seed_and_index():
    assert torch.equal(sample_uniforms(7, 3, 10)[1], sample_uniforms(7, 2, 10)[1])
    assert not torch.equal(sample_uniforms(7, 2, 10)[0], sample_uniforms(8, 2, 10)[0])
    assert not torch.equal(sample_uniforms(None, 1, 10), sample_uniforms(None, 1, 10))
