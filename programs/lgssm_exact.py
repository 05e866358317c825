"""Exact inference in a linear-Gaussian state-space model (LGSSM).

The model, for ``t = 0, ..., T-1`` (an observation at every step, ``t = 0``
included), with state dimension ``d`` and observation dimension ``d_y``::

    x_0 ~ N(m0, P0)
    x_t | x_{t-1} ~ N(A x_{t-1}, Q)          (t >= 1)
    y_t | x_t     ~ N(C x_t, R)

Everything here is closed form: the Kalman filter (exact ``log p(y_{0:T-1})``
and filtering/predictive moments), the Rauch-Tung-Striebel smoother, and the
"locally optimal" proposal ``p(x_t | x_{t-1}, y_t)`` with its incremental
weight ``p(y_t | x_{t-1})``. It is the ground truth that the library's
particle filters are tested and benchmarked against.

All functions take one parameter set and one sequence; batch with
``jax.vmap``. Covariances must be positive definite (they are factorised by
Cholesky). Shapes are checked at trace time and a mismatch raises a
``ValueError`` naming the field.

Run ``python -m programs.lgssm_exact`` to print the Kalman log-likelihood of
a simulated data set (fixed seed).

References:
  R. E. Kalman (1960), "A new approach to linear filtering and prediction
  problems", Journal of Basic Engineering 82(1):35-45.
  H. E. Rauch, F. Tung and C. T. Striebel (1965), "Maximum likelihood
  estimates of linear dynamic systems", AIAA Journal 3(8):1445-1450.
  S. Särkkä (2013), "Bayesian Filtering and Smoothing", Cambridge University
  Press: Theorem 4.2 (Kalman filter), Theorem 8.2 (RTS smoother),
  Lemma A.1-A.2 (Gaussian conditioning).
  A. Doucet, S. Godsill and C. Andrieu (2000), "On sequential Monte Carlo
  sampling methods for Bayesian filtering", Statistics and Computing
  10:197-208, Section II.D (optimal importance function, Gaussian case).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

__all__ = [
    "KalmanFilterResult",
    "LGSSMParams",
    "RTSSmootherResult",
    "check_params",
    "condition_on_observation",
    "default_params",
    "kalman_filter",
    "optimal_incremental_log_weight",
    "optimal_proposal",
    "rts_smoother",
    "simulate",
    "smoother_sample",
]

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["m0", "P0", "A", "Q", "C", "R"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class LGSSMParams:
    """Parameters of the LGSSM ``x_t ~ N(A x_{t-1}, Q)``, ``y_t ~ N(C x_t, R)``.

    With ``x_0 ~ N(m0, P0)``. A pytree whose six leaves are arrays; the
    dimensions are read from their shapes (``d = A.shape[0]``,
    ``d_y = C.shape[0]``). ``P0``, ``Q`` and ``R`` are covariances
    (variances, not standard deviations) and must be positive definite.

    Attributes:
      m0: initial mean, shape ``(d,)``.
      P0: initial covariance, shape ``(d, d)``.
      A: transition matrix, shape ``(d, d)``.
      Q: transition noise covariance, shape ``(d, d)``.
      C: observation matrix, shape ``(d_y, d)``.
      R: observation noise covariance, shape ``(d_y, d_y)``.
    """

    m0: jax.Array
    P0: jax.Array
    A: jax.Array
    Q: jax.Array
    C: jax.Array
    R: jax.Array

    @property
    def state_dim(self) -> int:
        """The state dimension ``d``."""
        return self.A.shape[-1]

    @property
    def obs_dim(self) -> int:
        """The observation dimension ``d_y``."""
        return self.C.shape[-2]


def check_params(params: LGSSMParams, ys: jax.Array | None = None) -> None:
    """Checks that the parameter (and observation) shapes agree.

    Args:
      params: the model.
      ys: optional observations, expected shape ``(T, d_y)``.

    Raises:
      ValueError: naming the first field whose shape disagrees.
    """
    d = params.A.shape[-1] if jnp.ndim(params.A) == 2 else None
    if d is None or params.A.shape != (d, d):
        raise ValueError(f"LGSSMParams.A must be square (d, d); got {params.A.shape}.")
    d_y = params.C.shape[0] if jnp.ndim(params.C) == 2 else None
    expected = {
        "m0": (d,),
        "P0": (d, d),
        "Q": (d, d),
        "C": (d_y, d),
        "R": (d_y, d_y),
    }
    for name, shape in expected.items():
        actual = jnp.shape(getattr(params, name))
        if actual != shape:
            raise ValueError(
                f"LGSSMParams.{name} has shape {actual}; expected {shape} "
                f"for state dimension d={d} (from A) and observation "
                f"dimension d_y={d_y} (from C)."
            )
    if ys is not None and (jnp.ndim(ys) != 2 or jnp.shape(ys)[1] != d_y):
        raise ValueError(
            f"Observations ys must have shape (T, d_y) = (T, {d_y}); "
            f"got {jnp.shape(ys)}."
        )


def _rotation_blocks(dim: int, angle: float) -> jax.Array:
    """Block-diagonal rotation: 2x2 rotations by ``angle``, a trailing 1 if odd."""
    c, s = math.cos(angle), math.sin(angle)
    matrix = jnp.eye(dim)
    for i in range(0, dim - 1, 2):
        block = jnp.array([[c, -s], [s, c]])
        matrix = matrix.at[i : i + 2, i : i + 2].set(block)
    return matrix


def default_params(dim: int = 1) -> LGSSMParams:
    """The reference model used in tests and benchmarks.

    ``m0 = 0``, ``P0 = I``, ``A = 0.9 * B`` where ``B`` is block-diagonal with
    2x2 rotations by ``pi/6`` (and a trailing ``1`` if ``dim`` is odd), so
    ``dim=1`` gives ``A = 0.9`` and ``dim=2`` a damped rotation with spectral
    radius 0.9 (stable); ``Q = I`` (unit transition variance), ``C = I``
    (every coordinate observed) and ``R = 0.5**2 I`` (observation standard
    deviation 0.5). The observations are informative relative to the
    dynamics, so the bootstrap filter's weights are visibly uneven while the
    optimal proposal's are nearly uniform.

    Args:
      dim: the state dimension ``d`` (``d_y = d``), at least 1.

    Returns:
      The ``LGSSMParams`` (in the default float dtype).

    Raises:
      ValueError: if ``dim < 1``.

    Example:
      >>> params = default_params(2)
      >>> params.state_dim, params.obs_dim
      (2, 2)
    """
    if dim < 1:
        raise ValueError(f"default_params needs dim >= 1; got dim={dim}.")
    eye = jnp.eye(dim)
    return LGSSMParams(
        m0=jnp.zeros(dim),
        P0=eye,
        A=0.9 * _rotation_blocks(dim, math.pi / 6.0),
        Q=eye,
        C=eye,
        R=0.5**2 * eye,
    )


# ---------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------


def simulate(
    key: jax.Array, params: LGSSMParams, num_steps: int
) -> tuple[jax.Array, jax.Array]:
    """Draws ``(x_{0:T-1}, y_{0:T-1})`` from the model.

    Args:
      key: a JAX random key.
      params: the model.
      num_steps: ``T``, the number of time steps (static).

    Returns:
      ``(xs, ys)`` with shapes ``(T, d)`` and ``(T, d_y)``.

    Example:
      >>> xs, ys = simulate(jax.random.key(0), default_params(), 50)
    """
    check_params(params)
    state_key, obs_key = jax.random.split(key)
    d, d_y = params.state_dim, params.obs_dim
    state_noise = jax.random.normal(state_key, (num_steps, d))
    obs_noise = jax.random.normal(obs_key, (num_steps, d_y))
    chol_P0 = jnp.linalg.cholesky(params.P0)
    chol_Q = jnp.linalg.cholesky(params.Q)
    chol_R = jnp.linalg.cholesky(params.R)

    x0 = params.m0 + chol_P0 @ state_noise[0]

    def step(x_prev, noise):
        x = params.A @ x_prev + chol_Q @ noise
        return x, x

    _, xs_rest = jax.lax.scan(step, x0, state_noise[1:])
    xs = jnp.concatenate([x0[None], xs_rest], axis=0)
    ys = xs @ params.C.T + obs_noise @ chol_R.T
    return xs, ys


# ---------------------------------------------------------------------------
# Gaussian conditioning (the Kalman update)
# ---------------------------------------------------------------------------


def _symmetrise(matrix: jax.Array) -> jax.Array:
    return 0.5 * (matrix + jnp.swapaxes(matrix, -1, -2))


def _mvn_log_density_chol(residual: jax.Array, chol: jax.Array) -> jax.Array:
    """``log N(residual; 0, L L^T)`` for residuals of shape ``(..., k)``."""
    k = chol.shape[-1]
    batch_shape = residual.shape[:-1]
    whitened = solve_triangular(chol, residual.reshape(-1, k).T, lower=True)
    mahalanobis = jnp.sum(whitened**2, axis=0).reshape(batch_shape)
    half_log_det = jnp.sum(jnp.log(jnp.diagonal(chol)))
    return -0.5 * mahalanobis - half_log_det - 0.5 * k * _LOG_2PI


def condition_on_observation(
    mean: jax.Array,
    cov: jax.Array,
    C: jax.Array,
    R: jax.Array,
    y: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Posterior of ``x ~ N(mean, cov)`` given ``y | x ~ N(C x, R)``: the Kalman update.

    With ``S = C cov C^T + R`` and gain ``K = cov C^T S^{-1}`` (computed by a
    Cholesky solve, never an explicit inverse)::

        p(x | y) = N(mean + K (y - C mean), (I - K C) cov (I - K C)^T + K R K^T)
        p(y)     = N(y; C mean, S)

    The posterior covariance is in Joseph form (symmetric and positive
    semi-definite by construction). ``mean`` may carry leading batch axes
    (e.g. one row per particle) that share ``cov``; the covariance is then
    the same for every row.

    Args:
      mean: prior mean, shape ``(..., d)``.
      cov: prior covariance, shape ``(d, d)``.
      C: observation matrix, shape ``(d_y, d)``.
      R: observation noise covariance, shape ``(d_y, d_y)``.
      y: the observation, shape ``(d_y,)``.

    Returns:
      ``(posterior_mean, posterior_cov, log_marginal)`` with shapes
      ``(..., d)``, ``(d, d)`` and ``(...)``; ``log_marginal = log p(y)``.

    References:
      Särkkä (2013), Theorem 4.2 (update step) and Lemma A.2.
    """
    S = _symmetrise(C @ cov @ C.T + R)
    chol_S = jnp.linalg.cholesky(S)
    gain = cho_solve((chol_S, True), C @ cov).T  # K = cov C^T S^{-1}
    residual = y - mean @ C.T
    posterior_mean = mean + residual @ gain.T
    complement = jnp.eye(cov.shape[-1], dtype=cov.dtype) - gain @ C
    posterior_cov = complement @ cov @ complement.T + gain @ R @ gain.T
    log_marginal = _mvn_log_density_chol(residual, chol_S)
    return posterior_mean, _symmetrise(posterior_cov), log_marginal


# ---------------------------------------------------------------------------
# Kalman filter and RTS smoother
# ---------------------------------------------------------------------------


class KalmanFilterResult(NamedTuple):
    """Output of :func:`kalman_filter`.

    Attributes:
      log_likelihood: ``log p(y_{0:T-1})``, shape ``()``.
      log_likelihood_increments: ``log p(y_t | y_{0:t-1})``, shape ``(T,)``;
        they sum to ``log_likelihood``.
      filtered_means: ``E[x_t | y_{0:t}]``, shape ``(T, d)``.
      filtered_covs: ``Cov[x_t | y_{0:t}]``, shape ``(T, d, d)``.
      predicted_means: ``E[x_t | y_{0:t-1}]`` (``m0`` at ``t = 0``),
        shape ``(T, d)``.
      predicted_covs: ``Cov[x_t | y_{0:t-1}]`` (``P0`` at ``t = 0``),
        shape ``(T, d, d)``.
    """

    log_likelihood: jax.Array
    log_likelihood_increments: jax.Array
    filtered_means: jax.Array
    filtered_covs: jax.Array
    predicted_means: jax.Array
    predicted_covs: jax.Array


def kalman_filter(params: LGSSMParams, ys: jax.Array) -> KalmanFilterResult:
    """Runs the Kalman filter: exact filtering moments and log-likelihood.

    One ``jax.lax.scan`` over time; each step is an update
    (:func:`condition_on_observation`) followed by a prediction
    ``m^-_{t+1} = A m_t``, ``P^-_{t+1} = A P_t A^T + Q``.

    Args:
      params: the model.
      ys: observations, shape ``(T, d_y)``.

    Returns:
      A :class:`KalmanFilterResult`.

    Raises:
      ValueError: if shapes disagree (see :func:`check_params`).

    Example:
      >>> params = default_params()
      >>> _, ys = simulate(jax.random.key(0), params, 100)
      >>> kalman_filter(params, ys).log_likelihood.shape
      ()

    References:
      Kalman (1960); Särkkä (2013), Theorem 4.2, and Section 4.3 for
      ``log p(y_t | y_{0:t-1}) = log N(y_t; C m^-_t, S_t)``.
    """
    check_params(params, ys)

    def step(carry, y):
        predicted_mean, predicted_cov = carry
        filtered_mean, filtered_cov, log_increment = condition_on_observation(
            predicted_mean, predicted_cov, params.C, params.R, y
        )
        next_mean = params.A @ filtered_mean
        next_cov = _symmetrise(params.A @ filtered_cov @ params.A.T + params.Q)
        outputs = (
            log_increment,
            filtered_mean,
            filtered_cov,
            predicted_mean,
            predicted_cov,
        )
        return (next_mean, next_cov), outputs

    _, outputs = jax.lax.scan(step, (params.m0, params.P0), ys)
    increments, means, covs, predicted_means, predicted_covs = outputs
    return KalmanFilterResult(
        log_likelihood=jnp.sum(increments),
        log_likelihood_increments=increments,
        filtered_means=means,
        filtered_covs=covs,
        predicted_means=predicted_means,
        predicted_covs=predicted_covs,
    )


class RTSSmootherResult(NamedTuple):
    """Output of :func:`rts_smoother`.

    Attributes:
      smoothed_means: ``E[x_t | y_{0:T-1}]``, shape ``(T, d)``.
      smoothed_covs: ``Cov[x_t | y_{0:T-1}]``, shape ``(T, d, d)``.
    """

    smoothed_means: jax.Array
    smoothed_covs: jax.Array


def rts_smoother(
    params: LGSSMParams, filter_result: KalmanFilterResult
) -> RTSSmootherResult:
    """Runs the Rauch-Tung-Striebel smoother backwards over a Kalman filter's output.

    For ``t = T-2, ..., 0``, with gain ``G_t = P_t A^T (P^-_{t+1})^{-1}``
    (a Cholesky solve)::

        m^s_t = m_t + G_t (m^s_{t+1} - m^-_{t+1})
        P^s_t = P_t + G_t (P^s_{t+1} - P^-_{t+1}) G_t^T

    starting from the filtering moments at ``t = T-1``.

    Args:
      params: the model the filter was run with.
      filter_result: the output of :func:`kalman_filter`.

    Returns:
      An :class:`RTSSmootherResult`.

    Example:
      >>> smoothed = rts_smoother(params, kalman_filter(params, ys))

    References:
      Rauch, Tung & Striebel (1965); Särkkä (2013), Theorem 8.2.
    """
    check_params(params)
    result = filter_result

    def step(carry, inputs):
        smoothed_mean_next, smoothed_cov_next = carry
        mean, cov, predicted_mean_next, predicted_cov_next = inputs
        chol = jnp.linalg.cholesky(predicted_cov_next)
        gain = cho_solve((chol, True), params.A @ cov).T
        smoothed_mean = mean + gain @ (smoothed_mean_next - predicted_mean_next)
        smoothed_cov = _symmetrise(
            cov + gain @ (smoothed_cov_next - predicted_cov_next) @ gain.T
        )
        return (smoothed_mean, smoothed_cov), (smoothed_mean, smoothed_cov)

    last = (result.filtered_means[-1], result.filtered_covs[-1])
    inputs = (
        result.filtered_means[:-1],
        result.filtered_covs[:-1],
        result.predicted_means[1:],
        result.predicted_covs[1:],
    )
    _, (means, covs) = jax.lax.scan(step, last, inputs, reverse=True)
    return RTSSmootherResult(
        smoothed_means=jnp.concatenate([means, last[0][None]], axis=0),
        smoothed_covs=jnp.concatenate([covs, last[1][None]], axis=0),
    )


def smoother_sample(
    key: jax.Array, params: LGSSMParams, filter_result: KalmanFilterResult
) -> jax.Array:
    """Draws one trajectory from the exact smoothing law ``p(x_{0:T-1} | y_{0:T-1})``.

    Backward sampling over a Kalman filter's output: ``x_{T-1} ~ N(m_{T-1},
    P_{T-1})``, then for ``t = T-2, ..., 0``, ``x_t | x_{t+1} ~ N(m_t + G_t
    (x_{t+1} - m^-_{t+1}), P_t - G_t P^-_{t+1} G_t^T)`` with the RTS gain
    ``G_t = P_t A^T (P^-_{t+1})^{-1}``. Its marginals are the RTS smoother's;
    batch draws with ``jax.vmap`` over keys.

    Args:
      key: a JAX random key.
      params: the model the filter was run with.
      filter_result: the output of :func:`kalman_filter`.

    Returns:
      The trajectory, shape ``(T, d)``.

    Example:
      >>> keys = jax.random.split(key, 100)
      >>> paths = jax.vmap(lambda k: smoother_sample(k, params, filtered))(keys)

    References:
      Frühwirth-Schnatter (1994), "Data augmentation and dynamic linear
      models", Journal of Time Series Analysis 15(2); Carter & Kohn (1994),
      "On Gibbs sampling for state space models", Biometrika 81(3);
      Särkkä (2013), Section 8.2 (the RTS gain).
    """
    check_params(params)
    result = filter_result
    num_steps, d = result.filtered_means.shape
    noise = jax.random.normal(key, (num_steps, d), result.filtered_means.dtype)
    last = (
        result.filtered_means[-1]
        + jnp.linalg.cholesky(result.filtered_covs[-1]) @ (noise[-1])
    )

    def step(x_next, inputs):
        mean, cov, predicted_mean_next, predicted_cov_next, eps = inputs
        chol = jnp.linalg.cholesky(predicted_cov_next)
        gain = cho_solve((chol, True), params.A @ cov).T
        conditional_mean = mean + gain @ (x_next - predicted_mean_next)
        conditional_cov = _symmetrise(cov - gain @ predicted_cov_next @ gain.T)
        x = conditional_mean + jnp.linalg.cholesky(conditional_cov) @ eps
        return x, x

    inputs = (
        result.filtered_means[:-1],
        result.filtered_covs[:-1],
        result.predicted_means[1:],
        result.predicted_covs[1:],
        noise[:-1],
    )
    _, earlier = jax.lax.scan(step, last, inputs, reverse=True)
    return jnp.concatenate([earlier, last[None]], axis=0)


# ---------------------------------------------------------------------------
# The locally optimal proposal
# ---------------------------------------------------------------------------


def optimal_proposal(
    params: LGSSMParams, x_prev: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mean and covariance of ``p(x_t | x_{t-1}, y_t)``, the locally optimal proposal.

    ``p(x_t | x_{t-1}, y_t) ∝ N(x_t; A x_{t-1}, Q) N(y_t; C x_t, R)`` is the
    Kalman update of the prior ``N(A x_{t-1}, Q)``; its covariance does not
    depend on ``x_{t-1}``. For ``t = 0`` use
    ``condition_on_observation(params.m0, params.P0, params.C, params.R, y_0)``.

    Args:
      params: the model.
      x_prev: ``x_{t-1}``, shape ``(..., d)`` (e.g. one row per particle).
      y: ``y_t``, shape ``(d_y,)``.

    Returns:
      ``(mean, cov)`` with shapes ``(..., d)`` and ``(d, d)``.

    Example:
      >>> mean, cov = optimal_proposal(params, particles, ys[t])

    References:
      Doucet, Godsill & Andrieu (2000), Section II.D (Gaussian case).
    """
    check_params(params)
    mean, cov, _ = condition_on_observation(
        x_prev @ params.A.T, params.Q, params.C, params.R, y
    )
    return mean, cov


def optimal_incremental_log_weight(
    params: LGSSMParams, x_prev: jax.Array, y: jax.Array
) -> jax.Array:
    """``log p(y_t | x_{t-1}) = log N(y_t; C A x_{t-1}, C Q C^T + R)``.

    The incremental importance weight of the optimal proposal: it depends on
    the ancestor ``x_{t-1}`` only, not on the proposed ``x_t``.

    Args:
      params: the model.
      x_prev: ``x_{t-1}``, shape ``(..., d)``.
      y: ``y_t``, shape ``(d_y,)``.

    Returns:
      The log weights, shape ``(...)``.

    References:
      Doucet, Godsill & Andrieu (2000), Section II.D.
    """
    check_params(params)
    _, _, log_weight = condition_on_observation(
        x_prev @ params.A.T, params.Q, params.C, params.R, y
    )
    return log_weight


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> float:
    """Prints the Kalman log-likelihood of a simulated data set.

    Args:
      argv: command-line arguments (``--dim``, ``--steps``, ``--seed``).

    Returns:
      The log-likelihood, as a float.
    """
    parser = argparse.ArgumentParser(
        prog="python -m programs.lgssm_exact",
        description="Kalman log-likelihood of data simulated from default_params.",
    )
    parser.add_argument("--dim", type=int, default=1, help="state dimension")
    parser.add_argument("--steps", type=int, default=100, help="time steps T")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args(argv)
    params = default_params(args.dim)
    _, ys = simulate(jax.random.key(args.seed), params, args.steps)
    log_likelihood = float(jax.jit(kalman_filter)(params, ys).log_likelihood)
    print(
        f"LGSSM dim={args.dim} T={args.steps} seed={args.seed}: "
        f"Kalman log p(y) = {log_likelihood:.6f}"
    )
    return log_likelihood


if __name__ == "__main__":
    main()
