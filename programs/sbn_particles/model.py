"""Multi-sample objectives for the digits SBN: VIMCO, NVIL and RWS at K particles.

Mnih & Rezende (2016), "Variational Inference for Monte Carlo Objectives",
ICML, https://arxiv.org/abs/1602.06725, train sigmoid belief networks by
maximising the K-sample importance weighted bound
``L^K = E log (1/K) sum_k w_k``, ``w_k = p(x, h_k) / q(h_k | x)``, whose
score-function gradient in the inference network is::

    grad_phi L^K = E[ sum_j L-hat grad_phi log q(h_j | x) ]
                   + E[ sum_j wbar_j grad_phi log w_j ],

with ``L-hat = log (1/K) sum_k w_k`` and ``wbar`` the normalised weights.
The first term's learning signal ``L-hat`` is the same for every sample, so
it cannot tell a good ``h_j`` from a bad one. They compare three ways of
estimating it as K grows:

* VIMCO: per-sample signals ``L-hat - L-hat_{-j}`` with leave-one-out
  baselines (:func:`combinators.loss.vimco_loss`, through
  :func:`programs.sbn.make_estimator`);
* NVIL extended to the multi-sample bound: the shared signal ``L-hat`` centred
  by NVIL's input-dependent baseline ``b(x)`` and moving average ``c`` and
  divided by a moving standard deviation (Mnih & Gregor 2014, "Neural
  Variational Inference and Learning in Belief Networks",
  https://arxiv.org/abs/1402.0030): :func:`multisample_nvil_loss` here. At
  K = 1 it is NVIL on the ELBO (``programs.sbn``'s ``"nvil"``);
* reweighted wake-sleep (Bornschein & Bengio 2015, "Reweighted Wake-Sleep",
  https://arxiv.org/abs/1406.2751; :func:`combinators.loss.rws_loss` through
  :func:`programs.sbn.make_estimator`), which trains ``q`` on a different
  objective.

The network (16 binary latents over 8x8 binarised digits), its programs, the
baseline network and the exact log-likelihood are :mod:`programs.sbn`'s.
:func:`exact_bounds` adds the exact ELBO, so that the inference network's
gap ``KL(q(h | x) || p(h | x)) = log p(x) - ELBO`` is measured exactly too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

import combinators
from combinators import weights
from combinators.estimators import init_signal_moments, update_signal_moments
from combinators.loss import SignalMoments
from combinators.loss.roles import (
    gradient_only,
    normalized_weights,
    proposal_log_prob,
)
from programs import sbn
from programs.sbn.estimators import NVIL_DECAY
from programs.sbn.model import pixel_logits

ESTIMATORS = ("nvil", "vimco", "rws")
PARTICLE_GRID = (1, 2, 5, 10, 50)
#: The fewest particles each estimator is run with: VIMCO's leave-one-out
#: baseline needs two, and RWS's wake-phi gradient at K = 1 is
#: ``grad log q(h | x)`` with ``h ~ q``, zero in expectation (q would not learn).
MIN_PARTICLES = {"nvil": 1, "vimco": 2, "rws": 2}


def multisample_nvil_loss(
    baseline=None, moments: SignalMoments | None = None, *, normalize: bool = False
):
    """Negative K-sample bound with NVIL's shared, centred learning signal.

    Value ``-L-hat`` per data column (summed), ``L-hat = log (1/K) sum_k
    w_k``. Gradient: in the target's parameters ``-sum_k wbar_k grad log
    p(x, h_k)`` (as IWAE and VIMCO); in the proposal's
    ``-sum_k [s (L-hat - b(x) - c) - wbar_k] grad log q(h_k | x)`` with
    ``s = 1 / max(1, sqrt(v))`` if ``normalize`` else 1. With ``s = 1``
    (no normalisation, or ``v <= 1``) it is unbiased for the gradient of the
    bound whatever the baseline, since ``b(x)`` and ``c`` do not depend on
    the samples; normalisation shrinks the score term only. The baseline
    ``b(x)`` learns by regression onto ``L-hat - c`` (a term zero in value).

    Args:
      baseline: ``b(x)``, one value per data column (shape ``(B,)``) or a
        scalar; ``None`` for none. It may carry gradient to its parameters.
      moments: :class:`~combinators.loss.SignalMoments` of ``L-hat - b(x)``
        (``c`` and ``v``); ``None`` for none.
      normalize: divide the centred signal by ``max(1, sqrt(v))``.

    Returns:
      A loss with the shared signature; use it with a detached proposal
      (:func:`programs.sbn.make_program` detaches for non-pathwise losses).

    Raises:
      ValueError: ``normalize=True`` without moments.

    References:
      Mnih & Rezende (2016), https://arxiv.org/abs/1602.06725; Mnih & Gregor
      (2014), https://arxiv.org/abs/1402.0030.
    """
    if normalize and moments is None:
        raise ValueError(
            "multisample_nvil_loss: normalize=True divides by the moving standard "
            "deviation; pass moments=init_signal_moments()."
        )

    def loss(
        q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
    ):
        log_weight = jnp.asarray(incoming_log_weight) + jnp.asarray(
            incremental_log_weight
        )
        _, log_q = proposal_log_prob(q_trace, p_trace)
        fixed = jax.lax.stop_gradient(log_weight)
        log_z = logsumexp(fixed, axis=0) - math.log(log_weight.shape[0])
        centred = log_z
        if moments is not None:
            centred = centred - jax.lax.stop_gradient(moments.mean)
        regression = jnp.zeros(log_z.shape)
        if baseline is not None:
            regression = jnp.square(centred - baseline)
            centred = centred - jax.lax.stop_gradient(baseline)
        if normalize:
            variance = jax.lax.stop_gradient(moments.variance)
            centred = centred / jnp.maximum(1.0, jnp.sqrt(variance))
        score_terms = -centred * gradient_only(log_q)
        if not aggregate:
            num = log_weight.shape[0]
            wbar = normalized_weights(log_weight)
            return -wbar * log_weight + score_terms + gradient_only(regression) / num
        return (
            -weights.log_normalizer(log_weight)
            + jnp.sum(score_terms)
            + jnp.sum(gradient_only(regression))
        )

    loss.__name__ = "multisample_nvil_loss"
    return loss


def make_estimator(name: str, network: sbn.SBN, num_particles: int) -> sbn.Estimator:
    """The training objective ``name`` of the K-sample bound (or RWS) for the SBN.

    ``"vimco"`` and ``"rws"`` are :func:`programs.sbn.make_estimator`'s;
    ``"nvil"`` is :func:`multisample_nvil_loss` with ``programs.sbn``'s
    baseline network, moving-average decay and normalisation. The loss is per
    image; its metrics are ``elbo`` and ``iwae`` (of the minibatch, per
    image) and, for NVIL, the updated ``moments``.

    Args:
      name: one of :data:`ESTIMATORS`.
      network: the SBN.
      num_particles: K, at least :data:`MIN_PARTICLES` ``[name]``.

    Returns:
      A :class:`programs.sbn.Estimator`.

    Raises:
      ValueError: for an unknown name or too few particles.
    """
    if name not in ESTIMATORS:
        raise ValueError(
            f"make_estimator: unknown estimator {name!r}; choose from {ESTIMATORS}."
        )
    if not isinstance(num_particles, int) or num_particles < MIN_PARTICLES[name]:
        raise ValueError(
            f"make_estimator: {name} needs at least {MIN_PARTICLES[name]} "
            f"particles, got {num_particles!r}."
        )
    if name != "nvil":
        return sbn.make_estimator(name, network, num_particles)
    k = num_particles

    def loss_fn(params, key, x, moments):
        b = sbn.baseline_apply(params["baseline"], x)
        loss = multisample_nvil_loss(b, moments, normalize=True)
        program = sbn.make_program(network, params, k, loss)
        _, _, metrics = combinators.traced_evaluate(program, seed=key)(x)
        num_data = x.shape[0]
        log_weight = jax.lax.stop_gradient(metrics["log_weight"])
        log_z = logsumexp(log_weight, axis=0) - math.log(k)
        summaries = {
            "elbo": jnp.mean(log_weight),
            "iwae": jnp.mean(log_z),
            "moments": update_signal_moments(moments, log_z - b, NVIL_DECAY),
        }
        return metrics["loss"] / num_data, summaries

    state = {"moments": init_signal_moments()}
    return sbn.Estimator(name, loss_fn, state, True, False, k)


def exact_bounds(network: sbn.SBN, params: Mapping, x, chunk: int = 4096):
    """Exact ``log p(x_n)`` and ELBO of ``q`` per image, by enumerating ``2^H`` states.

    ``log p(x) = log sum_h p(h) p(x | h)`` and
    ``ELBO = sum_h q(h | x) [log p(x, h) - log q(h | x)]``; their difference
    is ``KL(q(h | x) || p(h | x))``. The states are visited ``chunk`` at a
    time, so memory is ``O(chunk * (N + D))``.

    Args:
      network: the SBN (at most 20 latent units).
      params: ``{"p", "q", ...}`` (see :func:`exact_bounds_replicates` for
        several parameter sets at once).
      x: binary images ``(N, D)``.
      chunk: states per block (reduced to ``2^H`` if larger).

    Returns:
      ``(log_likelihood, elbo)``, each of shape ``(N,)``.

    Raises:
      ValueError: for more than 20 latent units.
    """
    chunk = _check_enumerable("exact_bounds", network, chunk)
    return _exact_bounds(network, params["p"], params["q"], jnp.asarray(x), chunk)


def exact_bounds_replicates(
    network: sbn.SBN, params: Mapping, x, chunk: int = 4096
) -> tuple[jax.Array, jax.Array]:
    """:func:`exact_bounds` of ``S`` parameter sets stacked on a leading axis.

    Returns:
      ``(log_likelihood, elbo)``, each of shape ``(S, N)``.
    """
    chunk = _check_enumerable("exact_bounds_replicates", network, chunk)
    return _exact_bounds_replicates(
        network, params["p"], params["q"], jnp.asarray(x), chunk
    )


def _check_enumerable(where, network, chunk):
    if network.num_latent > 20:
        raise ValueError(
            f"{where}: enumerating 2^{network.num_latent} states is too "
            f"expensive (at most 20 latent units)."
        )
    return min(chunk, 2**network.num_latent)


def _bounds(network, p, q, x, chunk):
    bits = jnp.arange(network.num_latent)
    prior = network.model.prior(p)
    # q(h | x) is Bernoulli(logits).to_event(1) (programs.sbn.make_sbn).
    q_logits = network.guide.distribution_fn(q, x).base_dist.logits  # (N, H)
    q_norm = jnp.sum(jax.nn.softplus(q_logits), axis=-1)  # (N,)

    def block(carry, start):
        log_z, elbo = carry
        index = start + jnp.arange(chunk)
        states = ((index[:, None] >> bits) & 1).astype(x.dtype)  # (S, H)
        logits = pixel_logits(p, states)  # (S, D)
        log_lik = x @ logits.T - jnp.sum(jax.nn.softplus(logits), axis=-1)  # (N, S)
        log_joint = prior.log_prob(states) + log_lik
        log_q = q_logits @ states.T - q_norm[:, None]  # (N, S)
        elbo = elbo + jnp.sum(jnp.exp(log_q) * (log_joint - log_q), axis=-1)
        return (jnp.logaddexp(log_z, logsumexp(log_joint, axis=-1)), elbo), None

    starts = jnp.arange(0, 2**network.num_latent, chunk)
    init = (jnp.full(x.shape[:1], -jnp.inf), jnp.zeros(x.shape[:1]))
    (log_z, elbo), _ = jax.lax.scan(block, init, starts)
    return log_z, elbo


_STATIC = ("network", "chunk")
_exact_bounds = jax.jit(_bounds, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _exact_bounds_replicates(network, p, q, x, chunk):
    return jax.vmap(lambda p, q: _bounds(network, p, q, x, chunk))(p, q)
