"""``python -m programs.sbn [--estimator NAME] [--steps N] ...``."""

from programs.sbn.experiment import main

if __name__ == "__main__":
    main()
