"""Evaluate a captioner on a feature store: caption the stored embeddings, score, write metrics.json + report.html.

No image is re-encoded: the store's CLIP embeddings are captioned directly (one per image id; several
reference captions per image are grouped). Also the training hook (`ValidationCider`, for
`train.py --eval_every N`) and the best-constant-caption baseline the demo compares against.

    foodcap evaluate --load_pt ./model_checkpoints/best --data ./RN50x4_RN_test.pkl --out_dir ./eval
    python -c "from foodcap.evaluation import evaluate; print(evaluate('model_checkpoints/best', 'RN50x4_RN_test.pkl', 'eval'))"
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from .metrics import ALL_METRICS, MetricsResult, clip_scores, score_captions
from .report import ReportRow, plot_histogram, write_report
from .utils import write_atomic

log = logging.getLogger(__name__)


@dataclass
class ImageGroup:
    """One image of a store: its embedding row and all its reference captions."""

    image_id: str
    row: int
    references: list[str]
    image_path: Optional[str] = None


def group_references(store, *, max_images: Optional[int] = None) -> list[ImageGroup]:
    """Captions grouped by image_id, in first-seen order (ClipCap stores repeat an image once per caption)."""
    groups: dict[str, ImageGroup] = {}
    n_rows = store.embeddings.shape[0]
    for i, entry in enumerate(store.captions):
        image_id, row = str(entry.get("image_id", f"row{entry.get('clip_embedding')}")), entry.get("clip_embedding")
        if not isinstance(row, int) or not 0 <= row < n_rows:
            raise ValueError(f"captions[{i}] (image_id {image_id!r}): clip_embedding {row!r} is not a row of the "
                             f"{n_rows} embeddings; the feature store is damaged, re-run extraction")
        group = groups.get(image_id)
        if group is None:
            if max_images is not None and len(groups) >= max_images:
                continue
            group = groups[image_id] = ImageGroup(image_id, row, [], entry.get("image_path"))
        elif group.row != row:
            log.debug("image %s has captions on rows %d and %d; using row %d", image_id, group.row, row, group.row)
        caption = entry.get("caption")
        if isinstance(caption, str) and caption.strip():
            group.references.append(caption.strip())
    return [g for g in groups.values() if g.references]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def locate_images(groups: Sequence[ImageGroup], images_dir: str | os.PathLike) -> int:
    """Point groups whose recorded image is missing (ClipCap .pkl stores record none) at `images_dir`.

    A group's image is `images_dir/<recorded file name>` or `images_dir/<image_id>.<jpg|jpeg|png|webp|bmp>`
    (the Kaggle food layout, `{Index}.jpg`). Returns how many groups now have a readable image path.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: no such folder (it should hold the split's photos, e.g. {{image_id}}.jpg)")
    by_name = {p.name: p for p in folder.iterdir() if p.is_file()}
    by_stem = {p.stem: p for p in by_name.values() if p.suffix.lower() in IMAGE_SUFFIXES}
    found = 0
    for group in groups:
        if group.image_path and Path(group.image_path).is_file():
            found += 1
            continue
        hit = by_name.get(Path(group.image_path).name) if group.image_path else None
        hit = hit or by_stem.get(group.image_id) or by_stem.get(Path(group.image_id).stem)
        if hit is not None:
            group.image_path = str(hit)
            found += 1
    if groups and not found:
        log.warning("no photo of the %d evaluated images found in %s; the report has no thumbnails", len(groups), folder)
    return found


@dataclass
class Evaluation:
    groups: list[ImageGroup]
    generated: list[str]
    scores: MetricsResult
    clip: dict[str, list[float]] = field(default_factory=dict)  # CLIPScore / RefCLIPScore per image

    @property
    def corpus(self) -> dict[str, float]:
        out = dict(self.scores.corpus)
        out.update({k: sum(v) / len(v) for k, v in self.clip.items() if v})
        return out

    @property
    def skipped(self) -> dict[str, str]:
        return self.scores.skipped

    def rows(self) -> list[ReportRow]:
        rows = []
        for i, (g, caption) in enumerate(zip(self.groups, self.generated)):
            scores = dict(self.scores.per_image.get(g.image_id, {}))
            scores.update({k: v[i] for k, v in self.clip.items()})
            keep = [k for k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "SPICE", "CLIPScore", "RefCLIPScore") if k in scores]
            rows.append(ReportRow(g.image_id, g.image_path, g.references, caption, {k: scores[k] for k in keep}))
        return rows


def _captions_of(captioner, embeddings: torch.Tensor, decoding: dict) -> list[str]:
    captions = captioner.caption_embeddings(embeddings, **decoding)
    return [c if isinstance(c, str) else c[0] for c in captions]


def evaluate_captioner(captioner, store, *, metrics: Iterable[str] = ALL_METRICS, clip_score: bool = True,
                       tokenizer: str = "auto", max_images: Optional[int] = None, clip_model: Optional[str] = None,
                       images_dir: Optional[str | os.PathLike] = None, **decoding: Any) -> Evaluation:
    """Caption every image of `store` from its stored embedding and score the captions against its references.

    CLIPScore uses `clip_model`, else the store's recorded CLIP model, else the checkpoint's. `images_dir`
    finds the report's thumbnails for stores that do not record readable image paths.
    """
    groups = group_references(store, max_images=max_images)
    if not groups:
        raise ValueError("the feature store holds no image with a reference caption: nothing to evaluate")
    if images_dir is not None:
        locate_images(groups, images_dir)
    embeddings = store.embeddings[torch.tensor([g.row for g in groups])]  # (N, D)
    generated = _captions_of(captioner, embeddings, decoding)
    result = score_captions({g.image_id: g.references for g in groups},
                            {g.image_id: c for g, c in zip(groups, generated)}, metrics=metrics, tokenizer=tokenizer)
    evaluation = Evaluation(groups, generated, result)
    if clip_score:
        clip_name = clip_model or (getattr(store, "meta", None) or {}).get("clip_model") or captioner.clip_model
        try:
            from .encoders import load_encoder

            if not clip_name:
                raise ValueError("the feature store does not name its CLIP model")
            encoder = load_encoder(clip_name, device=captioner.device)
            evaluation.clip = clip_scores(embeddings.to(encoder.device), generated, encoder.encode_text,
                                          [g.references for g in groups])
        except Exception as exc:  # noqa: BLE001 - weights that cannot be loaded offline must not stop the evaluation
            result.skipped["CLIPScore"] = f"needs the text tower of the store's CLIP model {clip_name!r}: {exc}"
            log.warning("CLIPScore skipped: %s", result.skipped["CLIPScore"])
    return evaluation


def validation_cider(model, tokenizer, store, *, max_images: Optional[int] = 200, tokenizer_kind: str = "auto",
                     **decoding: Any) -> float:
    """Corpus CIDEr of greedy captions for (up to `max_images` of) a validation store; the model's mode is kept."""
    from .captioner import Captioner

    device = next(model.parameters()).device
    captioner = Captioner(model, tokenizer, device=device)
    decoding.setdefault("max_new_tokens", 40)
    evaluation = evaluate_captioner(captioner, store, metrics=["CIDEr"], clip_score=False, tokenizer=tokenizer_kind,
                                    max_images=max_images, **decoding)
    return evaluation.corpus["CIDEr"]


class ValidationCider:
    """Trainer callback (foodcap.train_loop): validation CIDEr every `--eval_every` steps and at each epoch end.

    Returns {"val_cider": x}, so `best_metric="val_cider"` selects best/ by it. Computed on the main process
    and shared, so every process takes the same decisions.
    """

    def __init__(self, store=None, *, max_images: Optional[int] = 200, name: str = "val_cider", **decoding: Any):
        self.store, self.max_images, self.name, self.decoding = store, max_images, name, decoding

    def _score(self, ctx) -> dict:
        store = self.store if self.store is not None else getattr(ctx.data, "val_store", None)
        if store is None:
            return {}
        acc = getattr(ctx, "accelerator", None)
        value = [None]
        if acc is None or acc.is_main_process:
            value[0] = validation_cider(ctx.model, ctx.tokenizer, store, max_images=self.max_images, **self.decoding)
        if acc is not None and acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(value, from_process=0)
        log.info("step %d: %s %.4f", ctx.step, self.name, value[0])
        return {self.name: value[0]}

    def on_evaluate(self, ctx) -> dict:
        return self._score(ctx)

    def on_epoch_end(self, ctx) -> dict:
        return self._score(ctx)


def best_constant_caption(candidates: Sequence[str], references: dict[str, list[str]], *, tokenizer: str = "auto",
                          max_candidates: int = 300) -> tuple[str, float]:
    """The caption that scores the highest corpus CIDEr when given to every image (the no-vision baseline).

    `candidates` are usually the training captions; the `max_candidates` most frequent are tried. Texts
    are tokenised once (as `score_captions` would) and each candidate is then scored on the tokens.
    """
    from collections import Counter

    from .metrics import java_missing_reason, tokenize_all

    tried = [c for c, _ in Counter(c.strip() for c in candidates if c.strip()).most_common(max_candidates)]
    if not tried:
        raise ValueError("no candidate captions for the constant-caption baseline")
    if tokenizer == "auto":
        tokenizer = "simple" if java_missing_reason() else "ptb"
    refs = tokenize_all(references, tokenizer)
    tokens = tokenize_all({i: [c] for i, c in enumerate(tried)}, tokenizer)
    best = ("", -math.inf)
    for i, caption in enumerate(tried):
        cider = score_captions(refs, {k: tokens[i][0] for k in refs}, metrics=["CIDEr"], tokenizer="none").corpus["CIDEr"]
        if cider > best[1]:
            best = (caption, cider)
    return best


def write_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike, *, title: str = "foodcap evaluation",
                     notes: Sequence[str] = (), extra: Optional[dict] = None,
                     figures: Sequence[tuple[str, str | os.PathLike]] = (),
                     extra_tables: Sequence[tuple[str, Sequence[ReportRow]]] = ()) -> dict:
    """metrics.json (corpus scores, skipped metrics, per-image captions and scores) and report.html, atomically."""
    out = Path(out_dir)
    rows = evaluation.rows()
    payload = {"metrics": evaluation.corpus, "skipped": evaluation.skipped, "tokenizer": evaluation.scores.tokenizer,
               "num_images": len(rows), **(extra or {}),
               "images": [{"image_id": r.image_id, "image_path": r.image_path, "generated": r.generated,
                           "references": r.references, "scores": r.scores} for r in rows]}
    metrics_path = write_atomic(out / "metrics.json", json.dumps(payload, indent=2, default=str))
    figs = list(figures)
    if "CIDEr" in evaluation.scores.corpus:
        figs.append(("per-image CIDEr", plot_histogram([r.scores.get("CIDEr", math.nan) for r in rows],
                                                         out / "cider_histogram.png", title="per-image CIDEr", xlabel="CIDEr")))
    report = write_report(out / "report.html", title=title, rows=rows, metrics=evaluation.corpus,
                          skipped=evaluation.skipped, notes=notes, figures=figs, extra_tables=extra_tables)
    return {"metrics_json": str(metrics_path), "report_html": str(report), **payload}


def evaluate(checkpoint: str | os.PathLike, data: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None, *,
             device: str = "auto", gpt2: Optional[str] = None, clip_model: Optional[str] = None,
             metrics: Iterable[str] = ALL_METRICS, clip_score: bool = True, max_images: Optional[int] = None,
             images_dir: Optional[str | os.PathLike] = None, **decoding: Any) -> dict:
    """Load a checkpoint and a feature store, evaluate, and (with out_dir) write metrics.json + report.html.

    The function behind `foodcap evaluate` and `predict.py --eval`; returns the corpus scores and, with
    out_dir, the paths written.
    """
    from .captioner import load_captioner
    from .features import load_features

    if images_dir is not None and not Path(images_dir).is_dir():
        raise ValueError(f"image folder {images_dir}: no such folder (it should hold the split's photos, e.g. "
                         "{image_id}.jpg)")
    store = load_features(data)
    captioner = load_captioner(checkpoint, device=device, gpt2=gpt2, clip_model=clip_model)
    store_dim, model_dim = store.embeddings.shape[1], captioner.config.clip_dim
    if store_dim != model_dim:
        raise ValueError(f"{data} holds {store_dim}-d CLIP embeddings but {checkpoint} expects {model_dim}-d: "
                         "evaluate on features extracted with the checkpoint's CLIP model")
    evaluation = evaluate_captioner(captioner, store, metrics=metrics, clip_score=clip_score, max_images=max_images,
                                    clip_model=clip_model, images_dir=images_dir, **decoding)
    extra = {"checkpoint": str(checkpoint), "data": str(data), "decoding": decoding,
             "clip_model": (store.meta or {}).get("clip_model"), "split": (store.meta or {}).get("split")}
    if out_dir is None:
        return {"metrics": evaluation.corpus, "skipped": evaluation.skipped, **extra}
    return write_evaluation(evaluation, out_dir, title=f"foodcap evaluation: {Path(str(checkpoint)).name} on {Path(str(data)).name}",
                            extra=extra)
