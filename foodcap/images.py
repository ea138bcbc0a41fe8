"""Image loading that never surprises: EXIF orientation applied, every mode converted to RGB, bad files named.

    python -c "from foodcap.images import load_image; print(load_image('Images/inf1.jpg').size)"

`load_image` raises `BadImageError` (a ValueError with `.path` and `.reason`) for the kinds of bad file a
scraped photo set holds: missing, empty (zero bytes), not an image, truncated, and too large
(decompression bombs are refused from the header, before any pixel is decoded). Batch jobs catch it,
skip the file and list it in their report. `find_image_dir` finds the folder a caption file's images live in.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# Same ceiling as Pillow's decompression-bomb warning (~89.5 Mpx, e.g. 9459 x 9459); a food photo is far below.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Transparent areas become white (a cut-out dish on a white plate), not the black `convert("RGB")` gives.
ALPHA_BACKGROUND = (255, 255, 255)

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image]

MISSING, EMPTY, NOT_AN_IMAGE, TRUNCATED, TOO_LARGE = "missing", "empty", "not an image", "truncated", "too large"


class BadImageError(ValueError):
    """An image that cannot be used; `.reason` is one of missing, empty, not an image, truncated, too large."""

    def __init__(self, path, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS, min_side: Optional[int] = None) -> Image.Image:
    """Open `source` (path, bytes, file object or PIL image) as an upright RGB PIL image, fully decoded.

    min_side: a JPEG may then be decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that keeps both sides at
    least `min_side` pixels; a 12 MP photo decodes ~3x faster. Other formats, and JPEGs too small to reduce,
    decode at full size. The pixel limit applies to the full size either way.
    """
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    label, stream = _open_stream(source)
    owned = not hasattr(source, "read")  # close what we opened, never the caller's stream
    try:
        try:
            with warnings.catch_warnings():  # the pixel limit is checked below, with a clearer message
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(stream)
        except UnidentifiedImageError as exc:
            raise BadImageError(label, NOT_AN_IMAGE, "the file is not in an image format Pillow can read") from exc
        except Image.DecompressionBombError as exc:
            raise BadImageError(label, TOO_LARGE, str(exc)) from exc
        except OSError as exc:  # a recognised format whose header is cut off
            raise BadImageError(label, TRUNCATED, str(exc)) from exc
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(label, TOO_LARGE, f"{width}x{height} pixels is over the {max_pixels} pixel limit")
        if min_side and image.format in ("JPEG", "MPO"):  # phone cameras often write MPO: JPEG + depth/preview
            image.draft(None, (min_side, min_side))  # scale only; the mode is converted by to_rgb as always
        try:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
        except (OSError, SyntaxError, ValueError) as exc:
            # Pillow reports a cut-off file as OSError("image file is truncated ...") or a broken stream.
            raise BadImageError(label, TRUNCATED, str(exc)) from exc
    finally:
        if owned:
            stream.close()


def _open_stream(source) -> tuple[str, BinaryIO]:
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadImageError("<bytes>", EMPTY, "no data")
        return "<bytes>", io.BytesIO(source)
    if hasattr(source, "read"):
        return getattr(source, "name", "<stream>"), source
    path = Path(source)
    if not path.exists():
        raise BadImageError(path, MISSING, "no such file")
    if not path.is_file():
        raise BadImageError(path, NOT_AN_IMAGE, "not a regular file")
    if path.stat().st_size == 0:
        raise BadImageError(path, EMPTY, "zero bytes")
    try:
        return str(path), open(path, "rb")
    except OSError as exc:
        raise BadImageError(path, MISSING, f"cannot be opened: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on white, 16-bit/float grayscale rescaled, CMYK/P/L converted."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow's own I/F -> RGB conversion clips at 255, turning a 16-bit photo almost white.
        pixels = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        gray = np.clip(pixels * (255.0 / peak), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


# ------------------------------------------------------------------------------------ where images live

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_image_dir(base: Path, names: list[str], match_stem: bool = False) -> Path:
    """The folder (base, images/, dataset/ or another sub-folder of base) holding most of the named images.

    With `match_stem`, `12.jpg` also matches `12.png` (the Kaggle caption file names every image `.jpg`)."""
    candidates = [base, base / "images", base / "dataset"]
    candidates += sorted(p for p in base.iterdir() if p.is_dir() and p not in candidates) if base.is_dir() else []
    names = list(dict.fromkeys(names))
    sample = names[:: max(1, len(names) // 200)][:200]
    best, best_hits = None, 0
    for folder in (c for c in candidates if c.is_dir()):
        stems = {os.path.splitext(e.name)[0] for e in os.scandir(folder)} if match_stem else set()
        hits = sum((folder / n).is_file() or Path(n).stem in stems for n in sample)
        if hits > best_hits:
            best, best_hits = folder, hits
    if best is None:
        # Reading captions alone (stats, token counts) needs no images; extraction reports them missing.
        log.warning("none of the images named in the caption file were found in %s, its images/ or dataset/ "
                    "sub-folders; pass the image folder with --image_dir", base)
        return base
    if best_hits < len(sample):
        log.warning("%d of %d sampled images are missing from %s; missing files will be skipped and reported",
                    len(sample) - best_hits, len(sample), best)
    return best


def resolve_suffixes(paths: list[str], root: Path) -> list[str]:
    """Each path as named, or the file in `root` with the same stem and another image suffix if only that exists."""
    if not root.is_dir():
        return list(paths)
    by_stem: dict[str, str] = {}
    for entry in os.scandir(root):
        stem, suffix = os.path.splitext(entry.name)
        if suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(stem, entry.name)
    present = set(by_stem.values())
    out = []
    for path in paths:
        p = Path(path)
        out.append(str(root / by_stem[p.stem]) if p.name not in present and p.stem in by_stem else path)
    return out
