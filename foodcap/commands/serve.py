"""`foodcap serve`: the captioning web app and its HTTP API (Gradio), on loopback unless told otherwise.

    foodcap serve --load_pt ./model_checkpoints/best                      # http://127.0.0.1:7860
    foodcap serve --load_pt ./model_checkpoints/best --host 0.0.0.0 --port 8080 --max_upload_mb 5

Call it from scripts with gradio_client:
    Client("http://127.0.0.1:7860/").predict([handle_file("dish.jpg")], "beam", 1.0, 0.9, 5, 1, 0, 30,
                                              api_name="/caption")
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from ..utils import setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foodcap serve", description="Serve a captioning web page and a /caption API (Gradio).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--load_pt", required=True,
                        help="checkpoint directory, or an original ClipCap .pt (with --clip_model_type)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on; 0.0.0.0 exposes the app to your network")
    parser.add_argument("--port", type=int, default=7860, help="TCP port")
    parser.add_argument("--max_upload_mb", type=float, default=10.0, help="largest accepted upload, per file")
    parser.add_argument("--max_batch_size", type=int, default=16,
                        help="most images decoded together when requests arrive at once")
    parser.add_argument("--batch_wait_ms", type=float, default=20.0,
                        help="how long a request waits for others to batch with")
    parser.add_argument("--max_images", type=int, default=16, help="most photos in one request")
    parser.add_argument("--max_megapixels", type=float, default=40.0,
                        help="largest photo (width x height) decoded; bigger ones are refused")
    parser.add_argument("--clip_model_type", "--clip_model", dest="clip_model", default=None,
                        help="CLIP encoder (default: the one recorded in the checkpoint), as in predict.py")
    parser.add_argument("--gpt2", default=None, help="GPT-2 name or path, when the checkpoint does not record it")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--fast_jpeg", action=argparse.BooleanOptionalAction, default=True,
                        help="decode JPEGs at the smallest DCT scale keeping 2x CLIP's input size (default on, as "
                        "parse_food.py); --no-fast_jpeg: full size")
    parser.add_argument("--examples", default=None,
                        help="folder of example photos, '' for none; None: the repo's Images/ when present")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def _positive(value: float, flag: str) -> Optional[str]:
    return None if value > 0 else f"{flag} must be positive, got {value:g}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    problems = [_positive(args.max_upload_mb, "--max_upload_mb"), _positive(args.max_batch_size, "--max_batch_size"),
                _positive(args.max_images, "--max_images"), _positive(args.max_megapixels, "--max_megapixels"),
                None if 0 < args.port < 65536 else f"--port must be 1-65535, got {args.port}"]
    for problem in problems:
        if problem:
            print(f"foodcap serve: {problem}", file=sys.stderr)
            return 2

    from pathlib import Path

    from ..captioner import load_captioner
    from ..checkpoint import CheckpointError
    from ..serve import ServeConfig, create_app

    config = ServeConfig(max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                         max_upload_mb=args.max_upload_mb, max_images_per_request=args.max_images,
                         max_pixels=int(args.max_megapixels * 1e6), fast_jpeg=args.fast_jpeg)
    if args.examples is not None:
        config.examples_dir = Path(args.examples) if args.examples else None
        if config.examples_dir is not None and not config.examples_dir.is_dir():
            print(f"foodcap serve: --examples {args.examples}: no such folder", file=sys.stderr)
            return 2
    try:
        captioner = load_captioner(args.load_pt, clip_model=args.clip_model, gpt2=args.gpt2, device=args.device)
        captioner.encoder  # load CLIP now: a wrong or missing encoder fails here, not on the first upload
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as error:
        print(f"foodcap serve: cannot load {args.load_pt}: {error}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the app", args.host)
    app = create_app(captioner, config)
    try:
        app.launch(args.host, args.port, block=True)
    except OSError as error:  # port taken, address not available
        app.close()
        print(f"foodcap serve: cannot listen on {args.host}:{args.port}: {error}; "
              "pick another --port or --host", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
