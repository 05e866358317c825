"""Runs ``python -m programs rws_gmm``."""

import sys

from programs.__main__ import main_for

if __name__ == "__main__":
    sys.exit(main_for("rws_gmm"))
