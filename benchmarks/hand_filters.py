"""Hand-written particle filters for the LGSSM in plain JAX: the speed floor.

These are the filters a careful JAX user would write by hand for the model
of :mod:`programs.lgssm_exact`, with no library and no numpyro: particles
are an ``(N, d)`` array, one ``jax.lax.scan`` runs over time, every
particle-independent matrix (Cholesky factors, gains, whiteners) is computed
once before the scan, and resampling happens at every step with a single
uniform per step (systematic resampling; Kitagawa 1996, Carpenter, Clifford
& Fearnhead 1999) found by ``jnp.searchsorted`` on the cumulative
normalised weights.

Both filters return a :class:`FilterResult` with the estimate of
``log p(y_{0:T-1})`` (``log_Z``; ``exp(log_Z)`` is unbiased for the
likelihood), the weighted filtering means ``sum_i w_t^i x_t^i`` (taken
before resampling) and the effective sample size ``1 / sum_i (w_t^i)^2`` at
every step. ``num_particles`` and ``resampling`` are static; batch over
keys (independent runs) with ``jax.vmap``.

References:
  N. J. Gordon, D. J. Salmond and A. F. M. Smith (1993), "Novel approach to
  nonlinear/non-Gaussian Bayesian state estimation", IEE Proceedings F
  140(2):107-113 (the bootstrap filter).
  A. Doucet, S. Godsill and C. Andrieu (2000), "On sequential Monte Carlo
  sampling methods for Bayesian filtering", Statistics and Computing
  10:197-208 (the optimal proposal, Section II.D).
  G. Kitagawa (1996), "Monte Carlo filter and smoother for non-Gaussian
  nonlinear state space models", JCGS 5(1):1-25 (systematic resampling).
  P. Del Moral (2004), "Feynman-Kac Formulae", Springer, Theorem 7.4.2
  (unbiasedness of the likelihood estimate).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import logsumexp

from programs.lgssm_exact import LGSSMParams, check_params, condition_on_observation

__all__ = [
    "RESAMPLING_METHODS",
    "FilterResult",
    "SmootherResult",
    "bootstrap_filter",
    "bootstrap_smoother",
    "guided_filter",
]

RESAMPLING_METHODS = ("systematic", "multinomial")


class FilterResult(NamedTuple):
    """Output of a particle filter.

    Attributes:
      log_Z: the estimate of ``log p(y_{0:T-1})``, shape ``()``.
      log_Z_increments: ``log (1/N sum_i w_t^i)``, the estimates of
        ``log p(y_t | y_{0:t-1})``, shape ``(T,)``; they sum to ``log_Z``.
      filtering_means: ``sum_i w_t^i x_t^i`` with normalised weights,
        estimates of ``E[x_t | y_{0:t}]``, shape ``(T, d)``.
      ess: effective sample size ``1 / sum_i (w_t^i)^2`` before resampling,
        shape ``(T,)``.
    """

    log_Z: jax.Array
    log_Z_increments: jax.Array
    filtering_means: jax.Array
    ess: jax.Array


class SmootherResult(NamedTuple):
    """Output of forward filtering, backward simulation.

    Attributes:
      log_Z: the filter's estimate of ``log p(y_{0:T-1})``, shape ``()``.
      paths: ``M`` trajectories drawn from the particle approximation of
        ``p(x_{0:T-1} | y_{0:T-1})``, shape ``(T, M, d)``.
    """

    log_Z: jax.Array
    paths: jax.Array


def _check_resampling(resampling: str) -> None:
    if resampling not in RESAMPLING_METHODS:
        raise ValueError(
            f"resampling={resampling!r} is not one of {RESAMPLING_METHODS}."
        )


def _resample(key: jax.Array, log_weights: jax.Array, resampling: str) -> jax.Array:
    """Ancestor indices ``a_i = min{j : W_j > u_i}`` on the cumulative weights ``W``.

    Systematic: ``u_i = (i + U) / N`` with one ``U ~ Uniform[0, 1)``.
    Multinomial: ``u_i`` i.i.d. uniform. The index is clipped to ``N - 1`` in
    case rounding leaves ``W_{N-1}`` slightly below 1.
    """
    num_particles = log_weights.shape[0]
    cumulative_weights = jnp.cumsum(jax.nn.softmax(log_weights))
    if resampling == "systematic":
        uniform = jax.random.uniform(key, dtype=cumulative_weights.dtype)
        positions = (jnp.arange(num_particles) + uniform) / num_particles
    else:
        positions = jax.random.uniform(
            key, (num_particles,), dtype=cumulative_weights.dtype
        )
    ancestors = jnp.searchsorted(cumulative_weights, positions, side="right")
    return jnp.minimum(ancestors, num_particles - 1)


def _summarise(
    particles: jax.Array, log_weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(log mean weight, weighted mean of the particles, ESS)``."""
    num_particles = log_weights.shape[0]
    log_Z_increment = logsumexp(log_weights) - math.log(num_particles)
    weights = jax.nn.softmax(log_weights)
    return log_Z_increment, weights @ particles, 1.0 / jnp.sum(weights**2)


def _gaussian_log_density_fn(chol_cov: jax.Array):
    """``r -> log N(r; 0, L L^T)`` row-wise; the whitener ``L^{-1}`` is precomputed."""
    k = chol_cov.shape[0]
    whitener = solve_triangular(chol_cov, jnp.eye(k, dtype=chol_cov.dtype), lower=True)
    log_normaliser = -jnp.sum(jnp.log(jnp.diagonal(chol_cov))) - 0.5 * k * math.log(
        2.0 * math.pi
    )

    def log_density(residuals):
        whitened = residuals @ whitener.T
        return -0.5 * jnp.sum(whitened**2, axis=-1) + log_normaliser

    return log_density


def _run(init_fn, step_fn, key, ys):
    """Runs ``init_fn`` at ``t = 0`` and ``step_fn`` in one scan over ``t >= 1``."""
    init_key, loop_key = jax.random.split(key)
    particles, log_weights = init_fn(init_key, ys[0])
    first = _summarise(particles, log_weights)
    step_keys = jax.random.split(loop_key, ys.shape[0] - 1)

    def step(carry, inputs):
        particles, log_weights = step_fn(*carry, *inputs)
        return (particles, log_weights), _summarise(particles, log_weights)

    _, rest = jax.lax.scan(step, (particles, log_weights), (step_keys, ys[1:]))
    increments, means, ess = (
        jnp.concatenate([a[None], b], axis=0) for a, b in zip(first, rest, strict=True)
    )
    return FilterResult(
        log_Z=jnp.sum(increments),
        log_Z_increments=increments,
        filtering_means=means,
        ess=ess,
    )


@functools.partial(jax.jit, static_argnames=("num_particles", "resampling"))
def bootstrap_filter(
    key: jax.Array,
    params: LGSSMParams,
    ys: jax.Array,
    num_particles: int,
    resampling: str = "systematic",
) -> FilterResult:
    """The bootstrap filter: propose from the dynamics, weight by the likelihood.

    ``x_0^i ~ N(m0, P0)``; for ``t >= 1`` resample ancestors ``a_i`` by the
    weights of step ``t-1`` and draw ``x_t^i ~ N(A x_{t-1}^{a_i}, Q)``; at
    every ``t`` the log weight is ``log N(y_t; C x_t^i, R)``.

    Args:
      key: a JAX random key.
      params: the model (see :class:`programs.lgssm_exact.LGSSMParams`).
      ys: observations, shape ``(T, d_y)``.
      num_particles: ``N`` (static).
      resampling: ``"systematic"`` (default) or ``"multinomial"`` (static).

    Returns:
      A :class:`FilterResult`.

    Raises:
      ValueError: for an unknown ``resampling`` or mismatched shapes.

    Example:
      >>> result = bootstrap_filter(jax.random.key(0), params, ys, 1000)
      >>> result.log_Z  # compare with kalman_filter(params, ys).log_likelihood

    References:
      Gordon, Salmond & Smith (1993); Kitagawa (1996).
    """
    _check_resampling(resampling)
    check_params(params, ys)
    d = params.state_dim
    chol_P0 = jnp.linalg.cholesky(params.P0)
    chol_Q = jnp.linalg.cholesky(params.Q)
    log_obs_density = _gaussian_log_density_fn(jnp.linalg.cholesky(params.R))

    def init_fn(init_key, y):
        noise = jax.random.normal(init_key, (num_particles, d), dtype=ys.dtype)
        particles = params.m0 + noise @ chol_P0.T
        return particles, log_obs_density(y - particles @ params.C.T)

    def step_fn(particles, log_weights, step_key, y):
        resampling_key, transition_key = jax.random.split(step_key)
        ancestors = _resample(resampling_key, log_weights, resampling)
        noise = jax.random.normal(transition_key, (num_particles, d), dtype=ys.dtype)
        particles = particles[ancestors] @ params.A.T + noise @ chol_Q.T
        return particles, log_obs_density(y - particles @ params.C.T)

    return _run(init_fn, step_fn, key, ys)


@functools.partial(jax.jit, static_argnames=("num_particles", "resampling"))
def guided_filter(
    key: jax.Array,
    params: LGSSMParams,
    ys: jax.Array,
    num_particles: int,
    resampling: str = "systematic",
) -> FilterResult:
    """The particle filter with the locally optimal proposal ``p(x_t | x_{t-1}, y_t)``.

    ``x_0^i ~ p(x_0 | y_0)`` with log weight ``log p(y_0)`` (the same for all
    particles); for ``t >= 1`` resample ancestors by the weights of step
    ``t-1``, draw ``x_t^i ~ p(x_t | x_{t-1}^{a_i}, y_t) = N(F x_{t-1}^{a_i} +
    K y_t, Sigma)`` and weight by ``log p(y_t | x_{t-1}^{a_i}) = log N(y_t;
    C A x_{t-1}^{a_i}, S)``, where ``S = C Q C^T + R``, ``K = Q C^T S^{-1}``,
    ``F = (I - K C) A`` and ``Sigma = (I - K C) Q (I - K C)^T + K R K^T`` are
    computed once.

    Args:
      key: a JAX random key.
      params: the model (see :class:`programs.lgssm_exact.LGSSMParams`).
      ys: observations, shape ``(T, d_y)``.
      num_particles: ``N`` (static).
      resampling: ``"systematic"`` (default) or ``"multinomial"`` (static).

    Returns:
      A :class:`FilterResult`.

    Raises:
      ValueError: for an unknown ``resampling`` or mismatched shapes.

    Example:
      >>> result = guided_filter(jax.random.key(0), params, ys, 1000)

    References:
      Doucet, Godsill & Andrieu (2000), Section II.D; Kitagawa (1996).
    """
    _check_resampling(resampling)
    check_params(params, ys)
    d = params.state_dim
    A, Q, C, R = params.A, params.Q, params.C, params.R
    # Particle-independent pieces of p(x_t | x_{t-1}, y_t) and p(y_t | x_{t-1}).
    S = C @ Q @ C.T + R
    chol_S = jnp.linalg.cholesky(0.5 * (S + S.T))
    gain = jax.scipy.linalg.cho_solve((chol_S, True), C @ Q).T
    complement = jnp.eye(d, dtype=Q.dtype) - gain @ C
    transition = complement @ A
    chol_Sigma = jnp.linalg.cholesky(complement @ Q @ complement.T + gain @ R @ gain.T)
    predictive_obs = C @ A
    log_predictive_density = _gaussian_log_density_fn(chol_S)

    def init_fn(init_key, y):
        mean, cov, log_marginal = condition_on_observation(
            params.m0, params.P0, C, R, y
        )
        noise = jax.random.normal(init_key, (num_particles, d), dtype=ys.dtype)
        particles = mean + noise @ jnp.linalg.cholesky(cov).T
        return particles, jnp.full((num_particles,), log_marginal)

    def step_fn(particles, log_weights, step_key, y):
        resampling_key, proposal_key = jax.random.split(step_key)
        ancestors = _resample(resampling_key, log_weights, resampling)
        x_prev = particles[ancestors]
        noise = jax.random.normal(proposal_key, (num_particles, d), dtype=ys.dtype)
        particles = x_prev @ transition.T + y @ gain.T + noise @ chol_Sigma.T
        log_weights = log_predictive_density(y - x_prev @ predictive_obs.T)
        return particles, log_weights

    return _run(init_fn, step_fn, key, ys)


@functools.partial(jax.jit, static_argnames=("num_particles", "num_trajectories"))
def bootstrap_smoother(
    key: jax.Array,
    params: LGSSMParams,
    ys: jax.Array,
    num_particles: int,
    num_trajectories: int,
) -> SmootherResult:
    """The bootstrap filter keeping its history, then exact backward simulation.

    The forward pass is :func:`bootstrap_filter` (systematic resampling)
    with the particles ``x_t^i`` and log weights ``log w_t^i`` of every step
    stacked by the scan. The backward pass draws ``M`` indices at ``T - 1``
    from ``w_{T-1}``, then for ``t = T-2, ..., 0`` each trajectory's index at
    ``t`` from ``B_t(i) ∝ w_t^i N(x_{t+1}; A x_t^i, Q)``: an ``(M, N)``
    matrix of logits per step, O(N M) work (Godsill, Doucet & West 2004).

    Args:
      key: a JAX random key.
      params: the model.
      ys: observations, shape ``(T, d_y)``.
      num_particles: ``N`` (static).
      num_trajectories: ``M`` (static).

    Returns:
      A :class:`SmootherResult`.

    References:
      Godsill, Doucet & West (2004), "Monte Carlo smoothing for nonlinear
      time series", JASA 99(465):156-168.
    """
    check_params(params, ys)
    d = params.state_dim
    chol_P0 = jnp.linalg.cholesky(params.P0)
    chol_Q = jnp.linalg.cholesky(params.Q)
    log_obs_density = _gaussian_log_density_fn(jnp.linalg.cholesky(params.R))
    log_transition_density = _gaussian_log_density_fn(chol_Q)
    key_init, key_steps, key_last, key_back = jax.random.split(key, 4)

    noise = jax.random.normal(key_init, (num_particles, d), dtype=ys.dtype)
    particles = params.m0 + noise @ chol_P0.T
    log_weights = log_obs_density(ys[0] - particles @ params.C.T)

    def forward(carry, inputs):
        particles, log_weights = carry
        step_key, y = inputs
        resampling_key, transition_key = jax.random.split(step_key)
        ancestors = _resample(resampling_key, log_weights, "systematic")
        noise = jax.random.normal(transition_key, (num_particles, d), dtype=ys.dtype)
        particles = particles[ancestors] @ params.A.T + noise @ chol_Q.T
        log_weights = log_obs_density(y - particles @ params.C.T)
        return (particles, log_weights), (particles, log_weights)

    step_keys = jax.random.split(key_steps, ys.shape[0] - 1)
    _, (rest, rest_log_weights) = jax.lax.scan(
        forward, (particles, log_weights), (step_keys, ys[1:])
    )
    history = jnp.concatenate([particles[None], rest])
    log_weights = jnp.concatenate([log_weights[None], rest_log_weights])
    log_Z = jnp.sum(logsumexp(log_weights, axis=1) - math.log(num_particles))

    last = jax.random.categorical(key_last, log_weights[-1], shape=(num_trajectories,))

    def backward(chosen_next, inputs):
        step_key, particles, log_weights, particles_next = inputs
        residuals = (
            particles_next[chosen_next][:, None, :] - (particles @ params.A.T)[None]
        )
        logits = log_weights[None, :] + log_transition_density(residuals)
        chosen = jax.random.categorical(step_key, logits, axis=-1)
        return chosen, chosen

    back_keys = jax.random.split(key_back, ys.shape[0] - 1)
    _, chosen = jax.lax.scan(
        backward,
        last,
        (back_keys, history[:-1], log_weights[:-1], history[1:]),
        reverse=True,
    )
    indices = jnp.concatenate([chosen, last[None]])
    paths = jnp.take_along_axis(history, indices[..., None], axis=1)
    return SmootherResult(log_Z=log_Z, paths=paths)
