"""Gradient estimators and objectives beyond the core losses.

Every loss here has the shared signature of :mod:`combinators.loss`,
``loss_fn(q_trace, p_trace, incoming_log_weight, incremental_log_weight,
aggregate=True)``, so ``propose(p, q, loss_fn=...)`` drives it; the loss is
a scalar to *minimise* whose gradient is the estimator. Estimators that keep
state (a moving-average baseline) are factories returning such a loss; the
state goes in by closure and the caller returns its update through the
metrics (``combinators.util.train`` feeds a metric back into the keyword
argument of the same name after each step).

Two families:

* **Score-function** estimators (``reinforce_loss``, ``nvil_loss``,
  ``vimco_loss``, the wake-sleep terms) work for discrete latents. Their
  gradient in the proposal's parameters ``phi`` is built from
  ``grad_phi log q(z)`` with the values ``z`` held fixed, so use them with a
  detached proposal, ``propose(p, detach(q), loss_fn=...)`` (discrete
  values carry no gradient anyway). The proposal must be an unweighted
  program: a ``resample`` inside it would need a score term for the
  ancestor indices, which these losses do not add.
* **Pathwise** estimators (``renyi_loss``, ``iwae_dreg_loss``,
  ``rws_dreg_loss``) differentiate through reparameterised samples; they
  carry ``pathwise = True`` and ``propose`` refuses them for
  non-reparameterisable proposals. Continuous relaxations of discrete
  latents live in :mod:`combinators.relaxed`.

Log weights have the particle layout of :mod:`combinators.weights`: axis 0
indexes particles, further axes are *columns*, independent importance
sampling problems such as the data points of a model whose local latents sit
in a data plate inside the particle plate. Every multi-sample bound here is
computed per column and summed over columns, and the score of a column's
latents multiplies only that column's learning signal.

Gradients in the target's parameters ``theta`` are those of the
corresponding objective (``grad_theta log p`` weighted as the bound says).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from combinators import handlers, weights
from combinators import keys as _keys
from combinators.api import propose
from combinators.trace import Trace

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


# ---------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------


def _pathwise(fn):
    fn.pathwise = True
    return fn


def _gradient_only(x):
    """``x - stop_gradient(x)``: zero in value, the gradient of ``x``."""
    return x - jax.lax.stop_gradient(x)


def _normalized(log_weight):
    """Self-normalised weights along the particle axis, without gradient."""
    log_weight = jnp.asarray(log_weight)
    if log_weight.ndim == 0:
        return jnp.ones(())
    return jax.lax.stop_gradient(jax.nn.softmax(log_weight, axis=0))


def _log_z_hat(log_weight):
    """``sum_columns (logsumexp_k log_weight - log K)``, with gradient."""
    return weights.log_normalizer(log_weight)


def _finish(terms, aggregate):
    return jnp.sum(terms) if aggregate else terms


def _proposal_log_prob(q_trace: Trace, p_trace: Trace):
    """Layout, and ``log q`` of every latent draw of the proposal per particle."""
    layout = weights.layout_of(q_trace, p_trace)
    latents = [s for _, _, s in q_trace.generations() if not s.observed]
    return layout, weights.trace_log_prob(latents, layout)


def _core():
    # Imported when called: combinators.loss may re-export names from this
    # module, so importing it at module level could be circular.
    from combinators import loss

    return loss


def _single_step_target_log_prob(where: str, q_trace: Trace, p_trace: Trace):
    """``log p`` of the sites ``propose`` scored: observed or given by ``q``.

    Raises for programs with kernels or auxiliary sites, which these
    single-step estimators do not cover.
    """
    for name, history in p_trace.histories().items():
        if len(history) > 1 or history[0].auxiliary:
            raise ValueError(
                f"{where}: the target has auxiliary (reverse-kernel) site {name!r}; "
                f"this estimator covers a single propose(p, q) without kernels."
            )
    for name, history in q_trace.histories().items():
        if len(history) > 1:
            raise ValueError(
                f"{where}: the proposal re-samples site {name!r} with a kernel; "
                f"this estimator covers a single propose(p, q) without kernels."
            )
    layout = weights.layout_of(q_trace, p_trace)
    proposed = {name for name, site in q_trace.items() if not site.observed}
    scored = [s for name, s in p_trace.items() if s.observed or name in proposed]
    return weights.trace_log_prob(scored, layout)


# ---------------------------------------------------------------------------
# Score-function ELBO: REINFORCE and NVIL.
# ---------------------------------------------------------------------------


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
    baseline,
    moments,
    normalize,
):
    layout, log_q = _proposal_log_prob(q_trace, p_trace)
    signal = jnp.asarray(incremental_log_weight)
    w1 = _normalized(incoming_log_weight)
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
        + _gradient_only(log_p)
        + centred * _gradient_only(log_q)
        - _gradient_only(regression)
    )
    return _finish(terms, aggregate)


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
      >>> program = propose(p, detach(q), loss_fn=reinforce_loss)

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
        None,
        None,
        False,
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
      A loss with the shared signature (score-function: detach the proposal).

    Example:
      >>> def loss_fn(params, key, x, moments):
      ...     b = baseline_net(params["psi"], x)
      ...     loss = nvil_loss(b, moments, normalize=True)
      ...     program = propose(p(params, x), detach(q(params, x)), loss_fn=loss)
      ...     _, _, metrics = traced_evaluate(program, seed=key)()
      ...     metrics["moments"] = update_signal_moments(
      ...         moments, metrics.log_weight - b)
      ...     return metrics.loss, metrics
      >>> train(loss_fn, params, opt, steps, moments=init_signal_moments())

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
            baseline,
            moments,
            normalize,
        )

    loss.__name__ = "nvil_loss"
    return loss


# ---------------------------------------------------------------------------
# VIMCO.
# ---------------------------------------------------------------------------


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
    proposal (:func:`vimco` builds the program).

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
    _, log_q = _proposal_log_prob(q_trace, p_trace)
    fixed = jax.lax.stop_gradient(log_weight)
    learning_signal = (
        logsumexp(fixed, axis=0) - math.log(log_weight.shape[0])
    ) - _leave_one_out_log_z(fixed)
    score_terms = -learning_signal * _gradient_only(log_q)
    if not aggregate:
        return -_normalized(log_weight) * log_weight + score_terms
    return -_log_z_hat(log_weight) + jnp.sum(score_terms)


def vimco(target: Callable, proposal: Callable) -> Callable:
    """VIMCO: ``propose(target, detach(proposal), loss_fn=vimco_loss)``.

    References:
      Mnih & Rezende (2016), https://arxiv.org/abs/1602.06725.
    """
    return propose(target, handlers.detach(proposal), loss_fn=vimco_loss)


# ---------------------------------------------------------------------------
# Doubly reparameterised gradients.
# ---------------------------------------------------------------------------


@_pathwise
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

    Needs two program transforms, which :func:`dreg_iwae` applies:
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
    log_p = _single_step_target_log_prob("iwae_dreg_loss", q_trace, p_trace)
    wbar = _normalized(log_weight)
    terms = -(
        wbar**2 * _gradient_only(log_weight) + (wbar - wbar**2) * _gradient_only(log_p)
    )
    if not aggregate:
        return terms
    return -jax.lax.stop_gradient(_log_z_hat(log_weight)) + jnp.sum(terms)


@_pathwise
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
    :func:`dreg_rws`, which applies ``stick_the_landing`` to the proposal and
    ``detach=True`` to ``propose``.

    References:
      Tucker, Lawson, Gu & Maddison (2019), https://arxiv.org/abs/1810.04152,
      Section 4; Bornschein & Bengio (2015), https://arxiv.org/abs/1406.2751.
    """
    log_weight = jnp.asarray(incoming_log_weight) + jnp.asarray(incremental_log_weight)
    log_p = _single_step_target_log_prob("rws_dreg_loss", q_trace, p_trace)
    wbar = _normalized(log_weight)
    terms = -(
        (wbar - wbar**2) * _gradient_only(log_weight) + wbar**2 * _gradient_only(log_p)
    )
    if not aggregate:
        return terms
    return -jax.lax.stop_gradient(_log_z_hat(log_weight)) + jnp.sum(terms)


def dreg_iwae(target: Callable, proposal: Callable) -> Callable:
    """IWAE trained with DReG gradients (the transforms :func:`iwae_dreg_loss` needs).

    Returns ``propose(target, stick_the_landing(proposal), detach=True,
    loss_fn=iwae_dreg_loss)``.

    References:
      Tucker, Lawson, Gu & Maddison (2019), https://arxiv.org/abs/1810.04152.
    """
    return propose(
        target,
        handlers.stick_the_landing(proposal),
        detach=True,
        loss_fn=iwae_dreg_loss,
    )


def dreg_rws(target: Callable, proposal: Callable) -> Callable:
    """RWS with the DReG wake-phi gradient (see :func:`rws_dreg_loss`).

    Returns ``propose(target, stick_the_landing(proposal), detach=True,
    loss_fn=rws_dreg_loss)``.

    References:
      Tucker, Lawson, Gu & Maddison (2019), https://arxiv.org/abs/1810.04152.
    """
    return propose(
        target,
        handlers.stick_the_landing(proposal),
        detach=True,
        loss_fn=rws_dreg_loss,
    )


# ---------------------------------------------------------------------------
# Rényi bounds.
# ---------------------------------------------------------------------------


def renyi_loss(alpha: float) -> Callable:
    """Negative variational Rényi bound of order ``alpha``, pathwise gradient.

    Per column ``L_alpha = 1 / (1 - alpha) log (1/K sum_k w_k^(1 - alpha))``;
    the loss is ``-sum_columns L_alpha``. Its gradient is
    ``-sum_k wbar_{alpha,k} grad log w_k`` with
    ``wbar_alpha = softmax((1 - alpha) log w)``. ``alpha = 0`` is the IWAE
    bound; ``alpha -> 1`` the ELBO (``alpha = 1`` exactly gives the mean log
    weight); ``alpha < 0`` gives objectives above ``log p(x)`` in the
    many-particle limit. A model whose local latents sit in a data plate
    inside the particle plate has one column per data point, and the bound
    is per data point, as in the paper's minibatch estimator.

    Args:
      alpha: the order, a finite real number.

    Returns:
      A pathwise loss with the shared signature.

    Raises:
      ValueError: for a non-finite or non-real ``alpha``.

    References:
      Li & Turner (2016), "Rényi Divergence Variational Inference",
      https://arxiv.org/abs/1602.02311.
    """
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(
            f"renyi_loss: alpha must be a real number, got {alpha!r}."
        ) from None
    if not math.isfinite(alpha):
        raise ValueError(f"renyi_loss: alpha must be finite, got {alpha!r}.")

    @_pathwise
    def loss(
        q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
    ):
        del q_trace, p_trace
        log_weight = jnp.asarray(incoming_log_weight) + jnp.asarray(
            incremental_log_weight
        )
        if log_weight.ndim == 0:
            # One particle: every order gives the log weight itself.
            return -log_weight
        if alpha == 1.0:
            terms = -log_weight / log_weight.shape[0]
            return _finish(terms, aggregate)
        scaled = (1.0 - alpha) * log_weight
        if not aggregate:
            return -_normalized(scaled) * log_weight
        return -_log_z_hat(scaled) / (1.0 - alpha)

    loss.__name__ = f"renyi_loss(alpha={alpha:g})"
    loss.alpha = alpha
    return loss


# ---------------------------------------------------------------------------
# Wake-sleep terms.
# ---------------------------------------------------------------------------


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
    _, proposal_lp, _, target_lp = _core()._role_log_probs(q_trace, p_trace)
    w = _normalized(jnp.asarray(incoming_log_weight) + incremental_log_weight)
    return _finish(-(w * (target_lp - proposal_lp)), aggregate)


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
    _, _, forward_lp, _ = _core()._role_log_probs(q_trace, p_trace)
    w = _normalized(jnp.asarray(incoming_log_weight) + incremental_log_weight)
    return _finish(-(w * forward_lp), aggregate)


def wake_theta_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Classic wake phase for the model: ``-mean_k log p(x, z_k)``, ``z_k ~ q``.

    The samples are not reweighted, so the gradient is unbiased for the
    ELBO's gradient in ``theta``. Pair it with :func:`sleep_phi` for the
    wake-sleep algorithm. Use ``detach=True`` or a detached proposal.

    References:
      Hinton, Dayan, Frey & Neal (1995), "The 'Wake-Sleep' Algorithm for
      Unsupervised Neural Networks", Science 268(5214).
    """
    _, proposal_lp, _, target_lp = _core()._role_log_probs(q_trace, p_trace)
    w1 = _normalized(incoming_log_weight)
    if w1.ndim == 0 and jnp.ndim(target_lp):
        w1 = jnp.full(jnp.shape(target_lp), 1.0 / jnp.shape(target_lp)[0])
    return _finish(-(w1 * (target_lp - proposal_lp)), aggregate)


class SleepPhase(NamedTuple):
    """The result of :func:`sleep_phi`.

    Attributes:
      loss: ``-mean_k log q(z_k | x_k)`` over the dreamed particles, summed
        over data columns (per-particle terms with ``aggregate=False``).
      model_trace: the dream: the model's trace, values without gradient.
      proposal_trace: the proposal's trace at the dreamed latents.
    """

    loss: Any
    model_trace: Trace
    proposal_trace: Trace


def sleep_phi(
    model: Callable,
    proposal: Callable,
    *,
    seed=None,
    observed: Sequence[str] = (),
    aggregate: bool = True,
) -> Callable[..., SleepPhase]:
    """The sleep phase: fit the proposal to dreams ``(z, x) ~ p_theta``.

    Runs ``model(*args)`` *generatively*, with its observations sampled
    rather than given (e.g. the target called with ``obs=None``), inside the
    particle plate: each particle is a dream ``(z_k, x_k)``. The model must
    return, as a tuple, the arguments of ``proposal`` (the dreamed data);
    ``proposal(*dream)`` is then evaluated with every latent it samples set
    to the dreamed value of the same name, and the loss is
    ``-mean_k log q(z_k | x_k)``. Dreams carry no gradient, so the loss
    trains only the proposal (``grad_phi KL(p(z, x) || q(z | x) p(x))``).

    Args:
      model: the generative program (samples latents and data).
      proposal: the inference program, called with the model's outputs.
      seed: a PRNG key for the dream.
      observed: names of the model's sites that the proposal observes
        itself (its inputs), not to be substituted.
      aggregate: sum to a scalar (else per-particle terms).

    Returns:
      A function of the model's arguments returning a :class:`SleepPhase`.

    Raises:
      ValueError: without a key, or when the proposal samples a latent the
        model does not dream.

    Example:
      >>> def model(n):                 # target with its observation unfixed
      ...     return target(params, obs=None)(n)
      >>> sleep = sleep_phi(model, lambda x: proposal(params, x), seed=key)()
      >>> loss = wake.loss + sleep.loss  # wake-sleep with wake_theta_loss

    References:
      Hinton, Dayan, Frey & Neal (1995), "The 'Wake-Sleep' Algorithm for
      Unsupervised Neural Networks", Science 268(5214); Bornschein & Bengio
      (2015), https://arxiv.org/abs/1406.2751, Section 2.2 (sleep-phase
      update of the proposal).
    """
    handlers.check_callable("sleep_phi", model=model, proposal=proposal)
    observed = tuple(observed)

    def run(*args, **kwargs) -> SleepPhase:
        if seed is None:
            raise ValueError(
                "sleep_phi: no PRNG key was given; pass seed=jax.random.key(0)."
            )
        key_model, key_proposal = _keys.split_key(seed)
        dream = handlers.evaluate(model, seed=key_model, where="sleep_phi")(
            *args, **kwargs
        )
        if dream.metrics is not None:
            raise ValueError(
                "sleep_phi: the model is a weighted program (the output of a "
                "combinator); pass the generative program itself."
            )
        model_trace = jax.lax.stop_gradient(dream.trace)
        out = jax.lax.stop_gradient(dream.out)
        if not isinstance(out, tuple):
            raise TypeError(
                f"sleep_phi: the model must return a tuple of arguments for the "
                f"proposal (the dreamed data), got {type(out).__name__}."
            )
        latents = {
            (name, 0): site.value
            for name, site in model_trace.items()
            if not site.observed and name not in observed
        }
        q_eval = handlers.evaluate(
            proposal, latents, seed=key_proposal, where="sleep_phi"
        )(*out)
        q_trace = q_eval.trace
        given = set(q_eval.substituted)
        for name, generation, site in q_trace.generations():
            if not site.observed and (name, generation) not in given:
                raise ValueError(
                    f"sleep_phi: the proposal samples latent site {name!r}, which "
                    f"the model does not dream (model sites: "
                    f"{sorted(model_trace)}); the sleep phase scores the "
                    f"proposal at the model's values only."
                )
        layout = weights.layout_of(q_trace)
        log_q = weights.trace_log_prob(
            [s for _, _, s in q_trace.generations() if not s.observed], layout
        )
        if log_q.ndim == 0:
            terms = -log_q
        else:
            terms = -log_q / log_q.shape[0]
        return SleepPhase(_finish(terms, aggregate), model_trace, q_trace)

    return run
