"""The `foodcap` console script: one entry point, one sub-command per job.

    foodcap extract --clip_model_type RN50x4 --data_path ./food   # = parse_food.py
    foodcap train --data ./RN50x4_RN_train.pkl --out_dir ./model_checkpoints   # = train.py
    foodcap predict --load_pt ./model_checkpoints/best --img Images/   # = predict.py
    foodcap evaluate | demo | stats | serve
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from . import __version__

# sub-command -> module in foodcap.commands exposing main(argv) -> int
COMMANDS = {
    "extract": ("extract", "extract CLIP features from a captioned image set (parse_food.py)"),
    "train": ("train", "train the mapping network (train.py)"),
    "predict": ("predict", "caption images (predict.py)"),
    "evaluate": ("evaluate", "caption a held-out split and score it (BLEU, METEOR, ROUGE-L, CIDEr, CLIPScore)"),
    "demo": ("demo", "the offline end-to-end demo on a synthetic food dataset"),
    "stats": ("stats", "caption-length histogram and word cloud of a dataset"),
    "serve": ("serve", "web app and HTTP API"),
}


def _usage() -> str:
    lines = [f"usage: foodcap <command> [options]   (foodcap {__version__})", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`foodcap <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"foodcap {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"foodcap: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"foodcap.commands.{COMMANDS[name][0]}")
    return int(module.main(rest) or 0)
