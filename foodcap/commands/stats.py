"""`foodcap stats` (placeholder until its issue lands)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="foodcap stats", description="not implemented yet")


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    print("foodcap stats: not implemented yet", file=sys.stderr)
    return 1
