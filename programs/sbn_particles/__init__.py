"""VIMCO vs NVIL vs RWS on the digits SBN as K grows (Mnih & Rezende 2016).

:mod:`.model` holds the multi-sample NVIL loss, the estimators (VIMCO and
RWS are :mod:`programs.sbn`'s) and the exact held-out bounds by enumeration;
:mod:`.experiment` the vectorised training of several seeds, the sweep over
K and :func:`run`. Run it with ``python -m programs sbn_particles``.
"""

from programs.sbn_particles.experiment import (
    DESCRIPTION,
    NUM_SEEDS,
    SMOKE_CONFIG,
    STEPS,
    ConfigResult,
    configurations,
    initial_log_likelihood,
    paired_difference,
    plot,
    run,
    slope_in_log_k,
    sweep,
    train_configuration,
    train_replicates,
)
from programs.sbn_particles.model import (
    ESTIMATORS,
    MIN_PARTICLES,
    PARTICLE_GRID,
    exact_bounds,
    exact_bounds_replicates,
    make_estimator,
    multisample_nvil_loss,
)

__all__ = [
    "DESCRIPTION",
    "ESTIMATORS",
    "MIN_PARTICLES",
    "NUM_SEEDS",
    "PARTICLE_GRID",
    "SMOKE_CONFIG",
    "STEPS",
    "ConfigResult",
    "configurations",
    "exact_bounds",
    "exact_bounds_replicates",
    "initial_log_likelihood",
    "make_estimator",
    "multisample_nvil_loss",
    "paired_difference",
    "plot",
    "run",
    "slope_in_log_k",
    "sweep",
    "train_configuration",
    "train_replicates",
]
