"""Dataset statistics: caption-length histogram (in GPT-2 tokens) and a word cloud, as PNGs.

    foodcap stats --data tests/data/Captions.csv --out_dir stats/

`--data` is a caption file (CSV/TSV with a caption column such as the Kaggle food file's `Captions`,
a .txt with one caption per line, COCO-style .json) or a feature store (anything load_features reads).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import statistics
from pathlib import Path
from typing import Sequence

from .report import plot_histogram
from .utils import write_atomic

log = logging.getLogger(__name__)

CAPTION_COLUMNS = ("caption", "captions", "text", "description")
TEXT_SUFFIXES = {".csv", ".tsv", ".txt", ".json"}


class CaptionFileError(ValueError):
    """A caption file that cannot be read, naming the file and what was expected."""


def read_captions(path: str | os.PathLike) -> list[str]:
    """All caption strings of a caption file or a feature store (empty captions dropped)."""
    path = Path(path)
    if not path.exists():
        raise CaptionFileError(f"{path} does not exist: pass a caption file (.csv/.tsv/.txt/.json) or a feature store")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        captions = _read_table(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".txt":
        captions = path.read_text(encoding="utf-8", errors="replace").splitlines()
    elif suffix == ".json":
        captions = _read_json(path)
    else:
        from .features import load_features

        captions = [c.get("caption", "") for c in load_features(path).captions]
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise CaptionFileError(f"{path}: no captions found")
    return captions


def _read_table(path: Path, delimiter: str) -> list[str]:
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        fields = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
        column = next((fields[c] for c in CAPTION_COLUMNS if c in fields), None)
        if column is None:
            raise CaptionFileError(f"{path}: no caption column; expected one of {list(CAPTION_COLUMNS)} "
                                   f"(case-insensitive), found {reader.fieldnames}")
        return [row.get(column) or "" for row in reader]


def _read_json(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CaptionFileError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]  # COCO captions
    if isinstance(data, list):
        return [d if isinstance(d, str) else (d.get("caption") or "") if isinstance(d, dict) else "" for d in data]
    raise CaptionFileError(f"{path}: expected a list of captions / of {{'caption': ...}} or a COCO file with 'annotations'")


def token_lengths(captions: Sequence[str]) -> list[int]:
    """Caption lengths in GPT-2 BPE tokens (what training pads and truncates)."""
    from .language import TINY_GPT2, load_tokenizer

    tokenizer = load_tokenizer(TINY_GPT2)  # every GPT-2 size shares this vocabulary; this copy is always offline
    return [len(ids) for ids in tokenizer(list(captions))["input_ids"]]


def word_cloud_png(captions: Sequence[str], path: str | os.PathLike, *, width: int = 1000, height: int = 500,
                   seed: int = 0) -> Path:
    """A word cloud of the captions (English stop words removed), written atomically as PNG."""
    from wordcloud import STOPWORDS, WordCloud

    cloud = WordCloud(width=width, height=height, background_color="white", stopwords=set(STOPWORDS),
                      colormap="Dark2", random_state=seed, collocations=False, max_words=150)
    image = cloud.generate(" ".join(captions)).to_image()
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return write_atomic(path, buf.getvalue())


def dataset_stats(data: str | os.PathLike, out_dir: str | os.PathLike, *, name: str = "") -> dict:
    """Write `caption_lengths.png`, `wordcloud.png` and `stats.json` into out_dir; returns the summary."""
    captions = read_captions(data)
    out = Path(out_dir)
    lengths = token_lengths(captions)
    label = name or Path(data).name
    step = max(1, -(-max(lengths) // 60))  # at most ~60 bars
    hist = plot_histogram(lengths, out / "caption_lengths.png", title=f"caption length: {label}",
                          xlabel="GPT-2 tokens per caption", bins=range(0, max(lengths) + step + 1, step))
    cloud = word_cloud_png(captions, out / "wordcloud.png")
    summary = {"data": str(data), "captions": len(captions), "tokens_mean": statistics.fmean(lengths),
               "tokens_std": statistics.pstdev(lengths), "tokens_min": min(lengths), "tokens_max": max(lengths),
               "tokens_median": statistics.median(lengths), "histogram": str(hist), "wordcloud": str(cloud)}
    write_atomic(out / "stats.json", json.dumps(summary, indent=2))
    return summary
