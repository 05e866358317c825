"""A sigmoid belief network on binarised 8x8 digits, six gradient estimators.

:mod:`.model` holds the SBN, its inference network and their programs;
:mod:`.estimators` the training objectives (REINFORCE, NVIL, VIMCO, RWS,
wake-sleep, Gumbel-softmax); :mod:`.experiment` training, evaluation and
:func:`run`. Run it with ``python -m programs sbn`` (VIMCO) or ``python -m
programs sbn --estimator NAME``.
"""

from programs.sbn.estimators import (
    ESTIMATORS,
    Estimator,
    baseline_apply,
    init_baseline,
    make_estimator,
    proposal_gradient_moments,
    signal_to_noise,
)
from programs.sbn.experiment import (
    DESCRIPTION,
    TrainedSBN,
    evaluate,
    exact_log_likelihood,
    run,
    train_sbn,
)
from programs.sbn.model import (
    SBN,
    dream_program,
    init_params,
    make_program,
    make_sbn,
    sleep_proposal,
)

__all__ = [
    "DESCRIPTION",
    "ESTIMATORS",
    "SBN",
    "Estimator",
    "TrainedSBN",
    "baseline_apply",
    "dream_program",
    "evaluate",
    "exact_log_likelihood",
    "init_baseline",
    "init_params",
    "make_estimator",
    "make_program",
    "make_sbn",
    "proposal_gradient_moments",
    "run",
    "signal_to_noise",
    "sleep_proposal",
    "train_sbn",
]
