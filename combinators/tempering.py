"""Adaptive tempering schedules as pure array maths.

A tempered SMC sampler moves from ``beta = 0`` (the prior) to ``beta = 1``
(the posterior) through ``prior * likelihood^beta``. From ``beta`` to
``beta'`` the particles' log weights grow by ``(beta' - beta) * loglik``.
The next ``beta'`` is chosen so that a criterion of the new weights hits a
target fraction (Jasra, Stephens, Doucet & Tsagaris 2011, "Inference for
Lévy-driven stochastic volatility models via adaptive sequential Monte
Carlo", Scand. J. Stat.):

* ``"ess"``: the effective sample size of the new weights, ``ESS / N``;
* ``"cess"``: the conditional ESS of the incremental weights under the
  current weights (Zhou, Johansen & Aston 2016, "Towards automatic model
  comparison: an adaptive sequential Monte Carlo approach", JCGS):
  ``(sum_i W_i v_i)^2 / sum_i W_i v_i^2`` with ``v_i`` the incremental
  weights; it measures the step alone, also when the current weights are
  not uniform (no resampling at the previous level).

Both decrease in ``beta'``, so bisection finds the root; when even
``beta' = 1`` keeps the criterion above the target, the schedule ends.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

__all__ = ["CRITERIA", "cess_fraction", "ess_fraction", "next_beta"]

#: The criteria :func:`next_beta` accepts.
CRITERIA = ("ess", "cess")


def ess_fraction(log_weight, increment):
    """``ESS / N`` of ``log_weight + increment``, the worst column.

    Args:
      log_weight: current log weights, particle axis 0.
      increment: incremental log weights, same shape.

    Returns:
      A scalar in ``(0, 1]`` (the minimum over the non-particle axes).
    """
    log_w = log_weight + increment
    n = log_w.shape[0]
    log_ess = 2 * logsumexp(log_w, axis=0) - logsumexp(2 * log_w, axis=0)
    return jnp.min(jnp.exp(log_ess) / n)


def cess_fraction(log_weight, increment):
    """Conditional ESS fraction ``(sum W v)^2 / sum W v^2``, the worst column.

    Args:
      log_weight: current log weights, particle axis 0.
      increment: incremental log weights ``log v``, same shape.

    Returns:
      A scalar in ``(0, 1]``.
    """
    log_w = log_weight - logsumexp(log_weight, axis=0, keepdims=True)
    log_cess = 2 * logsumexp(log_w + increment, axis=0) - logsumexp(
        log_w + 2 * increment, axis=0
    )
    return jnp.min(jnp.exp(log_cess))


def next_beta(
    log_weight,
    log_likelihood,
    beta,
    target: float,
    criterion: str = "ess",
    num_bisections: int = 50,
):
    """The next inverse temperature by bisection on the criterion.

    Args:
      log_weight: the particles' current log weights (particle axis 0).
      log_likelihood: each particle's log-likelihood, same shape.
      beta: the current inverse temperature.
      target: the fraction (in ``(0, 1)``) the criterion should reach.
      criterion: ``"ess"`` or ``"cess"``.
      num_bisections: bisection steps (the error in ``beta'`` is
        ``(1 - beta) / 2^num_bisections``).

    Returns:
      ``beta'`` in ``(beta, 1]``: 1 if the criterion at 1 is at least the
      target, else the largest ``beta'`` found with criterion >= target
      (never equal to ``beta``: at least ``(1 - beta) 2^-num_bisections``
      further, so the schedule always progresses).
    """
    if criterion not in CRITERIA:
        raise ValueError(
            f"next_beta: criterion must be one of {CRITERIA}, got {criterion!r}."
        )
    fraction = ess_fraction if criterion == "ess" else cess_fraction
    # -inf log-likelihoods (a particle outside the likelihood's support)
    # give zero weight for any step; NaN would poison the sums.
    log_likelihood = jnp.where(jnp.isnan(log_likelihood), -jnp.inf, log_likelihood)

    def value(b):
        increment = jnp.where(
            jnp.isneginf(log_likelihood), -jnp.inf, (b - beta) * log_likelihood
        )
        return fraction(log_weight, increment)

    def bisect(_, bounds):
        low, high = bounds
        mid = 0.5 * (low + high)
        ok = value(mid) >= target
        return jnp.where(ok, mid, low), jnp.where(ok, high, mid)

    low, high = jax.lax.fori_loop(
        0, num_bisections, bisect, (jnp.asarray(beta, float), jnp.asarray(1.0))
    )
    found = jnp.maximum(low, beta + (1.0 - beta) * 2.0**-num_bisections)
    return jnp.where(value(1.0) >= target, 1.0, found)
