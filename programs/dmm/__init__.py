"""A deep Markov model on noisy rings, trained with variational SMC.

The model, proposal and SMC program are in ``model.py``; ``experiment.py``
holds the data, evaluation and entry point. Run it with ``python -m
programs dmm``.
"""

from programs.dmm.experiment import (
    DESCRIPTION,
    NUM_TEST,
    NUM_TRAIN,
    OBS_NOISE,
    SMOKE_CONFIG,
    Config,
    evaluate,
    filter_batch,
    filter_records,
    generate,
    load_data,
    log_z_columns,
    make_rings,
    oracle_log_lik_per_step,
    run,
)
from programs.dmm.figure import plot
from programs.dmm.linear_gaussian import LinearGaussianDMM
from programs.dmm.model import (
    DMM,
    MIN_SCALE,
    OBS_DIM,
    Emission,
    GatedTransition,
    Proposal,
    bind,
    init_params,
    loss_fn,
    make_smc,
    proposal_step,
    target_step,
)

__all__ = [
    "DESCRIPTION",
    "DMM",
    "MIN_SCALE",
    "NUM_TEST",
    "NUM_TRAIN",
    "OBS_DIM",
    "OBS_NOISE",
    "SMOKE_CONFIG",
    "Config",
    "Emission",
    "GatedTransition",
    "LinearGaussianDMM",
    "Proposal",
    "bind",
    "evaluate",
    "filter_batch",
    "filter_records",
    "generate",
    "init_params",
    "load_data",
    "log_z_columns",
    "loss_fn",
    "make_rings",
    "make_smc",
    "oracle_log_lik_per_step",
    "plot",
    "proposal_step",
    "run",
    "target_step",
]
