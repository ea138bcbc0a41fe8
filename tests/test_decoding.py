"""Batched KV-cached decoding against plain, cache-free, one-image-at-a-time ClipCap decoding.

    /work/venv/bin/pytest -x -q tests/test_decoding.py
"""
from __future__ import annotations

import pytest
import torch

from foodcap.decoding import DecodingOptions, generate_token_ids, stop_token_ids, tokens_to_text
from foodcap.language import load_tokenizer
from foodcap.model import ModelConfig

PEAKY_STOP = 50
PEAKY_MAX_LEN = 24



# ---------------------------------------------------------------- ClipCap's decoding, written plainly
def clipcap_greedy(gpt, prefix: torch.Tensor, stop_ids: set[int], max_len: int) -> list[int]:
    """ClipCap's non-beam path for one image: rerun GPT-2 on the whole sequence, take the argmax."""
    generated, tokens = prefix[None], []  # (1, P, D)
    with torch.no_grad():
        for _ in range(max_len):
            logits = gpt(inputs_embeds=generated).logits[0, -1]  # its top-p filter never removes the argmax
            token = int(logits.argmax())
            tokens.append(token)
            if token in stop_ids:
                break
            generated = torch.cat((generated, gpt.transformer.wte(torch.tensor([[token]]))), dim=1)
    return tokens


def clipcap_beam(gpt, prefix: torch.Tensor, beam_size: int, stop_ids: set[int], max_len: int,
                 temperature: float) -> list[list[int]]:
    """ClipCap's generate_beam for one image, cache-free; all hypotheses, best first."""
    stop = torch.tensor(sorted(stop_ids))
    temperature = temperature if temperature > 0 else 1.0
    generated = prefix[None]  # (1, P, D)
    tokens = scores = None
    seq_lengths = torch.ones(beam_size)
    is_stopped = torch.zeros(beam_size, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_len):
            logits = gpt(inputs_embeds=generated).logits[:, -1, :] / temperature
            logits = logits.softmax(-1).log()
            if scores is None:
                scores, next_tokens = logits.topk(beam_size, -1)
                generated = generated.expand(beam_size, *generated.shape[1:])
                next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
                tokens = next_tokens
            else:
                logits[is_stopped] = float("-inf")
                logits[is_stopped, 0] = 0
                scores_sum = scores[:, None] + logits
                seq_lengths[~is_stopped] += 1
                scores_sum_average = scores_sum / seq_lengths[:, None]
                scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
                source = next_tokens // scores_sum.shape[1]
                seq_lengths = seq_lengths[source]
                next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
                tokens = torch.cat((tokens[source], next_tokens), dim=1)
                generated = generated[source]
                scores = scores_sum_average * seq_lengths
                is_stopped = is_stopped[source]
            embed = gpt.transformer.wte(next_tokens.squeeze(1)).view(generated.shape[0], 1, -1)
            generated = torch.cat((generated, embed), dim=1)
            is_stopped = is_stopped | torch.isin(next_tokens.squeeze(1), stop)
            if is_stopped.all():
                break
    order = (scores / seq_lengths).argsort(descending=True)
    return [tokens[i, : int(seq_lengths[i])].tolist() for i in order]


# ---------------------------------------------------------------- models

@pytest.fixture(scope="module")
def peaky_prefixes():
    return torch.randn(7, 3, 32, generator=torch.Generator().manual_seed(1))  # (B, P, D)


@pytest.fixture
def tiny_prefixes(tiny_model_factory):
    model = tiny_model_factory("mlp")  # the random transformer mapper gives every image the same prefix
    embeddings = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))  # (N, clip_dim)
    with torch.no_grad():
        return model, model.embed_prefix(embeddings)  # (N, P, D)


def test_peaky_model_gives_captions_of_many_lengths(peaky_gpt, peaky_prefixes):
    lengths = [len(clipcap_greedy(peaky_gpt, p, {PEAKY_STOP}, PEAKY_MAX_LEN)) for p in peaky_prefixes]
    assert len(set(lengths)) >= 4 and min(lengths) < PEAKY_MAX_LEN  # the equality tests below cover real stops


def test_greedy_matches_clipcap_for_a_batch_with_different_lengths(peaky_gpt, peaky_prefixes):
    fast = generate_token_ids(peaky_gpt, peaky_prefixes, [PEAKY_STOP], max_new_tokens=PEAKY_MAX_LEN)
    expected = [clipcap_greedy(peaky_gpt, p, {PEAKY_STOP}, PEAKY_MAX_LEN) for p in peaky_prefixes]
    assert [seqs[0] for seqs in fast] == expected


@pytest.mark.parametrize("beam_size,temperature", [(2, 1.0), (3, 0.5), (5, 1.7), (4, 0.0)])
def test_beam_matches_clipcap_for_a_batch_with_different_lengths(peaky_gpt, peaky_prefixes, beam_size, temperature):
    expected = [clipcap_beam(peaky_gpt, p, beam_size, {PEAKY_STOP}, PEAKY_MAX_LEN, temperature) for p in peaky_prefixes]
    assert len({len(hyps[0]) for hyps in expected}) >= 2  # the batch really mixes caption lengths
    fast = generate_token_ids(peaky_gpt, peaky_prefixes, [PEAKY_STOP], num_beams=beam_size, temperature=temperature,
                              max_new_tokens=PEAKY_MAX_LEN, num_return_sequences=beam_size)
    assert fast == expected  # every hypothesis, in ClipCap's order


def _probe_stop_ids(model, prefixes, length=10) -> set[int]:
    """Tokens the tiny GPT-2 greedily emits after its first one: as stops they end captions at varied lengths."""
    stops = set()
    for prefix in prefixes:
        seq = clipcap_greedy(model.gpt, prefix, set(), length)
        stops |= {token for i, token in enumerate(seq) if i > 0 and token not in seq[:i]}
    return stops


def test_tiny_clipcap_model_greedy_and_beam_match_reference(tiny_prefixes):
    model, prefixes = tiny_prefixes
    stops, max_len = _probe_stop_ids(model, prefixes, 8), 9
    greedy = [clipcap_greedy(model.gpt, p, stops, max_len) for p in prefixes]
    assert len({len(g) for g in greedy}) >= 2
    assert [s[0] for s in generate_token_ids(model, prefixes, stops, max_new_tokens=max_len)] == greedy
    for beam_size, temperature in ((2, 1.0), (4, 0.7)):
        beams = [clipcap_beam(model.gpt, p, beam_size, stops, max_len, temperature)[:2] for p in prefixes]
        fast = generate_token_ids(model, prefixes, stops, num_beams=beam_size, temperature=temperature,
                                  max_new_tokens=max_len, num_return_sequences=2)
        assert fast == beams


def test_an_image_decodes_the_same_alone_or_in_a_batch(peaky_gpt, peaky_prefixes):
    for decoding in (dict(), dict(num_beams=4), dict(do_sample=True, temperature=1.2, num_return_sequences=2)):
        batch = generate_token_ids(peaky_gpt, peaky_prefixes, [PEAKY_STOP], max_new_tokens=PEAKY_MAX_LEN, **decoding)
        alone = [generate_token_ids(peaky_gpt, p[None], [PEAKY_STOP], max_new_tokens=PEAKY_MAX_LEN, **decoding)[0]
                 for p in peaky_prefixes]
        assert batch == alone, decoding


# ---------------------------------------------------------------- stopping and repetition
@pytest.mark.parametrize("decoding", [dict(), dict(num_beams=3), dict(do_sample=True, top_p=1.0)])
def test_sequences_end_at_the_first_stop_token_or_the_length_limit(peaky_gpt, peaky_prefixes, decoding):
    for max_len in (1, 5, PEAKY_MAX_LEN):
        for (seq, *_) in generate_token_ids(peaky_gpt, peaky_prefixes, [PEAKY_STOP, 7], max_new_tokens=max_len,
                                            **decoding):
            assert 1 <= len(seq) <= max_len
            stops_at = [i for i, t in enumerate(seq) if t in (PEAKY_STOP, 7)]
            assert stops_at in ([], [len(seq) - 1])  # nothing after a stop token, and no stop in the middle
            if not stops_at:
                assert len(seq) == max_len


@pytest.mark.parametrize("n,decoding", [(1, dict()), (2, dict()), (3, dict()), (2, dict(num_beams=3)),
                                        (3, dict(num_beams=3)), (2, dict(do_sample=True, temperature=0.7))])
def test_no_repeat_ngram_size_is_honoured(peaky_gpt, peaky_prefixes, decoding, n):
    plain = generate_token_ids(peaky_gpt, peaky_prefixes, [], max_new_tokens=30, **decoding)
    ngrams = lambda seq: [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]  # noqa: E731
    assert any(len(set(ngrams(s[0]))) < len(ngrams(s[0])) for s in plain)  # the model does repeat itself
    banned = generate_token_ids(peaky_gpt, peaky_prefixes, [], max_new_tokens=30, no_repeat_ngram_size=n, **decoding)
    for (seq, *_) in banned:
        assert len(seq) == 30 and len(set(ngrams(seq))) == len(ngrams(seq))


def test_repetition_penalty_makes_captions_less_repetitive(peaky_gpt, peaky_prefixes):
    def distinct(**kw):
        out = generate_token_ids(peaky_gpt, peaky_prefixes, [], max_new_tokens=30, **kw)
        return sum(len(set(s[0])) for s in out)

    assert distinct(repetition_penalty=3.0) > distinct()


# ---------------------------------------------------------------- beam n-best, options, stop tokens, text
def test_beam_returns_distinct_hypotheses_best_first(peaky_gpt, peaky_prefixes):
    one = generate_token_ids(peaky_gpt, peaky_prefixes, [PEAKY_STOP], num_beams=5, max_new_tokens=PEAKY_MAX_LEN)
    three = generate_token_ids(peaky_gpt, peaky_prefixes, [PEAKY_STOP], num_beams=5, max_new_tokens=PEAKY_MAX_LEN,
                               num_return_sequences=3)
    for best, nbest in zip(one, three):
        assert len(best) == 1 and len(nbest) == 3 and nbest[0] == best[0]
        assert len({tuple(s) for s in nbest}) == 3


@pytest.mark.parametrize("bad", [dict(num_beams=0), dict(num_beams=2, do_sample=True), dict(top_p=0.0),
                                 dict(temperature=-1.0), dict(num_beams=2, num_return_sequences=3),
                                 dict(num_return_sequences=2), dict(repetition_penalty=0.0), dict(stop_token=""),
                                 dict(max_new_tokens=0)])
def test_bad_options_are_refused_with_a_message(bad):
    with pytest.raises(ValueError):
        DecodingOptions.from_kwargs(**bad)


def test_unknown_option_names_are_refused():
    with pytest.raises(TypeError, match="num_beam"):
        DecodingOptions.from_kwargs(num_beam=3)


def test_stop_tokens_follow_the_checkpoint_kind():
    tok = load_tokenizer("tiny")
    ours = ModelConfig(append_eos=True)
    reference = ModelConfig(append_eos=False, stop_token=".")
    assert stop_token_ids(tok, ours) == [tok.eos_token_id] == [50256]
    assert stop_token_ids(tok, reference) == tok.encode(".")
    assert stop_token_ids(tok, reference, stop_token="!") == tok.encode("!")
    assert set(stop_token_ids(tok, ours, stop_token=".")) == {tok.encode(".")[0], tok.eos_token_id}


def test_eos_is_dropped_from_the_text_but_a_text_stop_token_stays():
    tok = load_tokenizer("tiny")
    words = tok.encode("A bowl of soup")
    assert tokens_to_text(tok, words + [tok.eos_token_id]) == "A bowl of soup"
    assert tokens_to_text(tok, words + tok.encode(".")) == "A bowl of soup."


def test_prefix_plus_length_beyond_gpt2_positions_is_a_clear_error(peaky_gpt, peaky_prefixes):
    with pytest.raises(ValueError, match="positions"):
        generate_token_ids(peaky_gpt, peaky_prefixes, [], max_new_tokens=200)


# ---------------------------------------------------------------- the Captioner API
def test_captioner_caption_embeddings_returns_text_per_row(tiny_model_factory):
    from foodcap.captioner import Captioner

    captioner = Captioner(tiny_model_factory("mlp"), load_tokenizer("tiny"))
    embeddings = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    greedy = captioner.caption_embeddings(embeddings, max_new_tokens=6)
    assert len(greedy) == 3 and all(isinstance(c, str) and c for c in greedy)
    # the text is the decoded token ids of the core generator (no EOS to drop: the tiny model never emits it)
    with torch.no_grad():
        prefix = captioner.model.embed_prefix(embeddings)
    ids = generate_token_ids(captioner.model, prefix, [50256], max_new_tokens=6)
    assert greedy == [captioner.tokenizer.decode(s[0]).strip() for s in ids]
    nbest = captioner.caption_embeddings(embeddings, num_beams=3, num_return_sequences=2, max_new_tokens=6,
                                         batch_size=2)
    assert [len(c) for c in nbest] == [2, 2, 2] and all(isinstance(c, str) for row in nbest for c in row)
    assert captioner.caption_embeddings(embeddings[0], max_new_tokens=6) == greedy[:1]  # one (D,) row
    with pytest.raises(ValueError, match="64"):
        captioner.caption_embeddings(torch.randn(2, 32))
