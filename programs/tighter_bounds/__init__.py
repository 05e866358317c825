"""Rainforth et al. (2018) and DReG on the Gaussian toy: gradient SNR against K.

:mod:`.model` holds the model ``z ~ N(mu, I)``, ``x | z ~ N(z, I)``, the
inference network ``q(z | x) = N(A x + b, 2/3 I)``, their programs and the
closed forms (marginal, posterior, ELBO, chi-square divergence, the
asymptotic K-sample bound); :mod:`.experiment` the gradient moments, the
signal-to-noise ratios, the sweep over K and :func:`run`. Run it with
``python -m programs tighter_bounds``.
"""

from programs.tighter_bounds.experiment import (
    DESCRIPTION,
    FIT_FROM,
    NUM_DRAWS,
    PARTICLE_GRID,
    SMOKE_CONFIG,
    AggregateSNR,
    GradientMoments,
    Problem,
    aggregate_snr,
    coordinate_snr,
    fit_slope,
    gradient_moments,
    make_problem,
    mean_gradient_check,
    plot,
    run,
    sweep,
)
from programs.tighter_bounds.model import (
    DIM,
    ESTIMATORS,
    NUM_DATA,
    PERTURBATION,
    asymptotic_bound,
    asymptotic_gradient,
    bound_gradient,
    chi_square,
    elbo,
    elbo_gradient,
    likelihood,
    log_marginal,
    make_program,
    optimal_params,
    perturb,
    prior,
    proposal,
    simulate,
)

__all__ = [
    "DESCRIPTION",
    "DIM",
    "ESTIMATORS",
    "FIT_FROM",
    "NUM_DATA",
    "NUM_DRAWS",
    "PARTICLE_GRID",
    "PERTURBATION",
    "SMOKE_CONFIG",
    "AggregateSNR",
    "GradientMoments",
    "Problem",
    "aggregate_snr",
    "asymptotic_bound",
    "asymptotic_gradient",
    "bound_gradient",
    "chi_square",
    "coordinate_snr",
    "elbo",
    "elbo_gradient",
    "fit_slope",
    "gradient_moments",
    "likelihood",
    "log_marginal",
    "make_problem",
    "make_program",
    "mean_gradient_check",
    "optimal_params",
    "perturb",
    "plot",
    "prior",
    "proposal",
    "run",
    "simulate",
    "sweep",
]
