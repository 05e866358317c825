"""Runs ``python -m programs digits_vae``."""

import sys

from programs.__main__ import main_for

if __name__ == "__main__":
    sys.exit(main_for("digits_vae"))
