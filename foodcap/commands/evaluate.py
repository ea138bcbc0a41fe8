"""`foodcap evaluate`: caption a held-out feature store and score it; writes metrics.json and report.html.

    foodcap evaluate --load_pt ./model_checkpoints/best --data ./RN50x4_RN_test.pkl --out_dir ./eval

The store's CLIP embeddings are captioned directly (no image is re-encoded), captions sharing an image_id
are that image's references. Scores: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, PTB tokenizer),
SPICE when its Stanford CoreNLP jars are installed, CLIPScore and RefCLIPScore with the store's CLIP model.
Metrics that cannot run (no Java, no CoreNLP, no CLIP weights offline) are listed with the reason.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="foodcap evaluate", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--load_pt", required=True, help="checkpoint: a foodcap checkpoint dir, <dir>/best.pt, or a ClipCap .pt")
    p.add_argument("--data", required=True, help="feature store of the held-out split (e.g. ./RN50x4_RN_test.pkl)")
    p.add_argument("--out_dir", default="./eval", help="where metrics.json and report.html go (default ./eval)")
    g = p.add_argument_group("decoding (default: greedy)")
    g.add_argument("--beam", action="store_true", help="beam search instead of greedy decoding")
    g.add_argument("--beam_size", type=int, default=5, help="beams per image with --beam (default 5)")
    g.add_argument("--temp", type=float, default=1.0, help="temperature of beam scores, as in ClipCap (default 1.0)")
    g.add_argument("--max_length", type=int, default=67, help="most tokens per caption (default 67)")
    g.add_argument("--stop_token", default=None, help="text token that ends a caption (default: EOS for foodcap "
                   "checkpoints, '.' for original ClipCap ones)")
    g.add_argument("--no_repeat_ngram_size", type=int, default=0, help="never repeat an n-gram (default 0: off)")
    g.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeated tokens (default 1)")
    g.add_argument("--batch_size", type=int, default=32, help="images per decoding batch")
    g = p.add_argument_group("scoring")
    g.add_argument("--metrics", default="BLEU,METEOR,ROUGE-L,CIDEr,SPICE",
                   help="comma-separated subset of BLEU, METEOR, ROUGE-L, CIDEr, SPICE")
    g.add_argument("--no_clip_score", action="store_true", help="skip CLIPScore / RefCLIPScore")
    g.add_argument("--max_images", type=int, default=None, help="evaluate only the first N images of the store")
    g.add_argument("--images", default=None, help="folder of the split's photos, for the report's thumbnails when the "
                   "store does not record readable paths (e.g. ClipCap .pkl files; `{image_id}.jpg` is looked up)")
    g = p.add_argument_group("model and hardware")
    g.add_argument("--gpt2", default=None, help="GPT-2 for checkpoints that store only the mapper (default: recorded)")
    g.add_argument("--clip_model_type", default=None, help="CLIP model for CLIPScore (default: the store's)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def decoding_from_args(args: argparse.Namespace) -> dict[str, Any]:
    decoding: dict[str, Any] = {"max_new_tokens": args.max_length, "stop_token": args.stop_token,
                                "no_repeat_ngram_size": args.no_repeat_ngram_size,
                                "repetition_penalty": args.repetition_penalty}
    if args.beam:
        decoding.update(num_beams=args.beam_size, temperature=args.temp)
    return decoding


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..checkpoint import CheckpointError
    from ..evaluation import evaluate
    from ..metrics import ALL_METRICS
    from ..utils import setup_logging

    setup_logging(args.verbose)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted({m.upper() for m in metrics} - {m.upper() for m in ALL_METRICS})
    if unknown:
        print(f"foodcap evaluate: unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)}", file=sys.stderr)
        return 2
    from ..decoding import DecodingOptions

    decoding = decoding_from_args(args)
    try:  # bad decoding options fail before the checkpoint and the store are loaded
        DecodingOptions.from_kwargs(**decoding)
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    except (TypeError, ValueError) as exc:
        print(f"foodcap evaluate: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = evaluate(args.load_pt, args.data, args.out_dir, device=args.device, gpt2=args.gpt2,
                          clip_model=args.clip_model_type, metrics=metrics, clip_score=not args.no_clip_score,
                          max_images=args.max_images, images_dir=args.images, batch_size=args.batch_size, **decoding)
    except (CheckpointError, ValueError, OSError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"foodcap evaluate: error: {exc}", file=sys.stderr)
        return 2  # as predict: 2 = the inputs could not be used, nothing was written
    print(json.dumps(result["metrics"], indent=2))
    for name, reason in result["skipped"].items():
        print(f"not computed: {name}: {reason}", file=sys.stderr)
    print(f"{result['num_images']} images; wrote {result['metrics_json']} and {result['report_html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
