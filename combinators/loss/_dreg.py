"""Doubly reparameterised gradients (DReG) for IWAE and RWS.

References:
  Tucker, Lawson, Gu & Maddison (2019), "Doubly Reparameterized Gradient
  Estimators for Monte Carlo Objectives", https://arxiv.org/abs/1810.04152.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from combinators import weights
from combinators.loss.roles import (
    gradient_only,
    normalized_weights,
    pathwise,
    single_step_target_log_prob,
)

__all__ = ["iwae_dreg_loss", "rws_dreg_loss"]


@pathwise
def iwae_dreg_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Negative IWAE bound with the doubly reparameterised (DReG) gradient.

    Value ``-log (1/K sum_k w_k)`` per column, summed. Gradient in the
    proposal's parameters ``-sum_k wbar_k^2 d log w_k / dz_k dz_k / dphi``
    (the score term of the pathwise gradient rewritten by a second
    reparameterisation), in the target's parameters the IWAE gradient
    ``-sum_k wbar_k grad_theta log p(x, z_k)``. Unbiased for the gradient of
    the bound, and its signal-to-noise ratio does not vanish as ``K`` grows.

    Needs two program transforms, which :func:`~combinators.algo.dreg_iwae` applies:
    ``stick_the_landing(q)`` (``log q`` differentiates only through ``z``)
    and ``propose(..., detach=True)`` (``p_trace`` holds ``log p`` at values
    without gradient, which separates the target's gradient from the
    proposal's). With ``aggregate=False`` the per-particle terms returned sum
    to the loss's gradient, not its value.

    References:
      Tucker, Lawson, Gu & Maddison (2019), "Doubly Reparameterized Gradient
      Estimators for Monte Carlo Objectives",
      https://arxiv.org/abs/1810.04152, Section 3.
    """
    log_weight = jnp.asarray(incoming_log_weight) + jnp.asarray(incremental_log_weight)
    log_p = single_step_target_log_prob("iwae_dreg_loss", q_trace, p_trace)
    wbar = normalized_weights(log_weight)
    terms = -(
        wbar**2 * gradient_only(log_weight) + (wbar - wbar**2) * gradient_only(log_p)
    )
    if not aggregate:
        return terms
    return -jax.lax.stop_gradient(weights.log_normalizer(log_weight)) + jnp.sum(terms)


@pathwise
def rws_dreg_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Reweighted wake-sleep with the DReG wake-phi gradient.

    Gradient in the target's parameters: wake-theta,
    ``-sum_k wbar_k grad_theta log p(x, z_k)``; in the proposal's: the
    wake-phi direction ``-E[sum_k wbar_k grad_phi log q(z_k)]`` estimated by
    ``-sum_k (wbar_k - wbar_k^2) d log w_k / dz_k dz_k / dphi``, which has the
    same expectation as the score-function form of :func:`rws_wake_phi_loss`
    with lower variance. Value: ``-log Z-hat`` (for monitoring). Use
    :func:`~combinators.algo.dreg_rws`, which applies ``stick_the_landing``
    to the proposal and ``detach=True`` to ``propose``.

    References:
      Tucker, Lawson, Gu & Maddison (2019), https://arxiv.org/abs/1810.04152,
      Section 4; Bornschein & Bengio (2015), https://arxiv.org/abs/1406.2751.
    """
    log_weight = jnp.asarray(incoming_log_weight) + jnp.asarray(incremental_log_weight)
    log_p = single_step_target_log_prob("rws_dreg_loss", q_trace, p_trace)
    wbar = normalized_weights(log_weight)
    terms = -(
        (wbar - wbar**2) * gradient_only(log_weight) + wbar**2 * gradient_only(log_p)
    )
    if not aggregate:
        return terms
    return -jax.lax.stop_gradient(weights.log_normalizer(log_weight)) + jnp.sum(terms)
