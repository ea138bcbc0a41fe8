"""CLIP image encoders by name, all built through open_clip, with their preprocessing.

    python -c "from foodcap.encoders import load_encoder; e = load_encoder('tiny'); print(e.embed_dim, e.preprocess_config)"

Names understood by `load_encoder` (and `--clip_model_type`):

* OpenAI names as the `clip` package spells them: RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B/32,
  ViT-B/16, ViT-L/14, ViT-L/14@336px. They map to open_clip's QuickGELU architectures with
  `pretrained="openai"` (the same weights). Offline, the `clip` package's cache (`~/.cache/clip/RN50x4.pt`,
  where ClipCap users already have them) is used when present; it is read without running its TorchScript.
* Any open_clip pair `model:pretrained`, e.g. `ViT-B-32:laion2b_s34b_b79k`; `hf-hub:org/repo` and
  `local-dir:/path` work as in open_clip.
* A local weights file: `model:/path/to/weights.pt` (or `.safetensors`, `.bin`), where `model` is an OpenAI
  name or an open_clip architecture, e.g. `RN50x4:~/.cache/clip/RN50x4.pt` or
  `ViT-B-32:./open_clip_model.safetensors`. OpenAI TorchScript archives, plain state dicts and open_clip
  checkpoints are all accepted; nothing in the file is executed (torch.load(weights_only=True), safetensors,
  or a tensors-only reader for TorchScript archives).
* `tiny`: a small random-weight CLIP (ViT 64 px, patch 16, width 64, 2 layers; text width 64, 2 layers;
  64-d embeddings) built from a fixed seed, so every process builds the same weights. For offline tests.
  `tiny:/path/weights.pt` is the tiny architecture with weights from a file.
* `random:<architecture>`, e.g. `random:RN50x4`: the real architecture with seeded random weights (benchmarks).

Embeddings are returned unnormalised, as ClipCap stored them. By default the model runs in fp16 on CUDA and
in fp32 elsewhere; `precision=` picks fp32, bf16, fp16 or auto (see foodcap/encoder_tuning.py). The BatchNorms
of ResNet towers are folded into their convolutions when the encoder is built (same function, less work).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .encoder_tuning import autocast_dtype
from .safe_pickle import UnsafePickleError, read_state_dict
from .utils import resolve_device

log = logging.getLogger(__name__)

TINY = "tiny"
RANDOM_PREFIX = "random:"
SEED = 1234  # seeds `tiny` and `random:*`; changing it changes every tiny feature store and checkpoint
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# OpenAI `clip` name -> (open_clip architecture, embedding width, file name in the `clip` package cache)
OPENAI_MODELS = {
    "RN50": ("RN50-quickgelu", 1024, "RN50.pt"),
    "RN101": ("RN101-quickgelu", 512, "RN101.pt"),
    "RN50x4": ("RN50x4-quickgelu", 640, "RN50x4.pt"),
    "RN50x16": ("RN50x16-quickgelu", 768, "RN50x16.pt"),
    "RN50x64": ("RN50x64-quickgelu", 1024, "RN50x64.pt"),
    "ViT-B/32": ("ViT-B-32-quickgelu", 512, "ViT-B-32.pt"),
    "ViT-B/16": ("ViT-B-16-quickgelu", 512, "ViT-B-16.pt"),
    "ViT-L/14": ("ViT-L-14-quickgelu", 768, "ViT-L-14.pt"),
    "ViT-L/14@336px": ("ViT-L-14-336-quickgelu", 768, "ViT-L-14-336px.pt"),
}
TINY_EMBED_DIM = 64
TINY_CONFIG = dict(
    embed_dim=TINY_EMBED_DIM,
    vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)


class EncoderLoadError(RuntimeError):
    """The encoder could not be built; the message says what to do instead."""


@dataclass
class ImageEncoder:
    """A CLIP model plus the preprocessing its weights were trained with."""

    name: str
    model: torch.nn.Module  # the open_clip model (image and text towers), eval mode
    embed_dim: int
    preprocess_config: dict  # size, mean, std, interpolation, resize_mode
    device: torch.device
    architecture: str = ""  # open_clip architecture name, or "tiny"
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (half weights, CUDA); see encoder_tuning
    transform: object = field(default=None, repr=False)  # PIL -> tensor; picklable, for DataLoader workers
    _tokenizer: object = field(default=None, repr=False)

    def __post_init__(self):
        import open_clip

        cfg = self.preprocess_config
        self.transform = open_clip.image_transform(
            cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
            resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"))

    @property
    def image_size(self) -> int:
        size = self.preprocess_config["size"]
        return int(size if isinstance(size, int) else size[0])

    def jpeg_min_side(self, fast_jpeg: bool = True) -> Optional[int]:
        """`min_side` for images.load_image: with fast_jpeg, twice the input size (the antialiased resize then
        sees all the detail it keeps); None decodes at full size. One rule for extraction, predict and serve."""
        return 2 * self.image_size if fast_jpeg else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.visual.parameters()).dtype

    def preprocess(self, image) -> torch.Tensor:
        """PIL RGB image -> normalised FloatTensor (3, H, W); pure CPU work, safe in DataLoader workers."""
        return self.transform(image)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, D) float32 unnormalised image embeddings."""
        with torch.inference_mode(), self._autocast():
            pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)  # (B, 3, H, W)
            if self.device.type in ("cpu", "cuda"):
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            return self.model.encode_image(pixels).float()  # (B, D)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> (B, D) float32 unnormalised text embeddings (for CLIPScore)."""
        import open_clip

        if self._tokenizer is None:
            arch = "ViT-B-32" if self.architecture == TINY else self.architecture
            self._tokenizer = open_clip.get_tokenizer(arch)
        with torch.inference_mode(), self._autocast():
            tokens = self._tokenizer(list(texts)).to(self.device)  # (B, T)
            return self.model.encode_text(tokens).float()  # (B, D)

    def _autocast(self):
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


_CACHE: dict[tuple, ImageEncoder] = {}
_LOCK = threading.Lock()


def load_encoder(name: str, device: str | torch.device = "cpu", precision: Optional[str] = None,
                 fold_norms: bool = True) -> ImageEncoder:
    """Build (once per name, device and precision) the encoder called `name`; see the module docstring.

    precision: None (fp16 on CUDA, fp32 elsewhere), or 'auto', 'fp32', 'bf16', 'fp16' (encoder_tuning).
    fold_norms=False keeps the BatchNorm layers of ResNet towers (the module exactly as open_clip builds it).
    """
    from .encoder_tuning import resolve_precision

    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    key = (name, str(device), precision) if fold_norms else (name, str(device), precision, "unfolded")
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _build(name, device, precision, fold_norms)
        return _CACHE[key]


def encoder_width(name: Optional[str]) -> Optional[int]:
    """Embedding width of `name` without loading weights; None when it cannot be told."""
    if not name:
        return None
    arch, _ = _split_name(name[len(RANDOM_PREFIX):] if name.startswith(RANDOM_PREFIX) else name)
    if arch == TINY:
        return TINY_EMBED_DIM
    if arch in OPENAI_MODELS:
        return OPENAI_MODELS[arch][1]
    cfg = _open_clip_config(arch)
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None


# --------------------------------------------------------------------------------------------- building

def _split_name(name: str) -> tuple[str, Optional[str]]:
    """`arch[:pretrained-or-path]` -> (architecture, source). The first ':' splits (paths may hold more)."""
    for schema in ("hf-hub:", "local-dir:"):
        if name.startswith(schema):
            return name, None
    arch, sep, source = name.partition(":")
    return arch, (source if sep else None)


def _open_clip_arch(arch: str) -> str:
    return OPENAI_MODELS[arch][0] if arch in OPENAI_MODELS else arch.replace("/", "-")


def _open_clip_config(arch: str) -> Optional[dict]:
    import open_clip
    from open_clip.factory import get_model_config

    if arch.startswith(("hf-hub:", "local-dir:")):
        return None
    arch = _open_clip_arch(arch)
    return get_model_config(arch) if arch in open_clip.list_models() else None


def _build(name: str, device: torch.device, precision: str = "fp32", fold_norms: bool = True) -> ImageEncoder:
    from .encoder_tuning import fold_batch_norms

    if name == TINY:
        model, arch, preprocess = _build_tiny(), TINY, None
    elif name.startswith(RANDOM_PREFIX):
        arch = _open_clip_arch(name[len(RANDOM_PREFIX):])
        if _open_clip_config(arch) is None:
            raise EncoderLoadError(f"{name!r}: unknown architecture {arch!r}; see open_clip.list_models()")
        model, preprocess = _seeded(lambda: _quiet_create(arch)), None
    else:
        model, arch, preprocess = _build_pretrained(name)
    model = model.eval().requires_grad_(False)
    if preprocess is None:
        preprocess = _preprocess_config(model)
    embed_dim = _embed_dim(model)  # on CPU in fp32, before any device move or fp16 conversion
    folded = fold_batch_norms(model.visual) if fold_norms else 0  # in fp32, before any fp16 conversion
    model = model.to(device)
    if device.type in ("cpu", "cuda"):
        # NHWC convolutions are markedly faster in oneDNN / cuDNN, mostly for the ResNet towers.
        model.visual.to(memory_format=torch.channels_last)
    if precision == "fp16":
        from open_clip.model import convert_weights_to_lp

        # As OpenAI's clip.load and open_clip's precision="fp16": matmul/conv weights in fp16, norms in fp32.
        convert_weights_to_lp(model, dtype=torch.float16)
    log.info("CLIP encoder %s (%s): %d-d embeddings, %s px input, on %s in %s%s", name, arch, embed_dim,
             preprocess["size"], device, precision, f", {folded} BatchNorms folded" if folded else "")
    return ImageEncoder(name=name, model=model, embed_dim=embed_dim, preprocess_config=preprocess,
                        device=device, architecture=arch, precision=precision)


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def _build_tiny():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = TINY_CONFIG
    return _seeded(lambda: CLIP(embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                                text_cfg=CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=True))


def _create(arch: str, pretrained: Optional[str]):
    import open_clip

    return open_clip.create_model(arch, pretrained=pretrained, device="cpu")


def _quiet_create(arch: str):
    """Random-weight architecture; open_clip's root-logger warning about it is expected here, so hidden."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return _create(arch, None)
    finally:
        root.setLevel(level)


def _preprocess_config(model) -> dict:
    from open_clip.model import get_model_preprocess_cfg

    cfg = dict(get_model_preprocess_cfg(model))
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if not isinstance(size, int):
        size = int(size[0]) if size[0] == size[1] else tuple(size)
    cfg["size"] = size
    cfg["mean"] = tuple(cfg.get("mean") or OPENAI_MEAN)
    cfg["std"] = tuple(cfg.get("std") or OPENAI_STD)
    cfg.setdefault("interpolation", "bicubic")
    cfg.setdefault("resize_mode", "shortest")
    return {k: cfg[k] for k in ("size", "mean", "std", "interpolation", "resize_mode")}


def _embed_dim(model) -> int:
    if getattr(model.visual, "output_dim", None):
        return int(model.visual.output_dim)
    size = _preprocess_config(model)["size"]  # towers without output_dim (timm, HF): measure one output
    size = (size, size) if isinstance(size, int) else size
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, *size)).shape[-1])


def _build_pretrained(name: str):
    arch, source = _split_name(name)
    if arch == TINY and source is not None:  # `tiny:/path.pt`: the tiny architecture with trained weights
        return _from_file(TINY, Path(source).expanduser(), name), TINY, None
    if arch.startswith(("hf-hub:", "local-dir:")):
        return _download(arch, name, None), arch, None
    if arch not in OPENAI_MODELS and _open_clip_config(arch) is None:
        raise EncoderLoadError(
            f"unknown CLIP encoder {name!r}: use an OpenAI name ({', '.join(OPENAI_MODELS)}), an open_clip "
            "'model:pretrained' pair (see open_clip.list_pretrained()), 'model:/path/to/weights.pt', "
            "'random:<model>' or 'tiny'")
    oc_arch = _open_clip_arch(arch)
    if source is not None and _looks_like_path(source):
        return _from_file(oc_arch, Path(source).expanduser(), name), oc_arch, None
    if source is None:
        if arch not in OPENAI_MODELS:
            import open_clip

            tags = open_clip.list_pretrained_tags_by_model(oc_arch)
            raise EncoderLoadError(f"{name!r} names an architecture but no weights: write '{arch}:<pretrained tag>' "
                                   f"(tags: {tags}), '{arch}:/path/to/weights.pt' or 'random:{arch}'")
        cached = _clip_package_cache() / OPENAI_MODELS[arch][2]
        if cached.is_file():
            log.info("using the clip package's cached weights %s", cached)
            return _from_file(oc_arch, cached, name), oc_arch, None
        source = "openai"
    return _download(oc_arch, name, source), oc_arch, None


def _looks_like_path(source: str) -> bool:
    return any(ch in source for ch in "/\\~") or Path(source).suffix in (".pt", ".pth", ".bin", ".safetensors")


def _clip_package_cache() -> Path:
    return Path(os.environ.get("CLIP_CACHE", "~/.cache/clip")).expanduser()


def _download(arch: str, name: str, pretrained: Optional[str]):
    try:
        return _create(arch, pretrained)
    except Exception as exc:  # noqa: BLE001 - any download / hub failure gets the same advice
        raise EncoderLoadError(
            f"could not get weights for CLIP encoder {name!r} ({type(exc).__name__}: {exc}).\n"
            f"Offline? Download the weights elsewhere and pass a local file: --clip_model_type "
            f"'{name.split(':')[0]}:/path/to/weights.pt' (OpenAI .pt files from the clip package cache "
            f"~/.cache/clip work as they are), or use 'tiny' (random weights, for trying the pipeline)."
        ) from exc


def _from_file(arch: str, path: Path, name: str):
    if not path.is_file():
        raise EncoderLoadError(f"CLIP weights file {path} (from encoder name {name!r}) does not exist")
    model = _build_tiny() if arch == TINY else _seeded(lambda: _quiet_create(arch))
    try:
        state, scripted = read_state_dict(path)
        state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
        for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI archives' extra scalars
            state.pop(key, None)
        if scripted:  # TorchScript also keeps non-persistent buffers (e.g. attn_mask) that state dicts omit
            wanted = model.state_dict().keys()
            state = {k: v for k, v in state.items() if k in wanted}
        from open_clip.model import resize_pos_embed

        resize_pos_embed(state, model)
        model.load_state_dict(state, strict=True)  # copy_ casts fp16 OpenAI weights to the fp32 model
    except UnsafePickleError as exc:
        raise EncoderLoadError(f"CLIP weights file {path} is not a plain state dict: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - shape/key mismatches and unreadable files
        raise EncoderLoadError(f"CLIP weights file {path} does not fit architecture {arch!r} "
                               f"(from encoder name {name!r}): {exc}") from exc
    return model
