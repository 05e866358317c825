"""Runs ``python -m programs tighter_bounds``."""

import sys

from programs.__main__ import main_for

if __name__ == "__main__":
    sys.exit(main_for("tighter_bounds"))
