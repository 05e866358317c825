"""``python -m programs.tighter_bounds [--smoke] [--steps R] [--seed S] ...``."""

from programs.tighter_bounds.experiment import main

if __name__ == "__main__":
    main()
