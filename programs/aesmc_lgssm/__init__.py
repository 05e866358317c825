"""AESMC / VSMC / FIVO vs IWAE for learning a linear-Gaussian state-space model.

Le, Igl, Rainforth, Jin & Wood (2018), "Auto-Encoding Sequential Monte
Carlo", ICLR, https://arxiv.org/abs/1705.10306: their linear-Gaussian
experiment. The model, proposals and objectives are in ``model.py``;
``experiment.py`` trains every method over several seeds and compares them
with the Kalman filter and RTS smoother. Run it with ``python -m programs
aesmc_lgssm``.
"""

from programs.aesmc_lgssm.experiment import (
    DESCRIPTION,
    LABELS,
    SETTINGS,
    SMOKE_CONFIG,
    distance_to_truth,
    draw_chains,
    log_likelihoods,
    mean_se,
    plot,
    posterior_l2,
    run,
    train_chains,
)
from programs.aesmc_lgssm.model import (
    EMISSION_SD,
    INIT_THETA,
    METHODS,
    PARTICLES,
    PROPOSAL_SD,
    TRUE_THETA,
    Model,
    estimate,
    exact_log_likelihood,
    exact_params,
    importance_sampler,
    init_params,
    init_proposal_params,
    loss,
    program_for,
    proposal_smoothing_means,
    simulate,
    smoothing_means,
)

__all__ = [
    "DESCRIPTION",
    "EMISSION_SD",
    "INIT_THETA",
    "LABELS",
    "METHODS",
    "PARTICLES",
    "PROPOSAL_SD",
    "SETTINGS",
    "SMOKE_CONFIG",
    "TRUE_THETA",
    "Model",
    "distance_to_truth",
    "draw_chains",
    "estimate",
    "exact_log_likelihood",
    "exact_params",
    "importance_sampler",
    "init_params",
    "init_proposal_params",
    "log_likelihoods",
    "loss",
    "mean_se",
    "plot",
    "posterior_l2",
    "program_for",
    "proposal_smoothing_means",
    "run",
    "simulate",
    "smoothing_means",
    "train_chains",
]
