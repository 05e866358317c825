"""``python -m programs.aesmc_lgssm [--smoke] [--seed S] [--out DIR] [--quiet]``."""

import sys

from programs.aesmc_lgssm.experiment import main

sys.exit(main())
