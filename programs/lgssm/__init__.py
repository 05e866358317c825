"""Particle filters for a linear-Gaussian state-space model.

The filters are in ``model.py``; ``experiment.py`` compares them with the
Kalman filter. Run it with ``python -m programs lgssm``.
"""

from programs.lgssm.experiment import (
    DESCRIPTION,
    FilterEstimates,
    evaluate_filter,
    plot,
    run,
)
from programs.lgssm.gaussian import Gaussian, GaussianFactor, gaussian_factor
from programs.lgssm.model import (
    PARTICLES,
    bootstrap_filter,
    bootstrap_proposal,
    filtering_mean,
    guided_filter,
    guided_proposal,
    initial_target,
    transition_target,
)

__all__ = [
    "DESCRIPTION",
    "PARTICLES",
    "FilterEstimates",
    "Gaussian",
    "GaussianFactor",
    "bootstrap_filter",
    "bootstrap_proposal",
    "evaluate_filter",
    "filtering_mean",
    "gaussian_factor",
    "guided_filter",
    "guided_proposal",
    "initial_target",
    "plot",
    "run",
    "transition_target",
]
