"""Score-function estimators: REINFORCE, NVIL and VIMCO.

They work for discrete latents. Their gradient in the proposal's
parameters ``phi`` is built from ``grad_phi log q(z)`` with the values ``z``
held fixed, so use them with a detached proposal, ``propose(p, detach(q),
loss_fn=...)``. The proposal must be an unweighted program: a ``resample``
inside it would need a score term for the ancestor indices, which these
losses do not add. Stateful estimators (NVIL's moving averages) are
factories; ``combinators.util.train`` feeds a metric back into the keyword
argument of the same name after each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from combinators import weights
from combinators.loss.roles import (
    finish,
    gradient_only,
    normalized_weights,
    proposal_log_prob,
)

__all__ = [
    "SignalMoments",
    "init_signal_moments",
    "nvil_loss",
    "reinforce_loss",
    "update_signal_moments",
    "vimco_loss",
]


class SignalMoments(NamedTuple):
    """Exponential moving averages of a learning signal (NVIL's ``c`` and ``v``).

    Attributes:
      mean: moving average of the signal, a data-independent baseline.
      variance: moving average of its variance across a batch, used to
        normalise the signal.
    """

    mean: jax.Array
    variance: jax.Array


def init_signal_moments() -> SignalMoments:
    """Moments before any step: mean 0, variance 1 (no normalisation yet)."""
    return SignalMoments(mean=jnp.zeros(()), variance=jnp.ones(()))


def update_signal_moments(
    moments: SignalMoments, signal, decay: float = 0.9
) -> SignalMoments:
    """One moving-average step of NVIL's signal statistics.

    ``mean <- decay * mean + (1 - decay) * mean(signal)`` and likewise for the
    variance of ``signal`` over its entries (particles and data points).
    Pass the signal *minus any input-dependent baseline*, e.g.
    ``metrics.log_weight - baseline``.

    Args:
      moments: the current moments.
      signal: learning signals (any shape); no gradient flows into them.
      decay: the moving-average decay in ``[0, 1)``.

    Returns:
      The updated :class:`SignalMoments`.

    References:
      Mnih & Gregor (2014), "Neural Variational Inference and Learning in
      Belief Networks", https://arxiv.org/abs/1402.0030, Section 3.3 and
      Algorithm 1.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(
            f"update_signal_moments: decay must be in [0, 1), got {decay!r}."
        )
    signal = jax.lax.stop_gradient(jnp.asarray(signal))
    batch_mean = jnp.mean(signal)
    batch_variance = jnp.mean(jnp.square(signal - batch_mean))
    return SignalMoments(
        mean=decay * moments.mean + (1.0 - decay) * batch_mean,
        variance=decay * moments.variance + (1.0 - decay) * batch_variance,
    )


def _score_function_elbo(
    where,
    q_trace,
    p_trace,
    incoming_log_weight,
    incremental_log_weight,
    aggregate,
    *,
    baseline=None,
    moments=None,
    normalize=False,
):
    layout, log_q = proposal_log_prob(q_trace, p_trace)
    signal = jnp.asarray(incremental_log_weight)
    w1 = normalized_weights(incoming_log_weight)
    if w1.ndim == 0:
        w1 = jnp.broadcast_to(w1, signal.shape)
    fixed_signal = jax.lax.stop_gradient(signal)
    centred = fixed_signal
    if moments is not None:
        centred = centred - jax.lax.stop_gradient(moments.mean)
    regression = jnp.zeros(signal.shape)
    if baseline is not None:
        baseline = jnp.asarray(baseline)
        try:
            shape = jnp.broadcast_shapes(jnp.shape(baseline), signal.shape)
        except ValueError:
            shape = None
        if shape != signal.shape:
            raise ValueError(
                f"{where}: the baseline has shape {jnp.shape(baseline)}, which "
                f"does not broadcast to the log weights' shape {signal.shape} "
                f"(particles first, then data columns); give one baseline per "
                f"data column (shape {signal.shape[1:]}) or a scalar."
            )
        # The baseline network regresses onto the signal it has to predict.
        regression = jnp.square(centred - baseline)
        centred = centred - jax.lax.stop_gradient(baseline)
    if normalize:
        if moments is None:
            raise ValueError(
                f"{where}: normalize=True divides the signal by the moving "
                f"standard deviation, so pass moments=init_signal_moments() "
                f"(updated with update_signal_moments after each step)."
            )
        scale = jnp.maximum(1.0, jnp.sqrt(jax.lax.stop_gradient(moments.variance)))
        centred = centred / scale
    # log p(x, z) = signal + log q(z): its gradient is grad_theta log p only
    # (z is fixed, and the -grad_phi log q inside the signal cancels). The
    # proposal's gradient is the centred signal times its score.
    log_p = signal + log_q
    terms = -w1 * (
        fixed_signal
        + gradient_only(log_p)
        + centred * gradient_only(log_q)
        - gradient_only(regression)
    )
    return finish(terms, aggregate)


def reinforce_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Negative ELBO with the plain score-function (REINFORCE) gradient.

    Value ``-mean_k [log p(x, z_k) - log q(z_k)]`` (summed over data
    columns). Gradient in the proposal's parameters
    ``-mean_k l_k grad_phi log q(z_k)`` with learning signal
    ``l_k = log p(x, z_k) - log q(z_k)``; in the target's parameters
    ``-mean_k grad_theta log p(x, z_k)``. Unbiased for the ELBO gradient for
    any latents, discrete included, but of high variance: see
    :func:`nvil_loss` for baselines. Use a detached proposal.

    Example:
      >>> def target(x):
      ...     with numpyro.plate("particles", 8):
      ...         z = numpyro.sample("z", dist.Bernoulli(0.5))
      ...         numpyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
      >>> def proposal(logit, x):
      ...     with numpyro.plate("particles", 8):
      ...         numpyro.sample("z", dist.Bernoulli(logits=logit * x))
      >>> def loss(logit, key):
      ...     q = coix.detach(lambda x: proposal(logit, x))
      ...     program = coix.propose(target, q, loss_fn=reinforce_loss)
      ...     return coix.traced_evaluate(program, seed=key)(1.5)[2].loss
      >>> jax.jit(jax.grad(loss))(0.0, jax.random.key(0)).shape  # for Bernoulli z
      ()

    References:
      Williams (1992), "Simple Statistical Gradient-Following Algorithms for
      Connectionist Reinforcement Learning", Machine Learning 8; Paisley, Blei
      & Jordan (2012), https://arxiv.org/abs/1206.6430; Ranganath, Gerrish &
      Blei (2014), "Black Box Variational Inference",
      https://arxiv.org/abs/1401.0118.
    """
    return _score_function_elbo(
        "reinforce_loss",
        q_trace,
        p_trace,
        incoming_log_weight,
        incremental_log_weight,
        aggregate,
    )


def nvil_loss(
    baseline=None,
    moments: SignalMoments | None = None,
    *,
    normalize: bool = False,
) -> Callable:
    """Negative ELBO with NVIL's variance-reduced score-function gradient.

    The learning signal ``l = log p(x, z) - log q(z)`` is centred by an
    input-dependent baseline ``b(x)`` (e.g. a small network of the data)
    and a moving average ``c`` of ``l - b(x)``, and optionally divided by
    ``max(1, sqrt(v))`` with ``v`` a moving variance:
    ``grad_phi = -mean_k [(l_k - b - c) / s] grad_phi log q(z_k)``. Any
    baseline that does not depend on ``z`` leaves the gradient unbiased;
    normalisation rescales the proposal's gradient by the positive
    ``1 / s`` (an adaptive step size). The loss also trains the baseline: its
    gradient includes ``grad mean_k (l_k - c - b)^2`` (zero in value), so a
    baseline computed from trainable parameters learns by regression.

    The loss's value is the negative ELBO estimate, as for
    :func:`reinforce_loss`.

    Args:
      baseline: ``b(x)``, an array broadcastable to the log weights' shape
        (one value per data column, or a scalar); ``None`` for none. It may
        carry gradient to its own parameters.
      moments: :class:`SignalMoments` for the moving average ``c`` (and
        ``v``); ``None`` for none. Update them after each step with
        ``update_signal_moments(moments, metrics.log_weight - baseline)``
        and feed them back (e.g. through a metric of the same name as the
        ``train`` keyword argument).
      normalize: divide the centred signal by ``max(1, sqrt(v))``.

    Returns:
      A loss with the shared signature (a score-function loss, which
      detaches the proposal).

    Example:
      >>> def target(x):
      ...     with numpyro.plate("particles", 8):
      ...         z = numpyro.sample("z", dist.Bernoulli(0.5))
      ...         numpyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
      >>> def proposal(params, x):
      ...     with numpyro.plate("particles", 8):
      ...         numpyro.sample("z", dist.Bernoulli(logits=params["w"] * x))
      >>> def loss_fn(params, key, moments):
      ...     b = params["b"]  # a learned baseline (here one number)
      ...     loss = nvil_loss(b, moments, normalize=True)
      ...     q = coix.detach(lambda x: proposal(params, x))
      ...     program = coix.propose(target, q, loss_fn=loss)
      ...     _, _, metrics = coix.traced_evaluate(program, seed=key)(1.5)
      ...     metrics["moments"] = update_signal_moments(
      ...         moments, metrics.log_weight - b)
      ...     return metrics.loss, metrics
      >>> params = {"w": jnp.zeros(()), "b": jnp.zeros(())}
      >>> result = coix.util.train(loss_fn, params, optax.adam(0.05), 10,
      ...                          moments=init_signal_moments(), progress=False,
      ...                          return_result=True)
      >>> result.history["loss"].shape, type(result.metrics["moments"]).__name__
      ((10,), 'SignalMoments')

    References:
      Mnih & Gregor (2014), "Neural Variational Inference and Learning in
      Belief Networks", https://arxiv.org/abs/1402.0030.
    """
    if moments is not None and not isinstance(moments, SignalMoments):
        raise TypeError(
            f"nvil_loss: moments must be SignalMoments (see init_signal_moments), "
            f"got {type(moments).__name__}."
        )

    def loss(
        q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
    ):
        return _score_function_elbo(
            "nvil_loss",
            q_trace,
            p_trace,
            incoming_log_weight,
            incremental_log_weight,
            aggregate,
            baseline=baseline,
            moments=moments,
            normalize=normalize,
        )

    loss.__name__ = "nvil_loss"
    return loss


def _leave_one_out_log_z(log_weight):
    """``L_{-k}``: log Z-hat with ``log w_k`` replaced by the mean of the others.

    Returns an array of the log weights' shape: entry ``k`` (per column) is
    ``log (1/K) [sum_{j != k} w_j + exp(mean_{j != k} log w_j)]``.
    """
    k = log_weight.shape[0]
    others_mean = (jnp.sum(log_weight, axis=0) - log_weight) / (k - 1)
    eye = jnp.eye(k, dtype=bool).reshape((k, k) + (1,) * (log_weight.ndim - 1))
    # replaced[k, j] = log w_j, except log w_k -> mean of the others.
    replaced = jnp.where(eye, others_mean[:, None], log_weight[None, :])
    return logsumexp(replaced, axis=1) - math.log(k)


def vimco_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Negative multi-sample bound with VIMCO's leave-one-out control variates.

    Value ``-L`` with ``L = log (1/K sum_k w_k)`` per column (the IWAE
    bound), summed over columns. Gradient:
    ``-sum_k (L - L_{-k}) grad log q(z_k) - sum_k wbar_k grad log w_k``
    where ``L_{-k}`` replaces ``log w_k`` by the mean of the other log
    weights (a baseline for particle ``k`` that does not depend on
    ``z_k``) and ``wbar`` are the normalised weights. Unbiased for the
    gradient of the bound, for discrete latents too; use a detached
    proposal (:func:`~combinators.algo.vimco` builds the program).

    With ``aggregate=False`` the per-particle terms
    ``-wbar_k log w_k - (L - L_{-k}) (log q(z_k) - stop_gradient(log q(z_k)))``
    are returned: their sum has the loss's gradient, not its value.

    Raises:
      ValueError: with fewer than 2 particles (no leave-one-out baseline).

    References:
      Mnih & Rezende (2016), "Variational Inference for Monte Carlo
      Objectives", https://arxiv.org/abs/1602.06725.
    """
    log_weight = jnp.asarray(incoming_log_weight) + jnp.asarray(incremental_log_weight)
    if log_weight.ndim == 0 or log_weight.shape[0] < 2:
        raise ValueError(
            f"vimco_loss: the leave-one-out baselines need at least 2 particles, "
            f"but the log weights have shape {log_weight.shape} (particles "
            f"first); declare numpyro.plate('particles', K) with K >= 2 in the "
            f"target and the proposal."
        )
    _, log_q = proposal_log_prob(q_trace, p_trace)
    fixed = jax.lax.stop_gradient(log_weight)
    learning_signal = (
        logsumexp(fixed, axis=0) - math.log(log_weight.shape[0])
    ) - _leave_one_out_log_z(fixed)
    score_terms = -learning_signal * gradient_only(log_q)
    if not aggregate:
        return -normalized_weights(log_weight) * log_weight + score_terms
    return -weights.log_normalizer(log_weight) + jnp.sum(score_terms)
