"""``python -m programs.rws_gmm [--steps N] [--seeds S] [--estimator NAME] ...``."""

from programs.rws_gmm.experiment import main

if __name__ == "__main__":
    main()
