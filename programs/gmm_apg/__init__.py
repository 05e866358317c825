"""Amortised population Gibbs on 2-D Gaussian mixtures (Wu et al. 2020).

:mod:`.model` holds the model, the learned Gibbs kernels, their networks
and the APG program; :mod:`.experiment` the simulated data, the exact
Gibbs kernels (the reference), training, evaluation and :func:`run`;
:mod:`.figure` the figure. ``make_program`` here is the experiment's: the
model's program, or (``params=None`` or ``exact=True``) the exact kernels.
Run it with ``python -m programs gmm_apg``.
"""

from programs.gmm_apg.experiment import (
    BATCH,
    DESCRIPTION,
    EVAL_PARTICLES,
    LEARNING_RATE,
    NUM_SWEEPS,
    NUM_TEST,
    NUM_TRAIN,
    Data,
    clustering_accuracy,
    evaluate,
    exact_assignment_logits,
    exact_kernel_c,
    exact_kernel_mu,
    exact_mean_posterior,
    log_joint,
    loss_fn,
    make_program,
    oracle_accuracy,
    run,
    simulate,
    well_separated,
)
from programs.gmm_apg.figure import best_permutation, plot_figure
from programs.gmm_apg.model import (
    NOISE_SCALE,
    NUM_CLUSTERS,
    NUM_POINTS,
    PRIOR_SCALE,
    GMMKernels,
    init_params,
    kernel_c,
    kernel_mu,
    target,
)

__all__ = [
    "BATCH",
    "DESCRIPTION",
    "EVAL_PARTICLES",
    "LEARNING_RATE",
    "NOISE_SCALE",
    "NUM_CLUSTERS",
    "NUM_POINTS",
    "NUM_SWEEPS",
    "NUM_TEST",
    "NUM_TRAIN",
    "PRIOR_SCALE",
    "Data",
    "GMMKernels",
    "best_permutation",
    "clustering_accuracy",
    "evaluate",
    "exact_assignment_logits",
    "exact_kernel_c",
    "exact_kernel_mu",
    "exact_mean_posterior",
    "init_params",
    "kernel_c",
    "kernel_mu",
    "log_joint",
    "loss_fn",
    "make_program",
    "oracle_accuracy",
    "plot_figure",
    "run",
    "simulate",
    "target",
    "well_separated",
]
