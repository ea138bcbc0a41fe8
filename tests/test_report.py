"""The HTML report: every image is referenced, thumbnails are embedded, worst CIDEr comes first; plots are PNGs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import IMAGES
from foodcap.report import ReportRow, architecture_figure, plot_histogram, plot_loss_curve, write_report


def _rows():
    photos = sorted(IMAGES.glob("*.jpg"))[:4]
    rows = [ReportRow(p.stem, str(p), [f"reference for {p.stem}", "another <reference>"], f"generated {p.stem}",
                      {"CIDEr": float(i), "BLEU-4": 0.1 * i}) for i, p in enumerate(reversed(photos))]
    rows.append(ReportRow("no-such-image", "/nonexistent/photo.jpg", ["a cake"], "a pie", {"CIDEr": 0.5}))
    return rows


def test_report_references_every_image_worst_first(tmp_path, artifacts_dir):
    rows = _rows()
    path = write_report(tmp_path / "report.html", title="toy evaluation", rows=rows,
                        metrics={"CIDEr": 1.25, "BLEU-4": 0.3}, skipped={"SPICE": "no CoreNLP jars"},
                        notes=["tiny random backbones were used"],
                        extra_tables=[("photos", [ReportRow("extra-photo", rows[0].image_path, [], "a photo caption")])])
    text = path.read_text()
    (artifacts_dir / "test_report.html").write_text(text)
    ids_in_order = re.findall(r"<tr data-image-id='([^']+)'>", text)
    expected_main = [r.image_id for r in sorted(rows, key=lambda r: r.scores["CIDEr"])]
    assert ids_in_order == expected_main + ["extra-photo"]
    readable = sum(1 for r in rows if r.image_path and not r.image_path.startswith("/nonexistent"))
    assert len(re.findall(r"<img class='thumb' src='data:image/jpeg;base64,", text)) == readable + 1
    assert "<i>no image</i>" in text  # the missing file is shown as such, not dropped
    assert "another &lt;reference&gt;" in text  # captions are escaped
    assert "no CoreNLP jars" in text and "tiny random backbones were used" in text
    assert "1.2500" in text


def test_plots_are_pngs(tmp_path):
    hist = plot_histogram([0.1, 0.5, 0.5, 2.0, float("nan")], tmp_path / "h.png", title="CIDEr", xlabel="CIDEr")
    loss = plot_loss_curve([(1, 5.0), (2, 4.0), (3, 3.5)], tmp_path / "loss.png", val=[(3, 3.9)])
    arch = architecture_figure(tmp_path / "arch.png")
    for path in (hist, loss, arch):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 200 and img.height > 100


def test_report_with_figures_embeds_them(tmp_path):
    fig = plot_loss_curve([(1, 2.0), (2, 1.0)], tmp_path / "loss.png")
    text = write_report(tmp_path / "r.html", title="t", rows=[], figures=[("loss curve", fig)]).read_text()
    assert text.count("data:image/png;base64,") == 1 and "loss curve" in text


def _tiny_store(image_paths, clip_model):
    from foodcap.encoders import load_encoder
    from foodcap.features import FeatureStore
    from foodcap.images import load_image

    encoder = load_encoder("tiny")
    embeddings = encoder.encode_images(torch.stack([encoder.preprocess(load_image(p)) for p in image_paths]))
    captions = [{"image_id": p.stem, "caption": f"{text} {p.stem}", "clip_embedding": i, "image_path": str(p)}
                for i, p in enumerate(image_paths) for text in ("a photo of", "food called")]
    return FeatureStore(embeddings, captions, {"clip_model": clip_model, "split": "test"})


def test_evaluation_files_reference_every_image(tmp_path, tiny_model_factory):
    from foodcap.captioner import Captioner
    from foodcap.evaluation import evaluate_captioner, group_references, write_evaluation
    from foodcap.language import load_tokenizer

    photos = sorted(IMAGES.glob("*.jpg"))[:5]
    store = _tiny_store(photos, "tiny")
    groups = group_references(store)
    assert [g.image_id for g in groups] == [p.stem for p in photos] and all(len(g.references) == 2 for g in groups)
    captioner = Captioner(tiny_model_factory("mlp"), load_tokenizer("tiny"))
    evaluation = evaluate_captioner(captioner, store, metrics=["BLEU", "CIDEr"], max_new_tokens=6)
    written = write_evaluation(evaluation, tmp_path, title="tiny")
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["num_images"] == 5 and set(payload["metrics"]) >= {"BLEU-4", "CIDEr", "CLIPScore", "RefCLIPScore"}
    html = Path(written["report_html"]).read_text()
    assert all(f"data-image-id='{p.stem}'" in html for p in photos)
    assert html.count("<img class='thumb'") == 5

    store.meta["clip_model"] = None
    captioner.clip_model = None
    no_clip = evaluate_captioner(captioner, store, metrics=["CIDEr"], max_images=2, max_new_tokens=4)
    assert len(no_clip.groups) == 2 and "does not name its CLIP model" in no_clip.skipped["CLIPScore"]


def test_damaged_store_is_named(tmp_path):
    from foodcap.evaluation import group_references

    store = _tiny_store(sorted(IMAGES.glob("*.jpg"))[:1], "tiny")
    store.captions[1]["clip_embedding"] = 7
    with pytest.raises(ValueError, match=r"captions\[1\].*clip_embedding 7"):
        group_references(store)


def test_best_constant_caption_by_hand():
    from foodcap.evaluation import best_constant_caption

    refs = {"a": ["a bowl of soup"], "b": ["a bowl of rice"], "c": ["a bowl of soup with bread"]}
    caption, cider = best_constant_caption(["a bowl of soup", "two red apples", "a bowl of soup"], refs, tokenizer="simple")
    assert caption == "a bowl of soup" and cider > 0
    with pytest.raises(ValueError, match="no candidate"):
        best_constant_caption(["  "], refs)


def test_images_folder_gives_thumbnails_to_stores_without_paths(tmp_path, tiny_model_factory):
    from foodcap.captioner import Captioner
    from foodcap.evaluation import evaluate_captioner, locate_images, write_evaluation
    from foodcap.language import load_tokenizer

    photos = sorted(IMAGES.glob("*.jpg"))[:3]
    store = _tiny_store(photos, "tiny")
    for entry in store.captions:  # a ClipCap .pkl records no image path
        entry.pop("image_path")
    captioner = Captioner(tiny_model_factory("mlp"), load_tokenizer("tiny"))
    bare = evaluate_captioner(captioner, store, metrics=["CIDEr"], clip_score=False, max_new_tokens=4)
    assert write_evaluation(bare, tmp_path / "bare")["report_html"]
    assert (tmp_path / "bare" / "report.html").read_text().count("<img class='thumb'") == 0
    found = evaluate_captioner(captioner, store, metrics=["CIDEr"], clip_score=False, max_new_tokens=4,
                               images_dir=IMAGES)
    assert [g.image_path for g in found.groups] == [str(p) for p in photos]
    write_evaluation(found, tmp_path / "found")
    assert (tmp_path / "found" / "report.html").read_text().count("<img class='thumb'") == 3
    with pytest.raises(ValueError, match="no_such_dir"):
        locate_images(found.groups, tmp_path / "no_such_dir")


def test_evaluate_cli_decoding_flags_and_images_folder(tmp_path, tiny_model_factory, capsys):
    from foodcap.checkpoint import save_checkpoint
    from foodcap.commands.evaluate import main
    from foodcap.features import save_features

    photos = sorted(IMAGES.glob("*.jpg"))[:3]
    store = _tiny_store(photos, "tiny")
    for entry in store.captions:
        entry.pop("image_path")
    data = save_features(store, tmp_path / "test.pkl")
    checkpoint = save_checkpoint(tiny_model_factory("mlp"), tmp_path / "ckpt")
    out = tmp_path / "eval"
    code = main(["--load_pt", str(checkpoint), "--data", str(data), "--out_dir", str(out), "--metrics", "BLEU,CIDEr",
                 "--no_clip_score", "--beam", "--beam_size", "3", "--temp", "0.5", "--max_length", "5",
                 "--no_repeat_ngram_size", "1", "--images", str(IMAGES)])
    assert code == 0, capsys.readouterr().err
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["decoding"]["num_beams"] == 3 and payload["decoding"]["temperature"] == 0.5
    assert payload["decoding"]["no_repeat_ngram_size"] == 1
    assert (out / "report.html").read_text().count("<img class='thumb'") == 3
    # bad decoding options are refused before the (here missing) checkpoint is opened
    assert main(["--load_pt", str(tmp_path / "nope"), "--data", str(data), "--beam", "--beam_size", "0"]) == 2
    assert "num_beams" in capsys.readouterr().err
    # a checkpoint that cannot be loaded is an input error, exit 2 as in predict, and the message names it
    assert main(["--load_pt", str(tmp_path / "nope"), "--data", str(data), "--out_dir", str(tmp_path / "e2")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "e2" / "metrics.json").exists()
