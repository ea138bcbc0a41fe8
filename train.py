"""Thin shim kept for the ClipCap / food-fork command line: `python train.py --help` (same as `foodcap train`)."""
import sys

from foodcap.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
