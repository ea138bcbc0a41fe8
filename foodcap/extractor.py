"""Run an extraction plan: each distinct image decoded and encoded once, batched, resumable, shardable.

    foodcap extract --clip_model_type RN50x4 --data_path ./food     # the CLI over this module

Images are decoded and preprocessed in DataLoader workers; the encoder runs batches under inference_mode at
its precision, which every chunk records (a resume never mixes precisions). Bad files are skipped with their
reason. Progress is kept as chunk files under a parts folder,
`<parts>/shard-<i>-of-<N>/chunk-<first batch>.safetensors` (each holds the embeddings of a run of whole
batches, written atomically), so an interrupted run resumes at the first batch not on disk and ends with the
same store, bit for bit, as an uninterrupted one. Shard i of N owns a contiguous range of the plan's
batches; `merge_parts` joins all shards' chunks into per-split FeatureStores.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .extraction import ExtractionPlan
from .features import FeatureStore
from .images import BadImageError, load_image

log = logging.getLogger(__name__)


class ExtractionError(RuntimeError):
    """Parts that cannot be resumed or merged; the message says which folder and why."""


@dataclass
class ShardResult:
    shard_index: int
    num_shards: int
    batches: int
    encoded: int = 0  # images encoded in this call (not counting resumed chunks)
    resumed_batches: int = 0
    seconds: float = 0.0


@dataclass
class Merged:
    rows: dict[int, torch.Tensor]  # image number -> (D,) embedding
    bad: dict[int, tuple[str, str]] = field(default_factory=dict)  # image number -> (reason, detail)
    encoder: dict = field(default_factory=dict)  # clip_model, clip_dim, image_size, preprocess


class _ImageFiles(Dataset):
    """Decode + preprocess one image (in a worker); a bad file comes back as its reason, never an exception."""

    def __init__(self, paths: list[str], transform, min_side: Optional[int] = None):
        self.paths, self.transform, self.min_side = paths, transform, min_side

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(load_image(self.paths[index], min_side=self.min_side)), None
        except BadImageError as exc:
            return index, None, (exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not end the run
            return index, None, ("unreadable", f"{type(exc).__name__}: {exc}")


def _collate(items):
    good = [(i, x) for i, x, bad in items if bad is None]
    pixels = torch.stack([x for _, x in good]) if good else None  # (B, 3, H, W)
    return [i for i, _ in good], pixels, [(i, bad) for i, _, bad in items if bad is not None]


def batch_ranges(num_images: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]


def shard_batches(num_batches: int, shard_index: int, num_shards: int) -> range:
    """The contiguous run of batch numbers shard `shard_index` of `num_shards` owns."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard_index must be in [0, {num_shards}), got {shard_index}")
    return range(shard_index * num_batches // num_shards, (shard_index + 1) * num_batches // num_shards)


def shard_dir(parts_dir: Path, shard_index: int, num_shards: int) -> Path:
    return Path(parts_dir) / f"shard-{shard_index}-of-{num_shards}"


def run_shard(plan: ExtractionPlan, encoder, parts_dir: Path, *, batch_size: int = 32, num_workers: int = 0,
              shard_index: int = 0, num_shards: int = 1, save_every: int = 20, resume: bool = True,
              fast_jpeg: bool = True, on_batch: Optional[Callable[[int], None]] = None) -> ShardResult:
    """Encode this shard's batches not yet on disk, saving a chunk every `save_every` batches.

    fast_jpeg: decode JPEGs at the smallest DCT scale that keeps twice the encoder's input size (see
    images.load_image); the resize that follows makes the result all but identical to a full decode.
    """
    from tqdm.auto import tqdm

    batches = batch_ranges(len(plan.images), batch_size)
    mine = shard_batches(len(batches), shard_index, num_shards)
    fingerprint = plan.fingerprint(encoder.name, batch_size)
    numerics = {"precision": getattr(encoder, "precision", "fp32"), "fast_jpeg": bool(fast_jpeg)}
    info = json.dumps({"clip_model": encoder.name, "clip_dim": encoder.embed_dim, **numerics,
                       "image_size": encoder.image_size, "preprocess": encoder.preprocess_config})
    folder = shard_dir(parts_dir, shard_index, num_shards)
    done_until = _resume_point(folder, fingerprint, mine.start, numerics) if resume else mine.start
    if not resume and folder.exists():
        shutil.rmtree(folder)
    result = ShardResult(shard_index, num_shards, len(mine), resumed_batches=done_until - mine.start)
    todo = [list(batches[b]) for b in range(done_until, mine.stop)]
    if result.resumed_batches:
        log.info("resuming shard %d/%d: %d of %d batches already done", shard_index, num_shards,
                 result.resumed_batches, len(mine))
    if not todo:
        return result
    loader = DataLoader(_ImageFiles(plan.images, encoder.transform, encoder.jpeg_min_side(fast_jpeg)), batch_sampler=todo, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=encoder.device.type == "cuda",
                        persistent_workers=False)
    pending = _Chunk(done_until)
    start = time.perf_counter()
    bar = tqdm(total=len(mine), initial=result.resumed_batches, unit="batch", desc=f"CLIP {encoder.name}",
               disable=None)
    try:
        for batch_number, (indices, pixels, bad) in zip(range(done_until, mine.stop), loader):
            if pixels is not None:
                pending.add(indices, encoder.encode_images(pixels).cpu())  # (B, D)
                result.encoded += len(indices)
            pending.bad.extend((i, reason, detail) for i, (reason, detail) in bad)
            pending.end = batch_number + 1
            bar.update(1)
            bar.set_postfix(img_s=f"{result.encoded / max(time.perf_counter() - start, 1e-9):.1f}")
            if pending.end - pending.first >= save_every:
                pending = pending.save(folder, fingerprint, encoder.embed_dim, info)
            if on_batch is not None:
                on_batch(batch_number)
    finally:
        # Ctrl-C or an error: keep the whole batches already encoded, so a rerun resumes after them.
        if pending.end > pending.first:
            pending.save(folder, fingerprint, encoder.embed_dim, info)
        bar.close()
    result.seconds = time.perf_counter() - start
    return result


class _Chunk:
    def __init__(self, first: int):
        self.first = self.end = first
        self.indices: list[int] = []
        self.rows: list[torch.Tensor] = []
        self.bad: list[tuple[int, str, str]] = []

    def add(self, indices, embeddings):
        self.indices.extend(indices)
        self.rows.append(embeddings)

    def save(self, folder: Path, fingerprint: str, dim: int, encoder_info: str) -> "_Chunk":
        from safetensors.torch import save_file

        from .utils import atomic_path

        emb = torch.cat(self.rows) if self.rows else torch.zeros(0, dim)
        tensors = {"embeddings": emb.float().contiguous(), "indices": torch.tensor(self.indices, dtype=torch.int64)}
        meta = {"fingerprint": fingerprint, "first_batch": str(self.first), "end_batch": str(self.end),
                "bad": json.dumps(self.bad), "encoder": encoder_info}
        with atomic_path(folder / f"chunk-{self.first:09d}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return _Chunk(self.end)


def _read_chunks(folder: Path):
    from safetensors import safe_open

    for path in sorted(folder.glob("chunk-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            yield path, meta, f.get_tensor("embeddings"), f.get_tensor("indices")


def _chunk_numerics(meta: dict) -> dict:
    """How a chunk's embeddings were computed, beyond the fingerprint: precision and JPEG decoding."""
    info = json.loads(meta.get("encoder") or "{}")
    return {"precision": info.get("precision", "unknown"), "fast_jpeg": info.get("fast_jpeg", "unknown")}


def _resume_point(folder: Path, fingerprint: str, start: int, numerics: Optional[dict] = None) -> int:
    """First batch not yet on disk; stale parts from a different command are removed."""
    if not folder.is_dir():
        return start
    end = start
    for path, meta, _, _ in _read_chunks(folder):
        stale = meta.get("fingerprint") != fingerprint or (numerics is not None and _chunk_numerics(meta) != numerics)
        if stale:
            # another precision or JPEG decoding (or a run from before they were recorded) would leave a store
            # that no uninterrupted run gives
            log.warning("%s holds parts of a different extraction (images, encoder, precision, JPEG decoding or "
                        "batch size changed); starting this shard afresh", folder)
            shutil.rmtree(folder)
            return start
        if int(meta["first_batch"]) != end:
            raise ExtractionError(f"{path}: chunk starts at batch {meta['first_batch']}, expected {end}; "
                                  f"delete {folder} to start the shard again")
        end = int(meta["end_batch"])
    return end


def merge_parts(plan: ExtractionPlan, parts_dir: Path, *, encoder_name: str, batch_size: int,
                num_shards: int = 1) -> Merged:
    """Join every shard's chunks; raise ExtractionError if a shard is missing, incomplete or from other settings."""
    fingerprint = plan.fingerprint(encoder_name, batch_size)
    num_batches = len(batch_ranges(len(plan.images), batch_size))
    merged = Merged(rows={})
    shard_numerics: dict[int, dict] = {}
    for shard in range(num_shards):
        folder = shard_dir(parts_dir, shard, num_shards)
        expect = shard_batches(num_batches, shard, num_shards)
        end = expect.start
        for path, meta, emb, idx in (_read_chunks(folder) if folder.is_dir() else ()):
            if meta.get("fingerprint") != fingerprint:
                raise ExtractionError(f"{path}: made with different images, encoder or batch size; rerun shard "
                                      f"{shard} with the same command")
            shard_numerics.setdefault(shard, _chunk_numerics(meta))  # a shard's chunks agree (see _resume_point)
            end = int(meta["end_batch"])
            merged.rows.update(zip(idx.tolist(), emb.unbind(0)))
            merged.bad.update({i: (reason, detail) for i, reason, detail in json.loads(meta["bad"])})
            merged.encoder = json.loads(meta.get("encoder") or "{}")
        if end != expect.stop:
            raise ExtractionError(f"shard {shard} of {num_shards} is incomplete ({end - expect.start} of "
                                  f"{len(expect)} batches in {folder}); run it with --shard_index {shard} first")
    if len({json.dumps(n, sort_keys=True) for n in shard_numerics.values()}) > 1:
        # e.g. `--precision auto` on machines with and without AMX; rerunning every shard with explicit flags
        # re-encodes only the shards that differ (the others' parts are kept and found complete)
        listing = "; ".join(f"shard {i}: {_describe(n)}" for i, n in sorted(shard_numerics.items()))
        raise ExtractionError(f"{parts_dir}: shards were encoded differently ({listing}); rerun every shard with "
                              f"the same explicit --precision and --fast_jpeg/--no-fast_jpeg, then --merge")
    return merged


def _describe(numerics: dict) -> str:
    if "unknown" in numerics.values():
        return "made by an older foodcap that did not record its precision"
    return f"{numerics['precision']}, {'fast' if numerics['fast_jpeg'] else 'full'} JPEG decoding"


def build_stores(plan: ExtractionPlan, merged: Merged, meta: dict, dim: int) -> dict[str, FeatureStore]:
    """One FeatureStore per split: rows = the split's good images in plan order, captions pointing at them."""
    stores = {}
    for split in plan.splits():
        numbers = [i for i, s in enumerate(plan.image_splits) if s == split and i in merged.rows]
        row_of = {n: r for r, n in enumerate(numbers)}
        emb = torch.stack([merged.rows[n] for n in numbers]) if numbers else torch.zeros(0, dim)  # (N, D)
        captions = [{"image_id": rec.image_id, "caption": rec.caption, "clip_embedding": row_of[n],
                     "image_path": rec.image_path} for n, rec in plan.captions if n in row_of]
        stores[split] = FeatureStore(emb, captions, dict(meta, split=split, num_images=len(numbers),
                                                         num_captions=len(captions)))
    return stores


def bad_report(plan: ExtractionPlan, merged: Merged) -> list[dict]:
    per_image = {}
    for n, _ in plan.captions:
        per_image[n] = per_image.get(n, 0) + 1
    return [{"path": plan.images[n], "reason": reason, "detail": detail, "captions_dropped": per_image.get(n, 0)}
            for n, (reason, detail) in sorted(merged.bad.items())]
