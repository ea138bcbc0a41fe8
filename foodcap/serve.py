"""The `foodcap serve` web app and HTTP API: a Gradio page and a `/caption` endpoint over one Captioner.

    foodcap serve --load_pt ./model_checkpoints/best            # http://127.0.0.1:7860
    python -c "from gradio_client import Client, handle_file; c = Client('http://127.0.0.1:7860/'); \
print(c.predict([handle_file('Images/inf1.jpg')], 'beam', 1.0, 0.9, 5, 1, 0, 30, api_name='/caption')[1])"

The page and the API run the same function: check the request (files, options), load and check each photo
in the request's own thread, then hand the photos to a `CaptionBatcher`, which decodes all requests that
arrive together in one batched call per set of decoding options. A bad request fails alone, with a
readable `gr.Error` (shown in the page; raised by `gradio_client`), and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls

from PIL import Image  # noqa: E402

from .serve_batching import CaptionBatcher  # noqa: E402

log = logging.getLogger(__name__)

MODES = ("beam", "greedy", "sampling")
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "Images"  # the repo's example photos, when present
EXAMPLE_SUFFIXES = (".jpg", ".jpeg")  # photos; Images/ also holds figures (PNG) that are not examples


@dataclass
class ServeConfig:
    """Limits and batching knobs; the CLI flags of `foodcap serve` map onto these."""

    max_batch_size: int = 16  # most images in one decoding call
    batch_wait_ms: float = 20.0  # how long a lone request waits for company before decoding
    max_upload_mb: float = 10.0  # per uploaded file, enforced by Gradio's upload route
    max_images_per_request: int = 16
    max_pixels: int = 40_000_000  # width x height, checked from the header before decoding the photo
    max_captions: int = 5  # num_return_sequences
    max_beams: int = 10
    max_new_tokens: int = 67  # upper bound of the length slider
    request_timeout_s: float = 300.0
    fast_jpeg: bool = True  # decode JPEGs at a reduced DCT scale keeping 2x CLIP's input (as extraction does)
    examples_dir: Optional[Path] = field(default_factory=lambda: EXAMPLES_DIR if EXAMPLES_DIR.is_dir() else None)


class RequestError(ValueError):
    """A caption request that cannot be served as sent; the message tells the user what to change."""


def decoding_options(mode: str, temperature: float, top_p: float, num_beams: int, num_captions: int,
                     seed: Optional[float], max_new_tokens: int, config: ServeConfig) -> dict:
    """UI/API values -> decoding kwargs (transformers GenerationConfig names), only those the mode uses,
    so that e.g. two greedy requests with different temperature sliders still batch together."""
    mode = str(mode or "").strip().lower()
    if mode not in MODES:
        raise RequestError(f"decoding mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
    num_captions = _whole(num_captions, "number of captions", 1, config.max_captions)
    max_new_tokens = _whole(max_new_tokens, "max new tokens", 1, config.max_new_tokens)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if mode == "greedy":
        if num_captions != 1:
            raise RequestError("greedy decoding gives exactly one caption per photo; ask for 1, "
                               "or use sampling or beam search for several")
        options.update(do_sample=False, num_beams=1)
    elif mode == "beam":
        num_beams = _whole(num_beams, "beam size", 1, config.max_beams)
        if num_captions > num_beams:
            raise RequestError(f"beam search with beam size {num_beams} can return at most {num_beams} "
                               f"captions, not {num_captions}; raise the beam size or ask for fewer")
        options.update(do_sample=False, num_beams=num_beams, num_return_sequences=num_captions)
    else:
        temperature = _number(temperature, "temperature", 0.01, 5.0)
        top_p = _number(top_p, "top-p", 0.01, 1.0)
        options.update(do_sample=True, temperature=temperature, top_p=top_p, num_return_sequences=num_captions,
                       seed=_whole(0 if seed is None else seed, "seed", 0, 2**31 - 1))
    return options


def _number(value: Any, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number between {low} and {high}, got {value!r}") from None
    if not low <= number <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {number:g}")
    return number


def _whole(value: Any, name: str, low: int, high: int) -> int:
    number = _number(value, name, low, high)
    if number != int(number):
        raise RequestError(f"{name} must be a whole number, got {number:g}")
    return int(number)


def _file_path(item: Any) -> str:
    """Gradio hands us paths; tolerate FileData-like dicts/objects from older clients."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    path = item.get("path") if isinstance(item, dict) else getattr(item, "path", None)
    if not path:
        raise RequestError(f"could not read the upload {item!r}; send image files")
    return path


def load_request_images(files: Any, config: ServeConfig,
                        min_side: Optional[int] = None) -> tuple[list[str], list[str], list[Image.Image]]:
    """Uploaded file paths -> (paths, display names, RGB images); RequestError names the bad file.

    min_side: JPEGs may decode at a reduced scale keeping both sides >= min_side (images.load_image)."""
    from .images import BadImageError, load_image

    if files is None or files == "":
        files = []
    if isinstance(files, (str, os.PathLike, dict)):
        files = [files]
    paths = [_file_path(item) for item in files]
    if not paths:
        raise RequestError("no photo in the request: upload one or more photos (JPEG, PNG, WebP), "
                           "or click an example")
    if len(paths) > config.max_images_per_request:
        raise RequestError(f"{len(paths)} photos in one request; this server takes at most "
                           f"{config.max_images_per_request}: send them in smaller groups")
    names, images = [], []
    for path in paths:
        name = Path(path).name
        try:
            # decompression bombs are refused from the header, before any pixel is decoded
            images.append(load_image(path, max_pixels=config.max_pixels, min_side=min_side))
        except BadImageError as error:
            raise RequestError(_bad_image_message(name, error, config)) from None
        names.append(name)
    return paths, names, images


def _bad_image_message(name: str, error, config: ServeConfig) -> str:
    advice = {"too large": f"this server takes photos of up to {config.max_pixels / 1e6:g} megapixels; "
                           "resize it and upload it again",
              "truncated": "the file is cut off; upload the complete photo",
              "empty": "the file has no data; upload the photo again"}
    detail = f" ({error.detail})" if error.detail and error.reason == "too large" else ""
    return f"{name}: {error.reason}{detail}; " + advice.get(error.reason, "upload a JPEG, PNG or WebP photo instead")


class CaptionService:
    """Checks requests and batches their decoding; knows nothing about Gradio (the app wraps it)."""

    def __init__(self, captioner, config: Optional[ServeConfig] = None,
                 caption_fn: Optional[Callable[..., list]] = None):
        self.captioner = captioner
        self.config = config or ServeConfig()
        if caption_fn is None:
            from .decoding import caption_images

            def caption_fn(images, **decoding):
                return caption_images(captioner, images, **decoding)

        self.batcher = CaptionBatcher(caption_fn, max_batch_size=self.config.max_batch_size,
                                      max_wait_s=self.config.batch_wait_ms / 1000.0)

    @property
    def stats(self):
        return self.batcher.stats

    def prepare(self, files: Any, mode: str, temperature: float, top_p: float, num_beams: int,
                num_captions: int, seed: Optional[float], max_new_tokens: int):
        """Everything that can fail per request, done in the request's thread (photos decoded in parallel)."""
        options = decoding_options(mode, temperature, top_p, num_beams, num_captions, seed, max_new_tokens,
                                   self.config)
        from .decoding import DecodingOptions

        try:  # decoding's own validation is the last word, so the batch never fails on one request's options
            DecodingOptions.from_kwargs(**options)
        except (TypeError, ValueError) as error:
            raise RequestError(str(error)) from None
        min_side = self.captioner.encoder.jpeg_min_side(self.config.fast_jpeg)
        paths, names, images = load_request_images(files, self.config, min_side)
        return paths, names, images, options

    async def caption(self, files: Any, mode: str = "beam", temperature: float = 1.0, top_p: float = 0.9,
                      num_beams: int = 5, num_captions: int = 1, seed: Optional[float] = 0,
                      max_new_tokens: int = 30) -> tuple[list[str], dict]:
        """One request -> (paths, {"results": [{"file", "captions"}], "decoding": options})."""
        paths, names, images, options = await asyncio.to_thread(
            self.prepare, files, mode, temperature, top_p, num_beams, num_captions, seed, max_new_tokens)
        future = self.batcher.submit(images, options)
        try:
            captions = await asyncio.wait_for(asyncio.wrap_future(future), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"captioning took longer than {self.config.request_timeout_s:g}s; "
                               "the server is overloaded, try again later") from None
        results = [{"file": name, "captions": caps} for name, caps in zip(names, captions)]
        return paths, {"results": results, "decoding": options}

    def close(self) -> None:
        self.batcher.close()


def caption_gallery(paths: Sequence[str], result: dict) -> list[tuple[str, str]]:
    """(photo, its captions) pairs for gr.Gallery: several captions are numbered."""
    gallery = []
    for path, item in zip(paths, result["results"]):
        captions = item["captions"]
        text = captions[0] if len(captions) == 1 else "  ".join(f"({i}) {c}" for i, c in enumerate(captions, 1))
        gallery.append((path, text))
    return gallery


def example_photos(config: ServeConfig) -> list[str]:
    if config.examples_dir is None or not Path(config.examples_dir).is_dir():
        return []
    return sorted(str(p) for p in Path(config.examples_dir).iterdir()
                  if p.suffix.lower() in EXAMPLE_SUFFIXES)


from .serve_app import ServeApp, create_app  # noqa: E402,F401  (the Gradio page lives next door)
