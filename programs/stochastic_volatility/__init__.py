"""A stochastic volatility model: particle MCMC and a learned proposal.

The model and its SMC step programs are in ``model.py``, the exact grid
reference (forward-backward on a fine state grid) in ``grid.py``, and
``experiment.py`` runs PMMH, particle Gibbs / FFBS and the learned proposal
against it. Run it with ``python -m programs stochastic_volatility``.
"""

from programs.stochastic_volatility.experiment import (
    DESCRIPTION,
    SMOKE_CONFIG,
    TRUE_PARAMS,
    filter_runs,
    log_prior,
    prior,
    run,
    run_pmmh,
    smoothed_paths,
)
from programs.stochastic_volatility.grid import (
    GridPosterior,
    forward_backward,
    log_likelihood,
    parameter_posterior,
    state_grid,
)
from programs.stochastic_volatility.model import (
    GRADIENTS,
    PARTICLES,
    Model,
    SVParams,
    init_proposal_params,
    log_z_hat,
    newton_step,
    particle_filter,
    simulate,
    stationary_sd,
    train_proposal,
    vsmc_loss,
)

__all__ = [
    "DESCRIPTION",
    "GRADIENTS",
    "PARTICLES",
    "SMOKE_CONFIG",
    "TRUE_PARAMS",
    "GridPosterior",
    "Model",
    "SVParams",
    "filter_runs",
    "forward_backward",
    "init_proposal_params",
    "log_likelihood",
    "log_prior",
    "log_z_hat",
    "newton_step",
    "parameter_posterior",
    "particle_filter",
    "prior",
    "run",
    "run_pmmh",
    "simulate",
    "smoothed_paths",
    "state_grid",
    "stationary_sd",
    "train_proposal",
    "vsmc_loss",
]
