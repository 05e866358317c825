"""Particle filters for a linear-Gaussian state-space model, as combinator programs.

The model of :mod:`programs.lgssm_exact`, with ``d``-dimensional states::

    x_0 ~ N(m0, P0),   x_t | x_{t-1} ~ N(A x_{t-1}, Q),   y_t | x_t ~ N(C x_t, R)

is written as one small program per time step. Step ``t``'s target scores
only what the step adds (the transition and the observation ``y_t``) and a
proposal draws ``x_t``. One SMC step is ``compose(propose(p_t, k_t),
resample(q))``, whose weight multiplies the previous step's (nested
importance sampling: Naesseth, Lindsten & Schön 2015, "Nested Sequential
Monte Carlo Methods", https://arxiv.org/abs/1502.02536), so every step costs
O(N). :func:`combinators.algo.smc` with callables ``targets(t)`` runs the
steps in one ``lax.scan``: ``t`` is a tracer there, so ``y_t`` is read with
``lax.dynamic_index_in_dim``.

Two proposals:

* bootstrap: ``p(x_t | x_{t-1})`` (Gordon, Salmond & Smith 1993, "Novel
  approach to nonlinear/non-Gaussian Bayesian state estimation", IEE
  Proceedings F 140(2)); the incremental weight is ``p(y_t | x_t)``;
* guided: the locally optimal ``p(x_t | x_{t-1}, y_t)`` (Doucet, Godsill &
  Andrieu 2000, "On sequential Monte Carlo sampling methods for Bayesian
  filtering", Statistics and Computing 10, Section II.D); the incremental
  weight ``p(y_t | x_{t-1})`` has lower variance.

Every density is a :class:`~programs.lgssm.gaussian.Gaussian` over the last
axis, its covariance factorised once per filter, not in every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from combinators import algo
from programs.lgssm.gaussian import Gaussian, GaussianFactor, gaussian_factor
from programs.lgssm_exact import (
    LGSSMParams,
    check_params,
    condition_on_observation,
    optimal_proposal,
)

PARTICLES = "particles"


def _observation(ys: jax.Array, t) -> jax.Array:
    """``ys[t]`` for a Python or traced step index ``t``."""
    return jax.lax.dynamic_index_in_dim(ys, t, axis=0, keepdims=False)


def _is_first(t) -> bool:
    """Whether ``t`` is the (static) first step; a traced ``t`` never is."""
    return isinstance(t, (int, np.integer)) and int(t) == 0


class _Model(NamedTuple):
    """The model, its data and the Cholesky factors its step programs share."""

    params: LGSSMParams
    ys: jax.Array
    num_particles: int
    initial: GaussianFactor
    transition: GaussianFactor
    observation: GaussianFactor
    guided: GaussianFactor

    def plate(self):
        """The particle plate (``dim=-1``; a state is one event)."""
        return numpyro.plate(PARTICLES, self.num_particles)

    def prior(self, x_prev=None) -> dist.Distribution:
        """``p(x_0)`` when ``x_prev`` is None, else ``p(x_t | x_{t-1})``."""
        if x_prev is None:
            shape = (self.num_particles, self.params.state_dim)
            return Gaussian(jnp.broadcast_to(self.params.m0, shape), self.initial)
        return Gaussian(x_prev @ self.params.A.T, self.transition)

    def target(self, t) -> Callable:
        """Step ``t``'s target: prior (or transition) times ``p(y_t | x_t)``."""

        def program(*x_prev):  # no argument at step 0, else (x_prev,)
            with self.plate():
                x = numpyro.sample("x", self.prior(*x_prev))
                loc = x @ self.params.C.T
                y_t = _observation(self.ys, t)
                numpyro.sample("y", Gaussian(loc, self.observation), obs=y_t)
            return (x,)

        return program

    def bootstrap_proposal(self, t) -> Callable:
        """Step ``t``'s bootstrap proposal: the prior (or transition)."""
        del t

        def program(*x_prev):
            with self.plate():
                return (numpyro.sample("x", self.prior(*x_prev)),)

        return program

    def guided_proposal(self, t) -> Callable:
        """Step ``t``'s locally optimal proposal ``p(x_t | x_{t-1}, y_t)``."""
        params = self.params
        if _is_first(t):

            def initial():
                mean, cov, _ = condition_on_observation(
                    params.m0, params.P0, params.C, params.R, self.ys[0]
                )
                loc = jnp.broadcast_to(mean, (self.num_particles, params.state_dim))
                with self.plate():
                    x = numpyro.sample("x", Gaussian(loc, gaussian_factor(cov)))
                return (x,)

            return initial

        def step(x_prev):
            # Its covariance is the same for every particle and step.
            mean, _ = optimal_proposal(params, x_prev, _observation(self.ys, t))
            with self.plate():
                x = numpyro.sample("x", Gaussian(mean, self.guided))
            return (x,)

        return step


def _model(params: LGSSMParams, ys: jax.Array, num_particles: int) -> _Model:
    check_params(params, ys)
    if not isinstance(num_particles, (int, np.integer)) or num_particles < 1:
        raise ValueError(
            f"lgssm: num_particles must be a positive int, got {num_particles!r}."
        )
    return _Model(
        params=params,
        ys=ys,
        num_particles=int(num_particles),
        initial=gaussian_factor(params.P0),
        transition=gaussian_factor(params.Q),
        observation=gaussian_factor(params.R),
        guided=gaussian_factor(optimal_proposal(params, params.m0, ys[0])[1]),
    )


def initial_target(params: LGSSMParams, ys: jax.Array, num_particles: int) -> Callable:
    """Step 0's target ``p(x_0) p(y_0 | x_0)``: a program ``() -> (x_0,)``."""
    return _model(params, ys, num_particles).target(0)


def transition_target(
    params: LGSSMParams, ys: jax.Array, num_particles: int, t
) -> Callable:
    """Step ``t >= 1``'s target ``p(x_t | x_{t-1}) p(y_t | x_t)``.

    A program ``(x_prev,) -> (x_t,)``; ``t`` may be traced. Raises
    ``ValueError`` for a static ``t = 0``.
    """
    if _is_first(t):
        raise ValueError(
            "transition_target: step 0 has no transition; use initial_target."
        )
    return _model(params, ys, num_particles).target(t)


def bootstrap_proposal(
    params: LGSSMParams, ys: jax.Array, num_particles: int, t
) -> Callable:
    """The bootstrap proposal: ``p(x_0)`` at step 0, else ``p(x_t | x_{t-1})``."""
    return _model(params, ys, num_particles).bootstrap_proposal(t)


def guided_proposal(
    params: LGSSMParams, ys: jax.Array, num_particles: int, t
) -> Callable:
    """The locally optimal proposal ``p(x_t | x_{t-1}, y_t)``, ``p(x_0 | y_0)`` at 0."""
    return _model(params, ys, num_particles).guided_proposal(t)


def filtering_mean(out, trace, metrics) -> dict:
    """The ``record`` of the filters: ``{"filtering_mean": sum_i W_t^i x_t^i}``."""
    del trace
    normalised = jax.nn.softmax(metrics.log_weight)
    return {"filtering_mean": normalised @ out[0]}


def bootstrap_filter(
    params: LGSSMParams,
    ys: jax.Array,
    num_particles: int,
    ess_threshold: float | None = None,
    method: str = "systematic",
    record: Callable | None = filtering_mean,
) -> Callable:
    """The bootstrap particle filter: ``algo.smc`` over the T steps.

    Args:
      params: the model.
      ys: observations, shape ``(T, d_y)``, ``T >= 2``.
      num_particles: N.
      ess_threshold: resample only when ESS < ``ess_threshold * N``
        (``None``: at every step).
      method: the resampling scheme (see :func:`combinators.resample`).
      record: per-step record (default: the filtering mean).

    Returns:
      A program of no arguments whose ``metrics["log_Z"]`` estimates
      ``log p(y_{0:T-1})`` and whose ``metrics["history"]`` holds the
      per-step ESS, log Z increments, resampling flags and records.
    """
    model = _model(params, ys, num_particles)
    return _filter(model, model.bootstrap_proposal, ess_threshold, method, record)


def guided_filter(
    params: LGSSMParams,
    ys: jax.Array,
    num_particles: int,
    ess_threshold: float | None = None,
    method: str = "systematic",
    record: Callable | None = filtering_mean,
) -> Callable:
    """The particle filter with the locally optimal proposal.

    Arguments and result as :func:`bootstrap_filter`.
    """
    model = _model(params, ys, num_particles)
    return _filter(model, model.guided_proposal, ess_threshold, method, record)


def _filter(model: _Model, proposals, ess_threshold, method, record) -> Callable:
    num_steps = model.ys.shape[0]
    if num_steps < 2:
        raise ValueError(
            f"lgssm: the filters need T >= 2 observations, got {num_steps}."
        )
    return algo.smc(
        model.target,
        proposals,
        num_targets=num_steps,
        ess_threshold=ess_threshold,
        method=method,
        record=record,
    )
