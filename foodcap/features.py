"""The feature store: CLIP embeddings + captions + metadata, in ClipCap's pickle or a safe mmap-able file.

    python -c "from foodcap.features import load_features; s = load_features('RN50x4_RN_train.pkl'); print(s)"

A `FeatureStore` holds
    embeddings  FloatTensor (N, D)  one row per distinct image
    captions    [{"image_id", "caption", "clip_embedding": row index, optional "image_path"}, ...]
    meta        {"clip_model": encoder name or None, "clip_dim": D, "split": "train"/"val"/"test"/None, ...}

Formats (chosen by the file suffix):

* `.pkl` - ClipCap's layout, so the reference `train.py` reads it: a pickled dict
  `{"clip_embedding": Tensor (N, D), "captions": [...], "meta": {...}}` (the extra "meta" key is ignored by
  ClipCap). Reading never uses `pickle.load`: an allow-list unpickler (foodcap.safe_pickle) accepts tensors,
  numpy arrays, plain containers and the pandas Series the food fork stored as captions, nothing else.
* `.safetensors` - for large sets: one safetensors file holding `clip_embedding` (N, D) and `captions_jsonl`
  (uint8: the captions as UTF-8 JSON lines), with the metadata as JSON in the safetensors header
  (`foodcap_meta`). Nothing in it can execute, and `load_features(..., mmap=True)` maps the embeddings
  straight from the file (pages are read on first touch), so a multi-GB store opens instantly.

Writes are atomic (temp file + rename).
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .safe_pickle import UnsafePickleError, load_pickle
from .utils import atomic_path

log = logging.getLogger(__name__)

FORMAT_NAME = "foodcap.features"
FORMAT_VERSION = "1"
SUFFIXES = (".pkl", ".safetensors")


class FeatureStoreError(ValueError):
    """A feature file that cannot be used; the message names the file and what is wrong."""


@dataclass
class FeatureStore:
    embeddings: torch.Tensor  # (N, D) float
    captions: list[dict]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.meta = dict(self.meta)
        self.meta.setdefault("clip_model", None)
        self.meta.setdefault("split", None)
        self.meta["clip_dim"] = int(self.embeddings.shape[1]) if self.embeddings.ndim == 2 else 0

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def num_images(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def clip_model(self) -> Optional[str]:
        return self.meta.get("clip_model")

    @property
    def clip_dim(self) -> int:
        return int(self.meta["clip_dim"])

    @property
    def split(self) -> Optional[str]:
        return self.meta.get("split")

    def __repr__(self) -> str:
        return (f"FeatureStore({len(self)} captions, {self.num_images} images x {self.clip_dim}-d, "
                f"clip_model={self.clip_model!r}, split={self.split!r})")

    def validate(self, label: str = "feature store") -> "FeatureStore":
        """Check every caption points at a row; raise FeatureStoreError naming `label` otherwise."""
        if self.embeddings.ndim != 2:
            raise FeatureStoreError(f"{label}: clip_embedding must be 2-D (N, D), got shape {tuple(self.embeddings.shape)}")
        n = self.num_images
        for i, cap in enumerate(self.captions):
            if not isinstance(cap, dict):
                raise FeatureStoreError(f"{label}: captions[{i}] is a {type(cap).__name__}, expected a dict")
            row = cap.get("clip_embedding")
            if not isinstance(row, int) or not 0 <= row < n:
                raise FeatureStoreError(f"{label}: captions[{i}]['clip_embedding'] = {row!r} is not a row index "
                                        f"below {n}")
            if not isinstance(cap.get("caption"), str):
                raise FeatureStoreError(f"{label}: captions[{i}]['caption'] is {cap.get('caption')!r}, not text")
        return self


def save_features(store: FeatureStore, path: str | Path) -> Path:
    """Write `store` atomically; `.pkl` keeps ClipCap's layout, `.safetensors` is the safe mmap-able format."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise FeatureStoreError(f"{path}: feature files end in .pkl (ClipCap layout) or .safetensors")
    embeddings = store.embeddings.detach().cpu().contiguous()
    meta = _jsonable(dict(store.meta, clip_dim=int(embeddings.shape[1])))
    captions = [_jsonable(c) for c in store.captions]
    with atomic_path(path) as tmp:
        if path.suffix == ".pkl":
            with open(tmp, "wb") as f:
                pickle.dump({"clip_embedding": embeddings, "captions": captions, "meta": meta}, f,
                            protocol=pickle.HIGHEST_PROTOCOL)
        else:
            from safetensors.torch import save_file

            lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in captions).encode("utf-8")
            blob = torch.frombuffer(bytearray(lines), dtype=torch.uint8) if lines else torch.zeros(0, dtype=torch.uint8)
            save_file({"clip_embedding": embeddings, "captions_jsonl": blob}, str(tmp),
                      metadata={"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                "foodcap_meta": json.dumps(meta, ensure_ascii=False)})
    return path


def load_features(path: str | Path, *, mmap: bool = True) -> FeatureStore:
    """Read a feature store (`.pkl` from ClipCap, the food fork or us; or our `.safetensors`)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureStoreError(f"{path}: no such feature file (make one with `foodcap extract` / parse_food.py)")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, mmap)
    try:
        data = load_pickle(path)
    except UnsafePickleError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated / not a pickle at all
        raise FeatureStoreError(f"{path}: not a readable feature pickle ({type(exc).__name__}: {exc})") from exc
    return from_clipcap_dict(data, str(path))


def from_clipcap_dict(data: Any, label: str) -> FeatureStore:
    """A FeatureStore from the unpickled ClipCap dict, repairing the food fork's caption records."""
    if not isinstance(data, dict) or "clip_embedding" not in data or "captions" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise FeatureStoreError(f"{label}: expected a dict with 'clip_embedding' and 'captions', found {keys}")
    embeddings = data["clip_embedding"]
    if isinstance(embeddings, np.ndarray):
        embeddings = torch.from_numpy(embeddings)
    if not isinstance(embeddings, torch.Tensor):
        raise FeatureStoreError(f"{label}: 'clip_embedding' is a {type(embeddings).__name__}, expected a tensor")
    if embeddings.ndim == 3 and embeddings.shape[1] == 1:  # some forks stacked (N, 1, D)
        embeddings = embeddings[:, 0]
    captions = [_caption_record(c, i, label) for i, c in enumerate(data["captions"])]
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return FeatureStore(embeddings.float(), captions, meta).validate(label)


def _caption_record(entry: Any, index: int, label: str) -> dict:
    if type(entry).__module__.startswith("pandas"):
        entry = {str(k): v for k, v in entry.items()}  # the food fork stored DataFrame rows (pandas Series)
    if not isinstance(entry, dict):
        raise FeatureStoreError(f"{label}: captions[{index}] is a {type(entry).__name__}, expected a dict")
    record = {k: _plain(v) for k, v in entry.items()}
    # The food fork renamed its columns off by one: "caption" holds the image Index, "Captions" the text.
    if not isinstance(record.get("caption"), str) and isinstance(record.get("Captions"), str):
        record["caption"] = record.pop("Captions")
    if isinstance(record.get("clip_embedding"), float) and record["clip_embedding"].is_integer():
        record["clip_embedding"] = int(record["clip_embedding"])
    return record


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    return value


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _load_safetensors(path: Path, mmap: bool) -> FeatureStore:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT_NAME:
                raise FeatureStoreError(f"{path}: a safetensors file but not a foodcap feature store "
                                        f"(format {header.get('format')!r})")
            blob = f.get_tensor("captions_jsonl")
            embeddings = None if mmap else f.get_tensor("clip_embedding")
    except FeatureStoreError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise FeatureStoreError(f"{path}: unreadable safetensors feature file ({exc})") from exc
    if embeddings is None:
        embeddings = _mmap_tensor(path, "clip_embedding")
    text = bytes(blob.numpy()).decode("utf-8")
    captions = [json.loads(line) for line in text.splitlines() if line]
    meta = json.loads(header.get("foodcap_meta", "{}"))
    return FeatureStore(embeddings, captions, meta).validate(str(path))


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None}


def _mmap_tensor(path: Path, name: str) -> torch.Tensor:
    """Zero-copy view of one safetensors tensor through a copy-on-write memory map."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    info = header[name]
    dtype = _ST_DTYPES.get(info["dtype"])
    start, end = info["data_offsets"]
    if dtype is None or end == start:  # bf16 has no numpy dtype; empty tensors cannot be mapped
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    array = np.memmap(path, dtype=dtype, mode="c", offset=8 + header_len + start, shape=tuple(info["shape"]))
    return torch.from_numpy(array)
