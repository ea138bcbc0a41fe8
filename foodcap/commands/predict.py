"""`foodcap predict` / `python predict.py`: caption photos with a trained checkpoint.

    python predict.py --load_pt ./model_checkpoints/best.pt --img Images/inf1.jpg          # sampling, seeded
    python predict.py --beam --temp 0.1 --img Images/ "photos/**/*.jpg" --out captions.csv   # beam search, many images

Prints `path<TAB>caption` per image on stdout (more captions tab-separated with --num_captions); images
that cannot be read are reported on stderr, the others are still captioned, and the exit code is 1
when any failed (2 for a bad checkpoint, bad options or an --out file that cannot be written).
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
OUT_FORMATS = (".json", ".jsonl", ".csv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="foodcap predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load_pt", default="./model_checkpoints/best.pt",
                   help="foodcap checkpoint dir (`<dir>/best.pt` means `<dir>/best/`) or an original ClipCap .pt")
    p.add_argument("--img", nargs="+", default=None, help="image files, folders and/or glob patterns")
    p.add_argument("--eval", action="store_true",
                   help="instead of --img: caption the feature store --data and score it (as `foodcap evaluate`)")
    p.add_argument("--data", default=None, help="with --eval: feature store of the held-out split")
    p.add_argument("--eval_dir", default="./eval", help="with --eval: where metrics.json and report.html go")
    p.add_argument("--eval_images", default=None, help="with --eval: folder of the store's photos, for the "
                   "report's thumbnails when the store does not record them (ClipCap .pkl files)")
    g = p.add_argument_group("decoding (default: nucleus sampling at --temp, seeded)")
    g.add_argument("--beam", action="store_true", help="beam search, ranked as ClipCap ranks it")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (ClipCap's non-beam path)")
    g.add_argument("--temp", type=float, default=1.0, help="temperature of sampling (0: greedy) and of beam scores, as in ClipCap")
    g.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass")
    g.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: no limit)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed: the same command prints the same captions")
    g.add_argument("--beam_size", type=int, default=5, help="beams per image with --beam")
    g.add_argument("--num_captions", type=int, default=1, help="captions per image: the n best beams or n samples")
    g.add_argument("--max_length", type=int, default=67, help="most tokens per caption")
    g.add_argument("--stop_token", default=None, help="text token that ends a caption and stays in it (default: "
                   "EOS for foodcap checkpoints, '.' for original ClipCap ones)")
    g.add_argument("--no_repeat_ngram_size", type=int, default=0, help="never repeat an n-gram (0: off)")
    g.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    g = p.add_argument_group("model and hardware")
    g.add_argument("--clip_model_type", default=None, help="CLIP encoder (default: the one recorded in the "
                   "checkpoint; ClipCap .pt files are guessed from their width)")
    g.add_argument("--gpt2", default=None, help="GPT-2 for checkpoints that store only the mapper (default: recorded)")
    g.add_argument("--normalize_prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise CLIP embeddings before the mapper (default: as recorded in the checkpoint; "
                   "ClipCap's transformer notebook did, its training command did not)")
    g.add_argument("--batch_size", type=int, default=32, help="images per batch")
    g.add_argument("--fast_jpeg", action=argparse.BooleanOptionalAction, default=True,
                   help="decode JPEGs at the smallest DCT scale keeping 2x CLIP's input size (default on, as "
                   "parse_food.py); --no-fast_jpeg: full size")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="GPU autocast precision (auto: bf16 where supported, else fp16)")
    p.add_argument("--out", default=None, help="also write the captions to a .json, .jsonl or .csv file")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def decoding_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags -> decoding options (transformers GenerationConfig names)."""
    common = dict(max_new_tokens=args.max_length, num_return_sequences=args.num_captions, stop_token=args.stop_token,
                  no_repeat_ngram_size=args.no_repeat_ngram_size, repetition_penalty=args.repetition_penalty,
                  precision=args.precision)
    if args.beam and args.greedy:
        raise ValueError("choose one of --beam and --greedy")
    if args.beam:
        return dict(common, num_beams=args.beam_size, temperature=args.temp)
    if args.greedy:
        return dict(common, do_sample=False)
    return dict(common, do_sample=True, temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def expand_images(patterns: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders (their images, sorted) and globs -> image paths in order, without repeats; plus
    (pattern, reason) for patterns that name nothing."""
    paths: dict[str, None] = {}
    unmatched: list[tuple[str, str]] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                unmatched.append((pattern, f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder"))
        elif glob.has_magic(pattern) and not path.is_file():  # "dish[1].jpg" that exists is a file, not a glob
            found = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                unmatched.append((pattern, "no files match this pattern"))
        else:
            found = [str(path)]  # a missing file is reported when it is loaded, with the other bad images
        paths.update(dict.fromkeys(found))
    return list(paths), unmatched


def _one_line(text: str) -> str:
    return " ".join(text.split())  # tabs/newlines a model may emit would break `path<TAB>caption` lines


def write_results(path: Path, results: list[dict], meta: dict) -> None:
    """Atomically write results (each {"image", "captions"} or {"image", "error"}) as .json, .jsonl or .csv."""
    from foodcap.utils import write_atomic

    suffix = path.suffix.lower()
    if suffix == ".json":
        write_atomic(path, json.dumps(dict(meta, results=results), indent=2, ensure_ascii=False) + "\n")
    elif suffix == ".jsonl":
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image", "rank", "caption", "error"])
        for r in results:
            if "error" in r:
                writer.writerow([r["image"], "", "", r["error"]])
            for rank, caption in enumerate(r.get("captions", []), start=1):
                writer.writerow([r["image"], rank, caption, ""])
        write_atomic(path, buffer.getvalue())


def _fail(message: str) -> int:
    print(f"foodcap predict: error: {message}", file=sys.stderr)
    return 2


def _evaluate(args: argparse.Namespace, decoding: dict[str, Any]) -> int:
    from foodcap.checkpoint import CheckpointError
    from foodcap.evaluation import evaluate

    if not args.data:
        return _fail("--eval needs --data <feature store>, e.g. ./RN50x4_RN_test.pkl")
    try:
        result = evaluate(args.load_pt, args.data, args.eval_dir, device=args.device, gpt2=args.gpt2,
                          clip_model=args.clip_model_type, batch_size=args.batch_size,
                          images_dir=args.eval_images, **decoding)
    except (CheckpointError, ValueError, RuntimeError, OSError) as exc:
        return _fail(str(exc))
    print(json.dumps(result["metrics"], indent=2))
    print(f"wrote {result['metrics_json']} and {result['report_html']}", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from foodcap.utils import setup_logging

    setup_logging(args.verbose)
    from foodcap.captioner import load_captioner
    from foodcap.checkpoint import CheckpointError
    from foodcap.decoding import DecodingOptions, caption_embeddings, encode_pil_images
    from foodcap.images import BadImageError, load_image

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in OUT_FORMATS:
        return _fail(f"--out {out}: unknown format {out.suffix!r}; use one of {', '.join(OUT_FORMATS)}")
    if args.batch_size < 1:
        return _fail("--batch_size must be >= 1")
    try:
        decoding = decoding_kwargs(args)
        DecodingOptions.from_kwargs(**decoding)
    except (TypeError, ValueError) as exc:
        return _fail(str(exc))
    if args.eval:
        return _evaluate(args, decoding)
    if not args.img:
        return _fail("--img is required (or --eval --data <feature store> to score a held-out split)")
    try:
        captioner = load_captioner(args.load_pt, clip_model=args.clip_model_type, gpt2=args.gpt2, device=args.device)
        if args.normalize_prefix is not None:
            captioner.model.config.normalize_prefix = args.normalize_prefix
        encoder = captioner.encoder  # builds the encoder and checks its width before any image is read
    except (CheckpointError, ValueError, RuntimeError, OSError) as exc:
        return _fail(str(exc))

    paths, unmatched = expand_images(args.img)
    failures: list[tuple[str, str]] = list(unmatched)
    for pattern, reason in unmatched:
        print(f"foodcap predict: skipped {pattern}: {reason}", file=sys.stderr)
    results: list[dict] = []
    min_side = encoder.jpeg_min_side(args.fast_jpeg)
    from tqdm import tqdm

    with tqdm(total=len(paths), desc="captioning", unit="img", disable=None, file=sys.stderr) as bar:
        for start in range(0, len(paths), args.batch_size):
            entries, images = [], []  # entries keep input order; good ones get their captions below
            for path in paths[start:start + args.batch_size]:
                try:
                    images.append(load_image(path, min_side=min_side))
                    entries.append({"image": path})
                except BadImageError as exc:
                    failures.append((path, exc.reason))
                    entries.append({"image": path, "error": str(exc)})
                    print(f"foodcap predict: skipped {exc}", file=sys.stderr)
            if images:
                embeddings = encode_pil_images(encoder, images, args.batch_size)
                captions = iter(caption_embeddings(captioner, embeddings, batch_size=args.batch_size, **decoding))
                for entry in entries:
                    if "error" in entry:
                        continue
                    caps = next(captions)
                    caps = [_one_line(c) for c in (caps if isinstance(caps, list) else [caps])]
                    entry.update(caption=caps[0], captions=caps)
                    print("\t".join([entry["image"], *caps]), flush=True)
            results += entries
            bar.update(len(paths[start:start + args.batch_size]))

    if out is not None:
        meta = {"checkpoint": str(args.load_pt), "clip_model": captioner.clip_model, "decoding": decoding}
        try:
            write_results(out, results + [{"image": p, "error": r} for p, r in unmatched], meta)
        except OSError as exc:  # the captions are on stdout already; say why the file is missing
            return _fail(f"--out {out}: cannot write it ({exc}); choose a writable path")
        log.info("wrote %d results to %s", len(results), out)
    if failures:
        print(f"foodcap predict: {len(failures)} of {len(paths) + len(unmatched)} inputs failed", file=sys.stderr)
        return 1
    if not paths:
        return _fail("no images given")
    return 0
