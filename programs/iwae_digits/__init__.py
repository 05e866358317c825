"""IWAE vs VAE on binarised 8x8 digits (Burda, Grosse & Salakhutdinov 2016).

:mod:`.model` holds the model (the digits VAE with tanh networks), the VAE
and IWAE objectives and the held-out measures (the k = 5000 bound and the
active units); :mod:`.experiment` the vectorised training of several seeds
with dynamic binarisation and :func:`run`. Run it with ``python -m programs
iwae_digits``.
"""

from programs.iwae_digits.experiment import (
    DESCRIPTION,
    NUM_SEEDS,
    SMOKE_CONFIG,
    STEPS,
    ConfigResult,
    evaluate_replicates,
    paired_difference,
    plot,
    run,
    train_configuration,
    train_replicates,
)
from programs.iwae_digits.model import (
    ACTIVITY_THRESHOLD,
    CONFIGURATIONS,
    EVAL_PARTICLES,
    HIDDEN,
    LATENT_DIM,
    init_params,
    make_model,
    make_objective,
    test_bounds,
    unit_activity,
)

__all__ = [
    "ACTIVITY_THRESHOLD",
    "CONFIGURATIONS",
    "DESCRIPTION",
    "EVAL_PARTICLES",
    "HIDDEN",
    "LATENT_DIM",
    "NUM_SEEDS",
    "SMOKE_CONFIG",
    "STEPS",
    "ConfigResult",
    "evaluate_replicates",
    "init_params",
    "make_model",
    "make_objective",
    "paired_difference",
    "plot",
    "run",
    "test_bounds",
    "train_configuration",
    "train_replicates",
    "unit_activity",
]
