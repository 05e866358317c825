"""Gradient estimators beyond Coix's losses (compatibility module).

The losses live in :mod:`combinators.loss` (by family: ``_score``,
``_dreg``, ``_renyi``, ``_wake_sleep``) and the program builders (``vimco``,
``dreg_iwae``, ``dreg_rws``, ``sleep_phi``) in :mod:`combinators.algo`;
this module re-exports both under their historical names.

Two families:

* **Score-function** estimators (``reinforce_loss``, ``nvil_loss``,
  ``vimco_loss``, the wake-sleep terms) work for discrete latents; use them
  with a detached proposal, ``propose(p, detach(q), loss_fn=...)``.
* **Pathwise** estimators (``renyi_loss``, ``iwae_dreg_loss``,
  ``rws_dreg_loss``) differentiate through reparameterised samples and
  refuse non-reparameterisable proposals when called. Continuous
  relaxations of discrete latents live in :mod:`combinators.relaxed`.
"""

from combinators.algo import SleepPhase, dreg_iwae, dreg_rws, sleep_phi, vimco
from combinators.loss import (
    SignalMoments,
    init_signal_moments,
    iwae_dreg_loss,
    nvil_loss,
    reinforce_loss,
    renyi_loss,
    rws_dreg_loss,
    rws_wake_phi_loss,
    rws_wake_theta_loss,
    update_signal_moments,
    vimco_loss,
    wake_theta_loss,
)

__all__ = [
    "SignalMoments",
    "SleepPhase",
    "dreg_iwae",
    "dreg_rws",
    "init_signal_moments",
    "iwae_dreg_loss",
    "nvil_loss",
    "reinforce_loss",
    "renyi_loss",
    "rws_dreg_loss",
    "rws_wake_phi_loss",
    "rws_wake_theta_loss",
    "sleep_phi",
    "update_signal_moments",
    "vimco",
    "vimco_loss",
    "wake_theta_loss",
]
