"""HTML evaluation reports and their plots (per-image CIDEr histogram, loss curve).

The report is one self-contained file: thumbnails and figures are embedded as base64, so it can be
mailed or moved without its images. Rows are sorted worst CIDEr first: that is where to look.

    python -c "from foodcap.report import ReportRow, write_report; write_report('r.html', title='t', rows=[ReportRow('1', None, ['a cake'], 'a cake')])"
"""
from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .utils import write_atomic

log = logging.getLogger(__name__)

THUMBNAIL_PX = 160


@dataclass
class ReportRow:
    image_id: str
    image_path: Optional[str]  # shown as a thumbnail when it can be read
    references: list[str]
    generated: str
    scores: dict[str, float] = field(default_factory=dict)  # e.g. CIDEr, BLEU-4, CLIPScore of this image


def thumbnail_data_uri(path: str | os.PathLike | None, size: int = THUMBNAIL_PX) -> Optional[str]:
    """A small JPEG of the image as a data: URI, or None when the file is missing or unreadable."""
    if not path:
        return None
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        log.warning("no thumbnail for %s: %s", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_data_uri(path: str | os.PathLike) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _figure(figsize=(6, 3.5)):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=figsize)


def _save_png(fig, plt, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def plot_histogram(values: Sequence[float], path: str | os.PathLike, *, title: str, xlabel: str,
                   bins: int | Sequence[float] = 20) -> Path:
    """A histogram PNG of `values`."""
    plt, (fig, ax) = _figure()
    finite = [v for v in values if v is not None and math.isfinite(v)]
    ax.hist(finite, bins=bins, color="#d9822b", edgecolor="white")
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    return _save_png(fig, plt, path)


def plot_loss_curve(train: Sequence[tuple[float, float]], path: str | os.PathLike, *,
                    val: Sequence[tuple[float, float]] = (), title: str = "training loss") -> Path:
    """Loss against optimizer step: `train` and optional `val` are (step, loss) pairs."""
    plt, (fig, ax) = _figure()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#3b6ea8", lw=1.2, label="train")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="#c0392b", lw=1.5, label="validation")
    ax.set(title=title, xlabel="optimizer step", ylabel="cross-entropy per token")
    values = [loss for _, loss in [*train, *val] if loss > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")  # a model trained from scratch falls by orders of magnitude
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    return _save_png(fig, plt, path)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 6px 10px; vertical-align: top; text-align: left; }
th { background: #f4f1ec; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #fff6e0; border-left: 4px solid #e0a800; padding: 0.6em 1em; margin: 0.5em 0; }
.gen { font-weight: 600; }
ul.refs { margin: 0; padding-left: 1.1em; min-width: 16em; }
span.gen { display: inline-block; min-width: 14em; }
img.thumb { max-width: 160px; max-height: 160px; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; }
"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    return html.escape(str(value))


def write_report(path: str | os.PathLike, *, title: str, rows: Sequence[ReportRow], metrics: Optional[dict] = None,
                 skipped: Optional[dict[str, str]] = None, notes: Sequence[str] = (),
                 figures: Sequence[tuple[str, str | os.PathLike]] = (), extra_tables: Sequence[tuple[str, Sequence[ReportRow]]] = (),
                 sort_key: str = "CIDEr") -> Path:
    """Write the HTML report: notes, corpus metrics, figures, then one row per image, worst `sort_key` first.

    `extra_tables` are (heading, rows) shown after the main table in their given order (e.g. captions of
    photos that have no references).
    """
    out: list[str] = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                      f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    out += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    if metrics:
        out.append("<h2>Scores</h2><table><tr><th>metric</th><th>value</th></tr>")
        out += [f"<tr><td>{html.escape(k)}</td><td class='num'>{_fmt(v)}</td></tr>" for k, v in metrics.items()]
        out.append("</table>")
    if skipped:
        out.append("<h3>Not computed</h3><ul>")
        out += [f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in skipped.items()]
        out.append("</ul>")
    if figures:
        out.append("<h2>Figures</h2>")
        for caption, fig_path in figures:
            out.append(f"<figure><img src='{png_data_uri(fig_path)}' alt='{html.escape(caption)}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if rows:
        ordered = sorted(rows, key=lambda r: (_sort_value(r, sort_key), r.image_id))
        out.append(f"<h2>Per image ({len(rows)}; worst {html.escape(sort_key)} first)</h2>")
        out.append(_table(ordered))
    for heading, table_rows in extra_tables:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        out.append(_table(list(table_rows)))
    out.append("</body></html>")
    written = write_atomic(path, "\n".join(out))
    log.info("report written to %s", written)
    return written


def _sort_value(row: ReportRow, key: str) -> float:
    value = row.scores.get(key)
    return value if value is not None and math.isfinite(value) else math.inf


def _table(rows: Sequence[ReportRow]) -> str:
    score_names: list[str] = []
    for r in rows:
        score_names += [k for k in r.scores if k not in score_names]
    has_refs = any(r.references for r in rows)
    head = "<tr><th>image</th><th>id</th>" + ("<th>references</th>" if has_refs else "") + "<th>generated</th>"
    head += "".join(f"<th>{html.escape(k)}</th>" for k in score_names) + "</tr>"
    body = [f"<table>{head}"]
    for r in rows:
        uri = thumbnail_data_uri(r.image_path)
        img = f"<img class='thumb' src='{uri}' alt='{html.escape(r.image_id)}'>" if uri else "<i>no image</i>"
        refs = "<ul class='refs'>" + "".join(f"<li>{html.escape(c)}</li>" for c in r.references) + "</ul>"
        cells = [img, f"<code>{html.escape(r.image_id)}</code>"] + ([refs] if has_refs else [])
        cells.append(f"<span class='gen'>{html.escape(r.generated)}</span>")
        tds = "".join(f"<td>{c}</td>" for c in cells)
        tds += "".join(f"<td class='num'>{_fmt(r.scores.get(k, float('nan')))}</td>" for k in score_names)
        body.append(f"<tr data-image-id='{html.escape(r.image_id, quote=True)}'>{tds}</tr>")
    body.append("</table>")
    return "\n".join(body)


def architecture_figure(path: str | os.PathLike) -> Path:
    """The ClipCap pipeline as a block diagram (README's Images/modelarchitecture.png).

        python -c "from foodcap.report import architecture_figure as a; a('Images/modelarchitecture.png')"
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    plt, (fig, ax) = _figure(figsize=(11, 3.4))
    ax.set(xlim=(0, 11), ylim=(0, 3.4))
    ax.axis("off")
    blocks = [  # (x, label, detail, colour); frozen parts are grey-blue, the trained mapper orange
        (0.15, "food photo", "RGB image", "#f4f1ec"),
        (2.05, "CLIP image\nencoder", "frozen\n(RN50x4: 640-d)", "#d6e4f0"),
        (3.95, "mapping\nnetwork", "trained: MLP or\n8-layer transformer", "#f7c78c"),
        (5.85, "prefix", "P embeddings\n(P × 768)", "#fbe3c4"),
        (7.75, "GPT-2", "frozen (--only_prefix)\nor fine-tuned", "#d6e4f0"),
    ]
    for x, label, detail, colour in blocks:
        ax.add_patch(FancyBboxPatch((x, 1.2), 1.5, 1.3, boxstyle="round,pad=0.05", fc=colour, ec="#555"))
        ax.text(x + 0.75, 1.95, label, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x + 0.75, 0.85, detail, ha="center", va="top", fontsize=8.5, color="#444")
    for x, _, _, _ in blocks[:-1]:
        ax.add_patch(FancyArrowPatch((x + 1.6, 1.85), (x + 1.95, 1.85), arrowstyle="-|>", mutation_scale=16, color="#333"))
    ax.add_patch(FancyArrowPatch((9.35, 1.85), (9.7, 1.85), arrowstyle="-|>", mutation_scale=16, color="#333"))
    ax.text(9.75, 1.85, "“a bowl of\nsoup with\nnoodles”", ha="left", va="center", fontsize=10.5, style="italic")
    ax.text(0.15, 3.05, "ClipCap: a CLIP embedding becomes a GPT-2 prefix; GPT-2 continues it into a caption",
            fontsize=12, weight="bold")
    return _save_png(fig, plt, path)
