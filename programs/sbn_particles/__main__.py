"""``python -m programs.sbn_particles [--smoke] [--steps N] [--seeds S] ...``."""

from programs.sbn_particles.experiment import main

if __name__ == "__main__":
    main()
