"""`foodcap stats`: caption reading from every supported file kind, GPT-2 token lengths, the PNGs."""
from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from conftest import FOOD_CAPTIONS
from foodcap.commands.stats import main
from foodcap.stats import CaptionFileError, read_captions, token_lengths


def test_reads_the_kaggle_caption_file():
    with FOOD_CAPTIONS.open(newline="") as fh:
        expected = [r["Captions"].strip() for r in csv.DictReader(fh) if r["Captions"].strip()]
    assert read_captions(FOOD_CAPTIONS) == expected


def test_reads_txt_json_and_coco(tmp_path):
    (tmp_path / "c.txt").write_text("a bowl of soup\n\nTwo apples\n")
    (tmp_path / "c.json").write_text(json.dumps(["a cake", {"caption": "a pie"}]))
    (tmp_path / "coco.json").write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": "a tart"}]}))
    assert read_captions(tmp_path / "c.txt") == ["a bowl of soup", "Two apples"]
    assert read_captions(tmp_path / "c.json") == ["a cake", "a pie"]
    assert read_captions(tmp_path / "coco.json") == ["a tart"]


def test_bad_caption_files_name_the_problem(tmp_path):
    (tmp_path / "bad.csv").write_text("file,label\nx.jpg,1\n")
    with pytest.raises(CaptionFileError, match="no caption column"):
        read_captions(tmp_path / "bad.csv")
    with pytest.raises(CaptionFileError, match="does not exist"):
        read_captions(tmp_path / "missing.csv")


def test_token_lengths_are_gpt2_tokens():
    # GPT-2 BPE: "a", " bowl", " of", " soup" / "Spaghetti" is split into several pieces
    lengths = token_lengths(["a bowl of soup", "Spaghetti"])
    assert lengths[0] == 4 and lengths[1] > 1


def test_cli_writes_histogram_and_word_cloud(tmp_path, capsys):
    assert main(["--data", str(FOOD_CAPTIONS), "--out_dir", str(tmp_path)]) == 0
    for name in ("caption_lengths.png", "wordcloud.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.width >= 400
    summary = json.loads((tmp_path / "stats.json").read_text())
    assert summary["captions"] == len(read_captions(FOOD_CAPTIONS))
    assert summary["tokens_min"] <= summary["tokens_median"] <= summary["tokens_max"]
    assert "captions" in capsys.readouterr().out
    assert main(["--data", str(tmp_path / "nope.csv"), "--out_dir", str(tmp_path)]) == 2


def test_reads_a_feature_store(tmp_path):
    import torch

    from foodcap.features import FeatureStore, save_features

    store = FeatureStore(torch.zeros(2, 4), [{"image_id": 1, "caption": "a cake", "clip_embedding": 0},
                                             {"image_id": 2, "caption": "two pies", "clip_embedding": 1}], {})
    assert read_captions(save_features(store, tmp_path / "s_train.pkl")) == ["a cake", "two pies"]
    assert read_captions(save_features(store, tmp_path / "s_train.safetensors")) == ["a cake", "two pies"]
