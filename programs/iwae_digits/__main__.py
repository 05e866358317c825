"""Runs ``python -m programs iwae_digits``."""

import sys

from programs.__main__ import main_for

if __name__ == "__main__":
    sys.exit(main_for("iwae_digits"))
