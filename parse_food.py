"""Thin shim kept for the ClipCap / food-fork command line: `python parse_food.py --help` (same as `foodcap extract`)."""
import sys

from foodcap.commands.extract import main

if __name__ == "__main__":
    sys.exit(main())
