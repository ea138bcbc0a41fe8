"""`foodcap demo` end to end (one shared run), and `foodcap evaluate` / the --eval_every hook on its outputs.

The learning assertion is recomputed here from the demo's captions with pycocoevalcap's CIDEr directly:
held-out CIDEr must be at least twice that of the best constant caption.
"""
from __future__ import annotations

import csv
import json
import os
import re

import pytest
from PIL import Image
from pycocoevalcap.cider.cider import Cider

pytestmark = pytest.mark.slow
PHOTOS = ("inf1.jpg", "inf2.jpg", "inf3.jpg", "inf4.jpg", "scone.jpg", "scone2.jpg")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the demo as shipped (default settings) from a folder that holds nothing of the repository."""
    from foodcap.commands.demo import main

    work = tmp_path_factory.mktemp("anywhere")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["--out_dir", "demo_out"]) == 0
    finally:
        os.chdir(cwd)
    out = work / "demo_out"
    return out, json.loads((out / "metrics.json").read_text())


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z]+", text.lower()))


def _cider(references: dict[str, list[str]], candidates: dict[str, str]) -> float:
    gts = {k: [_words(r) for r in refs] for k, refs in references.items()}
    res = {k: [_words(candidates[k])] for k in references}
    return Cider().compute_score(gts, res)[0]


def test_demo_model_learns_from_image_content(demo):
    out, metrics = demo
    images = metrics["images"]
    assert len(images) == 72  # 18 (food, container) pairs x 4 held-out pictures
    references = {im["image_id"]: im["references"] for im in images}
    model_cider = _cider(references, {im["image_id"]: im["generated"] for im in images})
    assert model_cider == pytest.approx(metrics["metrics"]["CIDEr"], rel=1e-3)

    with (out / "data" / "captions.csv").open(newline="") as fh:
        train_rows = [row for row in csv.DictReader(fh) if row["split"] == "train"]
    train_captions = {row["caption"] for row in train_rows}
    held_out_files = {os.path.basename(im["image_path"]) for im in images}
    assert len(held_out_files) == 72 and not held_out_files & {os.path.basename(r["file_name"]) for r in train_rows}
    constant = max(_cider(references, {k: caption for k in references}) for caption in train_captions)
    assert constant > 0
    assert model_cider >= 2 * constant, (model_cider, constant)
    assert metrics["demo"]["best_constant_cider"] == pytest.approx(constant, rel=1e-3)


def test_demo_writes_report_loss_curve_and_photo_captions(demo):
    out, metrics = demo
    html = (out / "report.html").read_text()
    for im in metrics["images"]:
        assert f"data-image-id='{im['image_id']}'" in html
    for photo in PHOTOS:
        assert f"data-image-id='{photo}'" in html
    assert "Tiny random-weight backbones were used" in html and "--clip_model_type ViT-B/32 --gpt2 gpt2" in html
    photos = metrics["demo"]["photos"]
    assert [p["image"] for p in photos] == list(PHOTOS) and all(p["caption"].strip() for p in photos)
    with Image.open(out / "loss_curve.png") as img:
        assert img.format == "PNG"
    ids = re.findall(r"<tr data-image-id='([^']+)'>", html)[:len(metrics["images"])]
    cider_of = {im["image_id"]: im["scores"]["CIDEr"] for im in metrics["images"]}
    assert [cider_of[i] for i in ids] == sorted(cider_of[i] for i in ids)  # worst first
    for name in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIPScore", "RefCLIPScore"):
        assert name in metrics["metrics"] or name in metrics["skipped"]


def test_evaluate_cli_on_the_demo_checkpoint(demo, tmp_path, capsys):
    from foodcap.commands.evaluate import main

    out, metrics = demo
    rc = main(["--load_pt", str(out / "checkpoints" / "best.pt"), "--data", str(out / "features" / "synthetic_test.pkl"),
               "--out_dir", str(tmp_path), "--metrics", "BLEU,CIDEr", "--device", "cpu"])
    assert rc == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["metrics"]["CIDEr"] == pytest.approx(metrics["metrics"]["CIDEr"], rel=1e-6)  # same greedy captions
    assert 0 <= result["metrics"]["CLIPScore"] <= 2.5
    assert "METEOR" not in result["metrics"]
    html = (tmp_path / "report.html").read_text()
    assert all(f"data-image-id='{im['image_id']}'" in html for im in result["images"])
    assert "CIDEr" in capsys.readouterr().out
    assert main(["--load_pt", str(tmp_path / "missing"), "--data", str(out / "features" / "synthetic_test.pkl"),
                 "--out_dir", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_every_records_validation_cider(demo, tmp_path):
    from foodcap.commands.train import main

    out, _ = demo
    rc = main(["--data", str(out / "features" / "synthetic_train.pkl"), "--out_dir", str(tmp_path), "--gpt2", "tiny",
               "--init_from", str(out / "checkpoints" / "best"), "--max_steps", "4", "--eval_every", "2", "--bs", "16",
               "--epochs", "1", "--lr", "1e-4", "--warmup_steps", "0", "--cpu"])
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    cider = [r["val_cider"] for r in records if "val_cider" in r]
    assert len(cider) >= 2 and all(c > 1.0 for c in cider)  # starts from the trained demo model
