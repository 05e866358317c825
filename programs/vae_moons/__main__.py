"""Runs ``python -m programs vae_moons``."""

import sys

from programs.__main__ import main_for

if __name__ == "__main__":
    sys.exit(main_for("vae_moons"))
