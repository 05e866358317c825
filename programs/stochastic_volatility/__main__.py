"""``python -m programs.stochastic_volatility [--smoke] [--seed S] [--out DIR]``."""

import sys

from programs.stochastic_volatility.experiment import main

sys.exit(main())
