"""`foodcap extract` / `python parse_food.py`: CLIP features of a captioned image set, once per image.

    python parse_food.py --clip_model_type RN50x4 --data_path ./food --token_limit 60 --test_size 0.1
    # -> ./RN50x4_RN_train.pkl, ./RN50x4_RN_test.pkl, ./RN50x4_RN_report.json

Large jobs: run `--num_shards N --shard_index i` for every i (machines, GPUs or a job array sharing --out_dir,
e.g. `--shard_index $SLURM_ARRAY_TASK_ID`), then the same command with `--merge`. Under torchrun
(`torchrun --nproc_per_node 4 parse_food.py ...`) each process takes shard RANK of WORLD_SIZE and GPU LOCAL_RANK,
and rank 0 merges once every shard is done. An interrupted run resumes when rerun with the same command.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _default_workers(device_type: str = "cuda") -> int:
    """Decoding workers: on a GPU they keep it fed; on a CPU the encoder's threads already use every core, and a
    decoding process (~5 % of the work) only competes with them and costs its start-up, unless cores abound."""
    cores = os.cpu_count() or 2
    if device_type == "cpu":
        return 0 if cores <= 4 else min(4, cores // 8)
    return min(8, max(1, cores // 2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="foodcap extract", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default="./data", help="caption file, or the folder holding it (default ./data)")
    g.add_argument("--image_dir", default=None, help="image folder (default: beside the caption file, or its "
                   "images/ or dataset/ sub-folder)")
    g.add_argument("--format", default=None, choices=("kaggle", "table", "coco", "karpathy", "imagefolder", "txt"),
                   help="caption file layout (default: detected)")
    g.add_argument("--image_column", default=None, help="image column of a CSV/TSV/JSONL (default: guessed)")
    g.add_argument("--caption_column", default=None, help="caption column of a CSV/TSV/JSONL (default: guessed)")
    g.add_argument("--token_limit", type=int, default=None, help="drop captions longer than this many GPT-2 tokens")
    g.add_argument("--test_size", type=float, default=None, help="test split by image: a fraction, or a count "
                   ">= 1 (default 0.1; ignored when the dataset defines splits)")
    g.add_argument("--val_size", type=float, default=None, help="validation split by image (default 0)")
    g.add_argument("--seed", type=int, default=42, help="seed of the split (default 42)")
    g = p.add_argument_group("encoder")
    g.add_argument("--clip_model_type", default="RN50x4", help="RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B/32, "
                   "ViT-B/16, ViT-L/14, ViT-L/14@336px, open_clip 'model:pretrained', 'model:/path/weights.pt', "
                   "'tiny' (offline random weights); default RN50x4")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    g.add_argument("--batch_size", type=int, default=32, help="images per encoder call (default 32)")
    # the choices are encoder_tuning.PRECISIONS, written out so building the parser does not import torch
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto (default): fp16 on CUDA, bf16 on CPUs with AMX (Xeon Sapphire Rapids+, ~3x faster), "
                   "else fp32; fp32 for full precision")
    g.add_argument("--fast_jpeg", action=argparse.BooleanOptionalAction, default=True,
                   help="decode JPEGs at the smallest DCT scale keeping 2x the encoder's input size (default on: "
                   "~3x faster on 12 MP photos, embeddings move ~1e-4 of their scale); --no-fast_jpeg: full size")
    g.add_argument("--num_workers", type=int, default=None, help="image-decoding worker processes (default: half "
                   "the CPU cores, at most 8, on a GPU; on a CPU none up to 4 cores, else cores/8, at most 4)")
    g = p.add_argument_group("output")
    g.add_argument("--out_dir", default=".", help="where the stores go (default: the current folder)")
    g.add_argument("--output_prefix", default=None, help="file name prefix (default: <clip model>_RN, as the seed)")
    g.add_argument("--output_format", default="pkl", choices=("pkl", "safetensors"),
                   help="pkl (default): ClipCap layout; safetensors: safe, memory-mapped, for large sets")
    g = p.add_argument_group("resume and sharding")
    g.add_argument("--resume", action="store_true", help="resume an interrupted run (the default; kept for clarity)")
    g.add_argument("--no_resume", action="store_true", help="discard partial results and start again")
    g.add_argument("--save_every", type=int, default=20, help="batches per progress chunk on disk (default 20)")
    g.add_argument("--num_shards", type=int, default=None,
                   help="split the images into N disjoint shards (default 1; WORLD_SIZE under torchrun)")
    g.add_argument("--shard_index", type=int, default=None,
                   help="which shard this process extracts (default 0; RANK under torchrun)")
    g.add_argument("--merge", action="store_true", help="join finished shards into the final stores")
    g.add_argument("--keep_parts", action="store_true", help="keep the per-batch parts folder after writing")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def output_prefix(clip_model: str) -> str:
    """The seed's naming: `RN50x4` -> `RN50x4_RN`, `ViT-B/32` -> `ViT-B_32_RN`; weight paths use the file stem."""
    arch, _, source = clip_model.partition(":")
    if source and ("/" in source or "\\" in source or "." in Path(source).name):
        arch = f"{arch}_{Path(source).stem}"
    elif source:
        arch = f"{arch}_{source}"
    return re.sub(r"[^A-Za-z0-9@.+-]+", "_", arch.replace("/", "_")) + "_RN"


def launched_shards(args) -> bool:
    """Fill --num_shards/--shard_index from torchrun's WORLD_SIZE/RANK when not given; True if torchrun set them."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    from_launcher = args.num_shards is None and world > 1 and "RANK" in os.environ
    if from_launcher:
        args.num_shards, args.shard_index = world, int(os.environ["RANK"])
        if args.device == "auto" and "LOCAL_RANK" in os.environ:
            import torch

            if torch.cuda.is_available():  # one GPU per process, not every process on the first GPU
                args.device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    args.num_shards = 1 if args.num_shards is None else args.num_shards
    args.shard_index = 0 if args.shard_index is None else args.shard_index
    return from_launcher


def _wait_for_every_shard() -> bool:
    """Barrier over torchrun's processes (gloo; no GPU needed); False when no process group can be formed."""
    import datetime

    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ:
        return False
    try:
        created = not dist.is_initialized()
        if created:
            # Shards can finish hours apart on uneven data: a long timeout, as the barrier only waits.
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
        dist.barrier()
        if created:
            dist.destroy_process_group()
        return True
    except (RuntimeError, ValueError) as exc:
        log.warning("could not wait for the other shards (%s)", exc)
        return False


def absolute_weights(clip_model: str) -> str:
    """`RN50x4:./w.pt` -> `RN50x4:/abs/w.pt`: the name is recorded in the store, and predict.py may run elsewhere."""
    arch, sep, source = clip_model.partition(":")
    if sep and arch not in ("hf-hub", "local-dir", "random") and source and Path(source).expanduser().is_file():
        return f"{arch}:{Path(source).expanduser().resolve()}"
    return clip_model


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..utils import setup_logging

    setup_logging(args.verbose)
    try:
        return _run(args)
    except KeyboardInterrupt:
        log.error("interrupted; finished batches are saved, rerun the same command to resume")
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        log.error("%s", exc)
        return 2


def _run(args) -> int:
    from ..datasets import DatasetError, read_dataset
    from ..extraction import plan_extraction
    from ..extractor import bad_report, build_stores, merge_parts, run_shard
    from ..features import save_features

    from_launcher = launched_shards(args)
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard_index must be in [0, --num_shards={args.num_shards})")
    if args.merge and from_launcher and args.shard_index != 0:
        return 0  # `torchrun ... --merge`: one process merges (the others would race it on the same files)
    dataset = read_dataset(args.data_path, args.format, args.image_dir, args.image_column, args.caption_column)
    plan = plan_extraction(dataset.records, token_limit=args.token_limit, test_size=args.test_size,
                           val_size=args.val_size, seed=args.seed)
    if not plan.images:
        raise DatasetError(f"{dataset.caption_file}: no captions left to extract ({plan.counts})")
    if not any(os.path.isfile(p) for p in plan.images[:: max(1, len(plan.images) // 500)]):
        raise DatasetError(f"none of the images of {dataset.caption_file} exist (e.g. {plan.images[0]}); "
                           "pass the image folder with --image_dir")
    out_dir = Path(args.out_dir)
    prefix = args.output_prefix or output_prefix(args.clip_model_type)
    args.clip_model_type = absolute_weights(args.clip_model_type)
    parts = out_dir / f"{prefix}_parts"
    if not args.merge:
        from ..encoders import load_encoder

        encoder = load_encoder(args.clip_model_type, device=args.device, precision=args.precision)
        if args.num_shards > 1 and args.precision == "auto" and encoder.device.type == "cpu":
            log.warning("--precision auto gave %s on this CPU; shards run on CPUs with and without AMX would get "
                        "bf16 and fp32 and could not be merged: pass --precision explicitly", encoder.precision)
        workers = args.num_workers if args.num_workers is not None else _default_workers(encoder.device.type)
        log.info("encoding on %s in %s with %d decoding workers", encoder.device, encoder.precision, workers)
        shard = run_shard(plan, encoder, parts, batch_size=args.batch_size, num_workers=workers,
                          shard_index=args.shard_index, num_shards=args.num_shards, save_every=args.save_every,
                          resume=not args.no_resume, fast_jpeg=args.fast_jpeg)
        if shard.seconds:
            log.info("encoded %d images in %.1f s (%.1f images/s)", shard.encoded, shard.seconds,
                     shard.encoded / shard.seconds)
        if from_launcher and _wait_for_every_shard():
            if args.shard_index != 0:
                return 0  # rank 0 merges
        elif args.num_shards > 1:
            log.info("shard %d of %d done in %s; when every shard is done run the same command with --merge",
                     args.shard_index, args.num_shards, parts)
            return 0
    merged = merge_parts(plan, parts, encoder_name=args.clip_model_type, batch_size=args.batch_size,
                         num_shards=args.num_shards)
    from ..encoders import encoder_width

    info = merged.encoder
    dim = int(info.get("clip_dim") or encoder_width(args.clip_model_type) or 0)
    meta = {"clip_model": args.clip_model_type, "clip_precision": info.get("precision"),
            "fast_jpeg": info.get("fast_jpeg"),
            "image_size": info.get("image_size"),
            "preprocess": info.get("preprocess"), "dataset": str(dataset.caption_file), "format": dataset.format,
            **plan.settings}
    stores = build_stores(plan, merged, meta, dim)
    written = {}
    for split, store in stores.items():
        written[split] = str(save_features(store, out_dir / f"{prefix}_{split}.{args.output_format}"))
    for split in ("train", "val", "test"):
        stale = out_dir / f"{prefix}_{split}.{args.output_format}"
        if split not in stores and stale.exists():
            # train.py would take a left-over split of an earlier run as validation data (its images may now be in train).
            log.warning("removing %s: left from an earlier run, this one makes no %s split", stale, split)
            stale.unlink()
    skipped = bad_report(plan, merged)
    report = {"clip_model": args.clip_model_type, "clip_dim": dim, "clip_precision": info.get("precision"),
              "dataset": str(dataset.caption_file),
              "image_dir": str(dataset.image_dir), "format": dataset.format,
              "counts": {**dataset.counts, **plan.counts, "bad_images": len(skipped)},
              "outputs": {s: {"path": written[s], "images": st.num_images, "captions": len(st)}
                          for s, st in stores.items()},
              "skipped": skipped, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    from ..utils import write_atomic

    report_path = write_atomic(out_dir / f"{prefix}_report.json", json.dumps(report, indent=1, ensure_ascii=False))
    if not args.keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    reasons = {}
    for item in skipped:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    summary = ", ".join(f"{s}: {st.num_images} images / {len(st)} captions -> {written[s]}" for s, st in stores.items())
    dropped = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "none"
    print(f"extracted {summary}; skipped images: {dropped}; empty captions: {dataset.counts.get('empty', 0)}, "
          f"over token limit: {plan.counts.get('over_token_limit', 0)}; report: {report_path}", file=sys.stderr)
    return 0
