"""`foodcap stats`: caption-length histogram (GPT-2 tokens) and word cloud of a dataset's captions.

    foodcap stats --data tests/data/Captions.csv --out_dir stats/
    foodcap stats --data ./RN50x4_RN_train.pkl --out_dir stats/
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foodcap stats", description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("--data", required=True,
                        help="caption file (.csv/.tsv with a caption column, .txt, COCO .json) or feature store")
    parser.add_argument("--out_dir", default="./stats", help="where caption_lengths.png, wordcloud.png, stats.json go")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..stats import CaptionFileError, dataset_stats
    from ..utils import setup_logging

    setup_logging(args.verbose)
    try:
        summary = dataset_stats(args.data, args.out_dir)
    except (CaptionFileError, OSError, ValueError) as exc:
        print(f"foodcap stats: {exc}", file=sys.stderr)
        return 2
    print(f"{summary['captions']} captions, {summary['tokens_mean']:.1f} ± {summary['tokens_std']:.1f} GPT-2 tokens "
          f"(min {summary['tokens_min']}, max {summary['tokens_max']})")
    print(f"wrote {summary['histogram']} and {summary['wordcloud']}")
    return 0
