"""Plan a CLIP feature extraction: clean captions, GPT-2 token limit, split by image, one entry per image.

    python -c "from foodcap.datasets import read_dataset; from foodcap.extraction import plan_extraction; \
print(plan_extraction(read_dataset('tests/data/images/captions.csv').records, test_size=0.2).counts)"

The plan fixes the order of the distinct images (first appearance in the caption file): that order is the row
order of the stores and defines the batches, so a resumed or sharded run encodes exactly the same batches
as a single uninterrupted one. Running the plan is foodcap.extractor.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .datasets import CaptionRecord

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class ExtractionPlan:
    images: list[str]  # distinct image paths; index = image number
    image_splits: list[str]  # split of each image
    captions: list[tuple[int, CaptionRecord]]  # (image number, record), in caption-file order
    counts: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # token_limit, test_size, val_size, seed, split source

    def splits(self) -> list[str]:
        present = set(self.image_splits)
        return [s for s in SPLITS if s in present]

    def fingerprint(self, encoder_name: str, batch_size: int) -> str:
        """Identifies the work: same images, encoder (its name fixes weights and preprocessing) and batching
        give the same embeddings, bit for bit."""
        digest = hashlib.sha256()
        digest.update(json.dumps([encoder_name, batch_size]).encode())
        for path in self.images:
            digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
        return digest.hexdigest()[:32]


def count_tokens(captions: Sequence[str], tokenizer=None, batch: int = 4096) -> list[int]:
    """GPT-2 token counts (every GPT-2 size shares one BPE vocabulary, shipped offline)."""
    if tokenizer is None:
        from .language import load_tokenizer

        tokenizer = load_tokenizer("tiny")  # GPT-2's real vocabulary, never a hub download
    unique = list(dict.fromkeys(captions))
    lengths = {}
    for start in range(0, len(unique), batch):
        chunk = unique[start:start + batch]
        for text, ids in zip(chunk, tokenizer(chunk)["input_ids"]):
            lengths[text] = len(ids)
    return [lengths[c] for c in captions]


def plan_extraction(records: Sequence[CaptionRecord], *, token_limit: Optional[int] = None,
                    test_size: Optional[float] = None, val_size: Optional[float] = None, seed: int = 42,
                    tokenizer=None, default_test_size: float = 0.1) -> ExtractionPlan:
    """Drop duplicate and over-long captions, assign each image a split, number the distinct images."""
    counts = {"captions_in": len(records)}
    seen, kept = set(), []
    for r in records:
        key = (r.image_path, r.caption)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    counts["duplicate_captions"] = len(records) - len(kept)
    if token_limit is not None:
        lengths = count_tokens([r.caption for r in kept], tokenizer)
        over = [r for r, n in zip(kept, lengths) if n > token_limit]
        kept = [r for r, n in zip(kept, lengths) if n <= token_limit]
        counts["over_token_limit"] = len(over)
        if over:
            log.info("dropped %d captions longer than %d GPT-2 tokens", len(over), token_limit)

    images: list[str] = list(dict.fromkeys(r.image_path for r in kept))
    number = {path: i for i, path in enumerate(images)}
    dataset_splits = {}
    for r in kept:
        if r.split is not None:
            dataset_splits.setdefault(r.image_path, r.split)
    settings = {"token_limit": token_limit, "seed": seed}
    if dataset_splits:
        if test_size is not None or val_size is not None:
            log.warning("the dataset defines its own splits; --test_size/--val_size are ignored")
        splits = [dataset_splits.get(p, "train") for p in images]
        settings["split_source"] = "dataset"
    else:
        test_size = default_test_size if test_size is None else test_size
        splits = split_images(len(images), test_size, val_size or 0.0, seed)
        settings.update(split_source="random by image", test_size=test_size, val_size=val_size or 0.0)
    counts.update(captions=len(kept), images=len(images),
                  **{f"{s}_images": splits.count(s) for s in SPLITS})
    captions = [(number[r.image_path], r) for r in kept]
    return ExtractionPlan(images, splits, captions, counts, settings)


def _how_many(size: float, n: int) -> int:
    if size < 0:
        raise ValueError(f"split sizes must be >= 0, got {size}")
    if size >= 1:
        return min(n, int(size))  # an absolute number of images
    return min(n, max(1, round(size * n))) if size > 0 and n > 1 else 0


def split_images(n: int, test_size: float, val_size: float, seed: int) -> list[str]:
    """Seeded split of n images (never of captions): fractions in (0, 1) or absolute image counts."""
    n_test = _how_many(test_size, n)
    n_val = min(_how_many(val_size, n), n - n_test)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    splits = ["train"] * n
    for i in order[:n_test]:
        splits[i] = "test"
    for i in order[n_test:n_test + n_val]:
        splits[i] = "val"
    return splits
