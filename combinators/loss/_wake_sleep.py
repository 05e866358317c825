"""Wake-sleep objectives: the RWS wake-theta and wake-phi terms, classic wake.

References:
  Hinton, Dayan, Frey & Neal (1995), "The wake-sleep algorithm for
  unsupervised neural networks", Science 268; Bornschein & Bengio (2015),
  "Reweighted Wake-Sleep", https://arxiv.org/abs/1406.2751.
"""

from __future__ import annotations

import jax.numpy as jnp

from combinators.loss.roles import finish, normalized_weights, role_log_probs

__all__ = ["rws_wake_phi_loss", "rws_wake_theta_loss", "wake_theta_loss"]


def rws_wake_theta_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Reweighted wake-theta: ``-sum_k wbar_k log p(x, z_k)`` with ``wbar`` fixed.

    Its gradient ``-sum_k wbar_k grad_theta log p(x, z_k)`` estimates
    ``-grad_theta log p(x)`` (self-normalised, consistent as ``K`` grows).
    Use ``propose(p, q, detach=True, ...)`` or a detached proposal so that no
    gradient reaches the proposal through ``z``. With kernels it is the
    target part of ``rws_loss``: ``rws_loss == rws_wake_theta_loss +
    rws_wake_phi_loss``.

    References:
      Bornschein & Bengio (2015), "Reweighted Wake-Sleep",
      https://arxiv.org/abs/1406.2751.
    """
    _, proposal_lp, _, target_lp = role_log_probs(q_trace, p_trace)
    w = normalized_weights(jnp.asarray(incoming_log_weight) + incremental_log_weight)
    return finish(-(w * (target_lp - proposal_lp)), aggregate)


def rws_wake_phi_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Reweighted wake-phi: ``-sum_k wbar_k log q(z_k)`` with ``wbar`` and ``z`` fixed.

    Its gradient estimates ``grad_phi KL(p(z | x) || q(z | x))``, the
    inclusive KL, for discrete latents too. Use a detached proposal.

    References:
      Bornschein & Bengio (2015), "Reweighted Wake-Sleep",
      https://arxiv.org/abs/1406.2751; Le, Kosiorek, Siddharth, Teh & Wood
      (2019), https://arxiv.org/abs/1805.10469.
    """
    _, _, forward_lp, _ = role_log_probs(q_trace, p_trace)
    w = normalized_weights(jnp.asarray(incoming_log_weight) + incremental_log_weight)
    return finish(-(w * forward_lp), aggregate)


def wake_theta_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Classic wake phase for the model: ``-mean_k log p(x, z_k)``, ``z_k ~ q``.

    The samples are not reweighted, so the gradient is unbiased for the
    ELBO's gradient in ``theta``. Pair it with
    :func:`~combinators.algo.sleep_phi` for the wake-sleep algorithm. Use
    ``detach=True`` or a detached proposal.

    References:
      Hinton, Dayan, Frey & Neal (1995), "The 'Wake-Sleep' Algorithm for
      Unsupervised Neural Networks", Science 268(5214).
    """
    _, proposal_lp, _, target_lp = role_log_probs(q_trace, p_trace)
    w1 = normalized_weights(incoming_log_weight)
    if w1.ndim == 0 and jnp.ndim(target_lp):
        w1 = jnp.full(jnp.shape(target_lp), 1.0 / jnp.shape(target_lp)[0])
    return finish(-(w1 * (target_lp - proposal_lp)), aggregate)
