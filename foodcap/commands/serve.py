"""`foodcap serve` (placeholder until its issue lands)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="foodcap serve", description="not implemented yet")


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    print("foodcap serve: not implemented yet", file=sys.stderr)
    return 1
