"""Thin shim kept for the ClipCap / food-fork command line: `python predict.py --help` (same as `foodcap predict`)."""
import sys

from foodcap.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
