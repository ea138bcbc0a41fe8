"""Caption-dataset readers: every supported layout becomes one list of `CaptionRecord`s.

    python -c "from foodcap.datasets import read_dataset; d = read_dataset('tests/data/Captions.csv'); print(d)"

Formats (detected from the path, or forced with `format=` / `--format`):

  kaggle       the Kaggle food set: `Captions.csv` with header `,Index,Captions`, images `{Index}.jpg`
  table        any CSV / TSV / JSONL with an image column and a caption column (`image_column`/`caption_column`)
  coco         COCO captions JSON: `images[]` (id, file_name) + `annotations[]` (image_id, caption)
  karpathy     Karpathy split JSON: `images[]` with filename (+ filepath), `sentences[].raw`, `split` (kept)
  imagefolder  Hugging Face imagefolder: `metadata.jsonl` / `metadata.csv` with `file_name` and `text`
               (split sub-folders train/ validation/ test/ become splits)
  txt          a folder of images, each with a same-named `.txt` file holding one caption per line

`path` is the caption file or the folder holding it. Images are looked up in `image_dir` when given, else
beside the caption file, in its `images/` or `dataset/` sub-folder, or another sub-folder (e.g. COCO's
`val2014/`): the folder where most of the named images exist wins. Captions have their whitespace collapsed
(the food CSV has quoted multi-line captions); empty ones are dropped and counted.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from .images import IMAGE_SUFFIXES, find_image_dir, resolve_suffixes

log = logging.getLogger(__name__)

FORMATS = ("kaggle", "table", "coco", "karpathy", "imagefolder", "txt")
IMAGE_COLUMNS = ("image", "file_name", "filename", "image_path", "image_file", "path", "img", "file")
CAPTION_COLUMNS = ("caption", "text", "captions", "sentence", "description", "raw")
SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test"}


class DatasetError(ValueError):
    """A caption file that cannot be read as asked; the message says which file and what to pass."""


@dataclass(frozen=True)
class CaptionRecord:
    image_path: str
    caption: str
    image_id: Any  # int for Kaggle/COCO/Karpathy, else the image's relative path
    split: Optional[str] = None


@dataclass
class Dataset:
    records: list[CaptionRecord]
    format: str
    caption_file: Path
    image_dir: Path
    counts: dict = field(default_factory=dict)  # rows read, empty captions dropped

    def __repr__(self) -> str:
        return (f"Dataset({self.format}: {len(self.records)} captions of {len({r.image_path for r in self.records})} "
                f"images from {self.caption_file}, images in {self.image_dir}, {self.counts})")


def clean_caption(text: Any) -> str:
    if text is None or (isinstance(text, float) and text != text):  # None / NaN
        return ""
    return " ".join(str(text).split())


def read_dataset(path: str | os.PathLike, format: Optional[str] = None, image_dir: Optional[str | os.PathLike] = None,
                 image_column: Optional[str] = None, caption_column: Optional[str] = None) -> Dataset:
    """Read any supported caption dataset (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such caption file or folder (--data_path)")
    fmt, caption_file = (format, _caption_file(path, format)) if format else detect_format(path)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    reader = {"kaggle": _read_kaggle, "table": _read_table, "coco": _read_coco, "karpathy": _read_karpathy,
              "imagefolder": _read_imagefolder, "txt": _read_txt}[fmt]
    rows = reader(caption_file, image_column=image_column, caption_column=caption_column)  # (relative image, caption, id, split)
    base = caption_file if caption_file.is_dir() else caption_file.parent
    names = [r[0] for r in rows if r[0]]
    root = Path(image_dir).expanduser() if image_dir else base if fmt in ("imagefolder", "txt") else \
        find_image_dir(base, names, match_stem=fmt == "kaggle")
    records, empty, no_image = [], 0, 0
    for rel, caption, image_id, split in rows:
        if rel is None:
            no_image += 1
            continue
        caption = clean_caption(caption)
        if not caption:
            empty += 1
            continue
        records.append(CaptionRecord(str(root / rel), caption, image_id, split))
    if fmt == "kaggle":  # `{Index}.jpg` as named, or the same stem with the suffix that exists
        found = resolve_suffixes([r.image_path for r in records], root)
        records = [CaptionRecord(p, r.caption, r.image_id, r.split) for p, r in zip(found, records)]
    counts = {"rows": len(rows), "empty": empty}
    if no_image:
        log.warning("%s: %d caption rows name no (known) image; skipped", caption_file, no_image)
        counts["no_image"] = no_image
    dataset = Dataset(records, fmt, caption_file, root, counts)
    log.info("%s", dataset)
    return dataset


def detect_format(path: Path) -> tuple[str, Path]:
    """(format, caption file or folder) for `path`, looking inside a folder for a known caption file."""
    if path.is_dir():
        for name in ("Captions.csv", "captions.csv"):
            if (path / name).is_file() and _is_kaggle_csv(path / name):
                return "kaggle", path / name
        if _metadata_files(path):
            return "imagefolder", path
        candidates = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".csv", ".tsv", ".jsonl"))
        if len(candidates) == 1:
            return detect_format(candidates[0])
        if any(p.suffix.lower() == ".txt" for p in path.iterdir()):
            return "txt", path
        raise DatasetError(f"{path}: cannot tell which caption file to read (found {[p.name for p in candidates]}); "
                           "pass the caption file itself as --data_path, or --format")
    suffix = path.suffix.lower()
    if suffix == ".csv" and _is_kaggle_csv(path):
        return "kaggle", path
    if path.name in ("metadata.jsonl", "metadata.csv"):
        return "imagefolder", path.parent
    if suffix in (".csv", ".tsv", ".jsonl"):
        return "table", path
    if suffix == ".json":
        data = _load_json(path)
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            return "coco", path
        if isinstance(data, dict) and data.get("images") and "sentences" in data["images"][0]:
            return "karpathy", path
        raise DatasetError(f"{path}: JSON is neither COCO captions (images + annotations) nor a Karpathy split "
                           "(images[].sentences); for JSON lines use a .jsonl file")
    raise DatasetError(f"{path}: unsupported caption file type {suffix!r}; use --format ({', '.join(FORMATS)})")


def _caption_file(path: Path, fmt: str) -> Path:
    if fmt in ("imagefolder", "txt"):
        return path if path.is_dir() else path.parent
    if path.is_dir():
        found = detect_format(path)[1]
        return found
    return path


def _is_kaggle_csv(path: Path) -> bool:
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return "Index" in header and "Captions" in header


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON ({exc})") from exc


# ------------------------------------------------------------------------------------------------ readers
# Each returns rows (image path relative to the image folder, raw caption, image id, split or None).

def _read_kaggle(path: Path, **_):
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [(f"{_as_id(row['Index'])}.jpg", row.get("Captions"), _as_id(row["Index"]), None)
                for row in csv.DictReader(f)]


def _read_table(path: Path, image_column=None, caption_column=None, **_):
    rows = list(_table_rows(path))
    columns = list(rows[0].keys()) if rows else []
    image_key = _pick_column(path, columns, image_column, IMAGE_COLUMNS, "--image_column")
    caption_key = _pick_column(path, columns, caption_column, CAPTION_COLUMNS, "--caption_column")
    split_key = "split" if "split" in columns else None
    out = []
    for row in rows:
        image = row.get(image_key)
        image = None if image in (None, "") else str(image)  # counted and skipped by read_dataset
        split = SPLIT_NAMES.get(str(row.get(split_key)).lower()) if split_key else None
        out.append((image, row.get(caption_key), image, split))
    return out


def _table_rows(path: Path) -> Iterable[dict]:
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DatasetError(f"{path}: line {n} is not valid JSON ({exc})") from exc
        return
    with open(path, newline="", encoding="utf-8-sig") as f:
        yield from csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")


def _pick_column(path: Path, columns: list[str], asked: Optional[str], guesses, flag: str) -> str:
    if asked:
        if asked not in columns:
            raise DatasetError(f"{path}: no column {asked!r} ({flag}); columns are {columns}")
        return asked
    lowered = {c.lower(): c for c in columns}
    for guess in guesses:
        if guess in lowered:
            return lowered[guess]
    raise DatasetError(f"{path}: cannot tell which column to use; columns are {columns}; pass {flag}")


def _read_coco(path: Path, **_):
    data = _load_json(path)
    files = {img["id"]: img["file_name"] for img in data.get("images", [])}
    out = []
    for ann in data.get("annotations", []):  # an image_id missing from images[] is counted and skipped
        out.append((files.get(ann.get("image_id")), ann.get("caption"), ann.get("image_id"), None))
    return out


def _read_karpathy(path: Path, **_):
    out = []
    for img in _load_json(path)["images"]:
        rel = str(Path(img.get("filepath", "")) / img["filename"])
        image_id = img.get("cocoid", img.get("imgid", img["filename"]))
        split = SPLIT_NAMES.get(str(img.get("split", "")).lower())
        out.extend((rel, s.get("raw"), image_id, split) for s in img.get("sentences", []))
    return out


def _metadata_files(root: Path) -> list[tuple[Path, Optional[str]]]:
    """(metadata file, split) pairs at the top of `root` or in its split sub-folders."""
    found = []
    for folder, split in [(root, None)] + [(root / d, SPLIT_NAMES[d]) for d in SPLIT_NAMES if (root / d).is_dir()]:
        for name in ("metadata.jsonl", "metadata.csv"):
            if (folder / name).is_file():
                found.append((folder / name, split))
                break
    return found


def _read_imagefolder(root: Path, caption_column=None, **_):
    out = []
    for meta, split in _metadata_files(root):
        rows = list(_table_rows(meta))
        columns = list(rows[0].keys()) if rows else []
        text_key = _pick_column(meta, columns, caption_column, ("text",) + CAPTION_COLUMNS, "--caption_column")
        _pick_column(meta, columns, "file_name", (), "file_name")
        prefix = meta.parent.relative_to(root)
        for row in rows:
            rel = str(prefix / row["file_name"])
            out.append((rel, row.get(text_key), rel, split))
    if not out:
        raise DatasetError(f"{root}: no metadata.jsonl / metadata.csv with file_name and text")
    return out


def _read_txt(root: Path, **_):
    out = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        text = image.with_suffix(".txt")
        if text.is_file():
            rel = str(image.relative_to(root))
            out.extend((rel, line, rel, None) for line in text.read_text(encoding="utf-8").splitlines())
    if not out:
        raise DatasetError(f"{root}: no images with same-named .txt caption files")
    return out


def _as_id(value: str):
    value = str(value).strip()
    try:
        return int(float(value)) if value.replace(".", "", 1).isdigit() else value
    except ValueError:
        return value
