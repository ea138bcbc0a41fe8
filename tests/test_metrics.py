"""Caption metrics on hand-checked toy captions, the Java-free fallback, and CLIPScore's definition."""
from __future__ import annotations

import pytest
import torch

from foodcap import metrics
from foodcap.metrics import clip_scores, ptb_tokenize, score_captions, simple_tokenize

REFS = {
    "soup": ["a bowl of tomato soup", "tomato soup in a white bowl"],
    "cake": ["a slice of chocolate cake on a plate"],
    "salad": ["a green salad with cucumber and lettuce", "fresh salad in a glass bowl"],
}
PERFECT = {"soup": "a bowl of tomato soup", "cake": "a slice of chocolate cake on a plate",
           "salad": "a green salad with cucumber and lettuce"}
UNRELATED = {"soup": "zebras gallop quickly", "cake": "trains depart tonight", "salad": "engineers debug kernels"}


@pytest.fixture(scope="module")
def perfect():
    return score_captions(REFS, PERFECT)


def test_perfect_captions_score_full_marks(perfect):
    c = perfect.corpus
    assert c["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert c["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert c["ROUGE-L"] == pytest.approx(1.0)
    assert c["CIDEr"] > 1.0
    for image_id in PERFECT:
        assert perfect.per_image[image_id]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
        assert perfect.per_image[image_id]["CIDEr"] > 0
    if metrics.java_missing_reason() is None:
        assert perfect.tokenizer == "ptb"
        assert c["METEOR"] == pytest.approx(1.0, abs=1e-6)
    else:
        assert "METEOR" in perfect.skipped


def test_spice_runs_or_says_why_not(perfect):
    reason = metrics.spice_missing_reason()
    if reason is None and metrics.java_missing_reason() is None:
        assert "SPICE" in perfect.corpus or "SPICE" in perfect.skipped
    else:
        assert "SPICE" not in perfect.corpus
        assert "stanford-corenlp" in perfect.skipped["SPICE"] or "java" in perfect.skipped["SPICE"]


def test_unrelated_captions_score_near_zero():
    result = score_captions(REFS, UNRELATED, metrics=["BLEU", "ROUGE-L", "CIDEr"])
    assert result.corpus["BLEU-1"] < 1e-6
    assert result.corpus["BLEU-4"] < 1e-6
    assert result.corpus["ROUGE-L"] == 0.0
    assert result.corpus["CIDEr"] < 1e-6


def test_partial_match_bleu1_by_hand():
    # hypothesis "a bowl of rice" vs reference "a bowl of soup": 3 of 4 unigrams match, equal lengths (no brevity penalty)
    result = score_captions({1: ["a bowl of soup"], 2: ["two red apples"]}, {1: "a bowl of rice", 2: "two red apples"},
                            metrics=["BLEU"])
    assert result.per_image[1]["BLEU-1"] == pytest.approx(0.75, abs=1e-6)
    assert result.per_image[1]["BLEU-2"] == pytest.approx((0.75 * 2 / 3) ** 0.5, abs=1e-6)


@pytest.mark.skipif(metrics.java_missing_reason() is not None, reason="needs java for the PTB tokenizer")
def test_ptb_tokenizer_lowercases_and_drops_punctuation():
    assert ptb_tokenize(["A Bowl, of Soup.", "", "Don't eat -- it!"]) == ["a bowl of soup", "", "do n't eat it"]


def test_without_java_pure_python_metrics_still_run(monkeypatch):
    monkeypatch.setattr(metrics, "java_missing_reason", lambda: "no `java` on PATH")
    result = score_captions(REFS, PERFECT)
    assert result.tokenizer == "simple"
    assert set(result.skipped) >= {"METEOR", "SPICE", "PTB tokenizer"}
    assert "java" in result.skipped["METEOR"]
    assert result.corpus["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert result.corpus["CIDEr"] > 1.0
    assert simple_tokenize("A Bowl, of Soup's!") == "a bowl of soup's"


def test_a_failing_ptb_tokenizer_falls_back_and_says_why(monkeypatch):
    import subprocess

    def broken(texts):
        raise subprocess.CalledProcessError(1, ["java", "PTBTokenizer"])

    monkeypatch.setattr(metrics, "java_missing_reason", lambda: None)
    monkeypatch.setattr(metrics, "ptb_tokenize", broken)
    result = score_captions(REFS, PERFECT, metrics=["BLEU", "CIDEr"])
    assert result.tokenizer == "simple" and "PTB tokenizer failed" in result.skipped["PTB tokenizer"]
    assert result.corpus["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(subprocess.CalledProcessError):  # asked for PTB explicitly: no silent substitute
        score_captions(REFS, PERFECT, metrics=["BLEU"], tokenizer="ptb")


def test_missing_references_is_a_clear_error():
    with pytest.raises(ValueError, match="no reference captions"):
        score_captions({"a": ["x"]}, {"a": "x", "b": "y"}, metrics=["BLEU"])


def test_clipscore_follows_hessel_et_al():
    from foodcap.encoders import load_encoder

    encoder = load_encoder("tiny")
    captions = ["a bowl of soup", "a plate of limes"]
    # Images whose embeddings equal the prompted captions' text embeddings: cosine 1 -> CLIP-S = w = 2.5.
    images = encoder.encode_text([f"A photo depicts {c}" for c in captions])
    same = clip_scores(images, captions, encoder.encode_text, references=[[c] for c in captions])
    assert same["CLIPScore"] == pytest.approx([2.5, 2.5], abs=1e-4)
    # RefCLIP-S = harmonic mean of CLIP-S (2.5) and the best reference cosine (1.0).
    assert same["RefCLIPScore"] == pytest.approx([2 * 2.5 * 1 / 3.5] * 2, abs=1e-4)
    opposite = clip_scores(-images, captions, encoder.encode_text)
    assert opposite["CLIPScore"] == [0.0, 0.0]  # negative cosine is clipped at 0
    half = clip_scores(images, captions, encoder.encode_text, w=1.0)
    assert half["CLIPScore"] == pytest.approx([1.0, 1.0], abs=1e-4)
    with pytest.raises(ValueError, match="1 captions for 2"):
        clip_scores(images, captions[:1], encoder.encode_text)
    wrong_width = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="same CLIP model|do not match"):
        clip_scores(wrong_width, captions, encoder.encode_text)
