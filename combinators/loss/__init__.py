"""Objectives for training proposals and targets, grouped by family.

Every loss shares one signature (:class:`combinators.types.LossFn`),
``loss_fn(q_trace, p_trace, incoming_log_weight, incremental_log_weight,
aggregate=True)``, where ``q_trace`` is the proposal's trace, ``p_trace``
the (extended) target's trace, and the log weights have the particle layout
(axis 0 indexes particles). They return a scalar to *minimise*; with
``aggregate=False`` they return the per-particle terms whose sum is that
scalar (or, for ``iwae_loss``, has its gradient). ``propose(p, q,
loss_fn=...)`` drives any of them.

Families:

* nested importance sampling (Coix's seven, ``_nested.py``): ``elbo_loss``,
  ``iwae_loss``, ``avo_loss``, ``rws_loss``, ``fkl_loss``, ``rkl_loss``,
  ``apg_loss``;
* score-function (``_score.py``): ``reinforce_loss``, ``nvil_loss`` (with
  ``SignalMoments``), ``vimco_loss``;
* DReG (``_dreg.py``): ``iwae_dreg_loss``, ``rws_dreg_loss``;
* Renyi (``_renyi.py``): ``renyi_loss(alpha)``;
* wake-sleep (``_wake_sleep.py``): ``rws_wake_theta_loss``,
  ``rws_wake_phi_loss``, ``wake_theta_loss``.

Site roles (target, proposal, forward, reverse) are computed in one place,
:mod:`combinators.loss.roles`. Pathwise losses (those that differentiate
through the samples) check, when called, that every latent site of the
proposal is reparameterisable, so the check survives ``functools.partial``
and lambdas.
"""

from combinators.loss._dreg import iwae_dreg_loss, rws_dreg_loss
from combinators.loss._nested import (
    apg_loss,
    avo_loss,
    elbo_loss,
    fkl_loss,
    iwae_loss,
    rkl_loss,
    rws_loss,
)
from combinators.loss._renyi import renyi_loss
from combinators.loss._score import (
    SignalMoments,
    init_signal_moments,
    nvil_loss,
    reinforce_loss,
    update_signal_moments,
    vimco_loss,
)
from combinators.loss._wake_sleep import (
    rws_wake_phi_loss,
    rws_wake_theta_loss,
    wake_theta_loss,
)

__all__ = [
    "SignalMoments",
    "apg_loss",
    "avo_loss",
    "elbo_loss",
    "fkl_loss",
    "init_signal_moments",
    "iwae_dreg_loss",
    "iwae_loss",
    "nvil_loss",
    "reinforce_loss",
    "renyi_loss",
    "rkl_loss",
    "rws_dreg_loss",
    "rws_loss",
    "rws_wake_phi_loss",
    "rws_wake_theta_loss",
    "update_signal_moments",
    "vimco_loss",
    "wake_theta_loss",
]
