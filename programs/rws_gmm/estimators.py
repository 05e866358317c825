"""The six training objectives of the GMM experiment, from the library's losses.

Each estimator is a scalar surrogate ``objective(params, key, x,
temperature)`` whose gradient in ``params = {"p": theta, "q": phi}`` is
the estimator's update direction, per data point of the minibatch ``x``
(shape ``(B,)``); ``temperature`` is used by ``"concrete"`` only. For the
wake-sleep family the surrogate is a sum of a ``theta`` loss without
gradient in ``phi`` and a ``phi`` loss without gradient in ``theta``, so
one Adam over both groups (Adam acts entry by entry) is the authors' two
optimisers.

* ``"ws"``: wake-sleep (Hinton, Dayan, Frey & Neal 1995, "The 'Wake-Sleep'
  Algorithm for Unsupervised Neural Networks", Science 268). As in the
  authors' code, ``theta`` follows the K-particle IWAE gradient
  (:func:`combinators.loss.rws_wake_theta_loss`), and ``phi`` the sleep
  phase on ``K * B`` dreams (:func:`combinators.algo.sleep_phi`).
* ``"rws"``: reweighted wake-sleep (Bornschein & Bengio 2015,
  https://arxiv.org/abs/1406.2751), wake-theta plus wake-phi on the same
  particles, :func:`combinators.loss.rws_loss` (the sum of
  :func:`combinators.loss.rws_wake_theta_loss` and
  :func:`combinators.loss.rws_wake_phi_loss`).
* ``"defensive_rws"``: the same wake-theta; wake-phi with particles drawn
  from the defensive mixture ``(1 - delta) q + delta Uniform``, weighted by
  ``p / q_delta``, and the gradient ``-sum_k wbar_k grad log q_phi(c_k | x)``
  (:func:`defensive_wake_phi_loss`, built here from
  :mod:`combinators.loss.roles`; the library has no defensive loss).
* ``"vimco"``: :func:`combinators.loss.vimco_loss` (Mnih & Rezende 2016,
  https://arxiv.org/abs/1602.06725).
* ``"reinforce"``: the IWAE bound with the plain score-function gradient,
  :func:`iwae_reinforce_loss` (the library's ``reinforce_loss`` is the
  single-sample ELBO's, so this one is built here).
* ``"concrete"``: the Concrete-relaxed IWAE bound (Maddison, Mnih & Teh
  2017, https://arxiv.org/abs/1611.00712), pathwise gradients through
  :func:`combinators.loss.iwae_loss`.

:func:`phi_gradient` is one draw of the gradient in ``phi`` whose spread the
experiment reports (its training scan takes the same gradient of the
objective).

References:
  Le, Kosiorek, Siddharth, Teh & Wood (2019), "Revisiting Reweighted
  Wake-Sleep for Models with Stochastic Control Flow", UAI,
  https://arxiv.org/abs/1805.10469.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

import combinators as coix
from combinators import loss as L
from combinators import weights
from combinators.loss import roles
from programs.rws_gmm.model import (
    LATENT,
    defensive_guide_program,
    dream_program,
    guide_log_prob,
    guide_program,
    model_program,
    relaxed_guide_program,
    relaxed_model_program,
    sleep_guide_program,
)

ESTIMATORS = ("ws", "rws", "defensive_rws", "vimco", "reinforce", "concrete")
LABELS = {
    "ws": "wake-sleep",
    "rws": "RWS",
    "defensive_rws": "defensive RWS",
    "vimco": "VIMCO",
    "reinforce": "REINFORCE",
    "concrete": "Concrete",
}
DEFENSIVE_DELTA = 0.2


# ---------------------------------------------------------------------------
# Losses the library lacks, with the shared signature
# ---------------------------------------------------------------------------


def iwae_reinforce_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Negative IWAE bound with the plain score-function gradient (no baseline).

    Value ``-L`` with ``L = log (1/K) sum_k w_k`` per data column, summed over
    columns. Gradient ``-sum_k wbar_k grad log w_k - L sum_k grad log q(z_k)``
    with ``L`` held fixed: the unbiased score-function gradient of the
    bound, whose learning signal ``L`` is shared by the ``K`` particles
    (:func:`combinators.loss.vimco_loss` subtracts leave-one-out baselines
    from it). Use a detached proposal.

    References:
      Burda, Grosse & Salakhutdinov (2016), https://arxiv.org/abs/1509.00519;
      Williams (1992), "Simple Statistical Gradient-Following Algorithms for
      Connectionist Reinforcement Learning", Machine Learning 8; Le et al.
      (2019), https://arxiv.org/abs/1805.10469.
    """
    log_weight = jnp.asarray(incoming_log_weight) + jnp.asarray(incremental_log_weight)
    _, log_q = roles.proposal_log_prob(q_trace, p_trace)
    fixed = jax.lax.stop_gradient(log_weight)
    signal = logsumexp(fixed, axis=0) - math.log(log_weight.shape[0])
    score_terms = -signal * roles.gradient_only(log_q)
    if not aggregate:
        return -roles.normalized_weights(log_weight) * log_weight + score_terms
    return -weights.log_normalizer(log_weight) + jnp.sum(score_terms)


def defensive_wake_phi_loss(log_q_fn: Callable[[jax.Array], jax.Array]) -> Callable:
    """Wake-phi for particles from a defensive proposal: ``-sum_k wbar_k log q(c_k)``.

    The particles ``c_k`` come from ``q_delta = (1 - delta) q_phi + delta u``
    and ``wbar`` are the normalised weights ``p(x, c_k) / q_delta(c_k)``,
    held fixed; the log density differentiated is that of the inference
    network ``q_phi`` itself, ``log_q_fn(c)``, not of the mixture. Its
    gradient estimates ``grad_phi KL(p(c | x) || q_phi(c | x))``, the same
    quantity as :func:`combinators.loss.rws_wake_phi_loss`, by importance
    sampling from a heavier-tailed proposal.

    Args:
      log_q_fn: ``c -> log q_phi(c | x)`` for the latent's values ``(K, B)``.

    Returns:
      A loss with the shared signature (use a detached proposal).

    References:
      Le et al. (2019), https://arxiv.org/abs/1805.10469;
      Hesterberg (1995), "Weighted average importance sampling and defensive
      mixture distributions", Technometrics 37(2).
    """

    def loss(
        q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
    ):
        del p_trace
        w = roles.normalized_weights(
            jnp.asarray(incoming_log_weight) + incremental_log_weight
        )
        return roles.finish(-(w * log_q_fn(q_trace[LATENT].value)), aggregate)

    loss.__name__ = "defensive_wake_phi_loss"
    return loss


# ---------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------


def _metrics(program, key, x):
    _, _, metrics = coix.traced_evaluate(program, seed=key)(x)
    return metrics


def _per_point(metrics, x):
    return metrics["loss"] / x.shape[0]


def make_objective(name: str, num_particles: int) -> Callable:
    """The estimator ``name`` with K = ``num_particles`` as a surrogate loss.

    Args:
      name: one of :data:`ESTIMATORS`.
      num_particles: K (at least 2 for ``"vimco"``).

    Returns:
      ``objective(params, key, x, temperature) -> (loss, metrics)`` with
      ``loss`` a scalar per data point and ``metrics`` ``{"iwae"}``, the
      K-sample bound per data point of the program that draws from ``q``
      (the relaxed one for ``"concrete"``).

    Raises:
      ValueError: for an unknown name or too few particles.
    """
    if name not in ESTIMATORS:
        raise ValueError(
            f"make_objective: unknown estimator {name!r}; choose from {ESTIMATORS}."
        )
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(
            f"make_objective: num_particles must be a positive int, got "
            f"{num_particles!r}."
        )
    if name == "vimco" and num_particles < 2:
        raise ValueError(
            "make_objective: VIMCO's leave-one-out baselines need K >= 2 particles."
        )
    k = num_particles

    def wake(params, key, x, loss_fn, guide=guide_program):
        proposal = coix.detach(guide(params["q"], k))
        program = coix.propose(model_program(params["p"], k), proposal, loss_fn=loss_fn)
        return _metrics(program, key, x)

    def summary(metrics, x):
        return {"iwae": jax.lax.stop_gradient(metrics["log_Z"]) / x.shape[0]}

    def objective(params, key, x, temperature):
        key_wake, key_phi = jax.random.split(key)
        if name == "concrete":
            program = coix.propose(
                relaxed_model_program(params["p"], k, temperature),
                relaxed_guide_program(params["q"], k, temperature),
                loss_fn=L.iwae_loss,
            )
            metrics = _metrics(program, key_wake, x)
            return _per_point(metrics, x), summary(metrics, x)
        loss_fn = {
            "ws": L.rws_wake_theta_loss,
            "rws": L.rws_loss,
            "defensive_rws": L.rws_wake_theta_loss,
            "vimco": L.vimco_loss,
            "reinforce": iwae_reinforce_loss,
        }[name]
        metrics = wake(params, key_wake, x, loss_fn)
        loss = _per_point(metrics, x)
        if name == "defensive_rws":

            def log_q_fn(c):
                return guide_log_prob(params["q"], x, c)

            defensive = wake(
                params,
                key_phi,
                x,
                defensive_wake_phi_loss(log_q_fn),
                guide=lambda q, num: defensive_guide_program(q, num, DEFENSIVE_DELTA),
            )
            loss = loss + _per_point(defensive, x)
        elif name == "ws":
            num_data = x.shape[0]
            sleep = coix.algo.sleep_phi(
                dream_program(jax.lax.stop_gradient(params["p"]), k, num_data),
                sleep_guide_program(params["q"], k, num_data),
                seed=key_phi,
            )()
            loss = loss + sleep.loss / num_data
        return loss, summary(metrics, x)

    return objective


def phi_gradient(objective: Callable, params, key, x, temperature) -> dict:
    """One draw of the estimator's gradient in ``phi`` at the data ``x``.

    For the wake-sleep family it is the gradient of the ``phi`` loss alone
    (sleep, wake-phi or defensive wake-phi).
    """

    def phi_loss(phi):
        loss, _ = objective({"p": params["p"], "q": phi}, key, x, temperature)
        return loss

    return jax.grad(phi_loss)(params["q"])
