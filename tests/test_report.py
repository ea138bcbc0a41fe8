"""The HTML report: every image is referenced, thumbnails are embedded, worst CIDEr comes first; plots are PNGs."""
from __future__ import annotations

import re

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
