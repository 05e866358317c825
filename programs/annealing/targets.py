"""The annealing problems: target densities, initial densities, exact normalisers.

* ``"ring"``: eight equally weighted Gaussians in 2-D with means
  ``10 (cos(2 pi j / 8), sin(2 pi j / 8))`` and variance 0.5 per
  coordinate, each normalised, so ``Z = 8`` exactly. Initial density
  ``N(0, 5^2 I)``. This is the mixture of the NVI paper's annealing
  experiment as Coix's ``examples/anneal.py`` reproduces it.
* ``"funnel"``: Neal's funnel (Neal, 2003, "Slice sampling", Annals of
  Statistics 31) in three dimensions: ``v ~ N(0, 3^2)`` and
  ``x_i | v ~ N(0, exp(v))`` for ``i = 1, 2``, with the normalising
  constants of both Gaussians left out, so ``Z = sqrt(2 pi 9) (2 pi)`` is
  known. Initial density: independent Student-t coordinates (5 degrees of
  freedom, scale 3). With a Gaussian ``pi_0`` the weights would have
  infinite variance (for large ``v`` the funnel's ``x_i`` have heavier
  tails than any fixed Gaussian); with Student-t tails ``gamma / pi_0`` is
  bounded. Its bound, reached in the funnel's neck, grows like
  ``exp(9 d^2 / 8)`` with the number ``d`` of ``x_i``, hence ``d = 2``.

The intermediate densities are ``gamma_k = pi_0^(1 - beta_k) gamma_K^beta_k``
with ``beta_k = (k / K)^power``; :func:`quadrature_log_normalizer` gives
their exact normalisers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

RING_MODES = 8
RING_RADIUS = 10.0
RING_VARIANCE = 0.5
FUNNEL_DIM = 3  # v, x_1, x_2
FUNNEL_V_SCALE = 3.0
FUNNEL_INIT_DF = 5.0


def ring_log_density(x: jax.Array) -> jax.Array:
    """Log of the sum of eight unit-mass Gaussians on a circle of radius 10.

    Args:
      x: points, shape ``(..., 2)``.

    Returns:
      ``log sum_j N(x; m_j, 0.5 I)``, shape ``x.shape[:-1]``; its integral
      over the plane is 8.
    """
    angles = 2.0 * jnp.pi * jnp.arange(RING_MODES) / RING_MODES
    means = RING_RADIUS * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    per_mode = dist.Normal(means, math.sqrt(RING_VARIANCE)).log_prob(x[..., None, :])
    return jax.scipy.special.logsumexp(jnp.sum(per_mode, axis=-1), axis=-1)


def funnel_log_density(x: jax.Array) -> jax.Array:
    """Unnormalised log density of Neal's funnel; ``x[..., 0]`` is ``v``.

    ``log gamma(v, x) = -v^2 / 18 - sum_i (x_i^2 exp(-v) + v) / 2``, the
    density of ``v ~ N(0, 3^2)``, ``x_i | v ~ N(0, exp(v))`` without the
    factors ``sqrt(2 pi 9)`` and ``(2 pi)^(d/2)``.

    Args:
      x: points, shape ``(..., 1 + d)``.

    Returns:
      The log density, shape ``x.shape[:-1]``.
    """
    v, rest = x[..., 0], x[..., 1:]
    # (x_i exp(-v/2))^2 rather than x_i^2 exp(-v): no inf * 0 far in the neck.
    standardised = rest * jnp.exp(-0.5 * v)[..., None]
    return -0.5 * jnp.square(v / FUNNEL_V_SCALE) - 0.5 * jnp.sum(
        jnp.square(standardised) + v[..., None], axis=-1
    )


class Target(NamedTuple):
    """An annealing problem: the final density and the initial one.

    Attributes:
      name: ``"ring"`` or ``"funnel"``.
      dim: dimension of the single latent ``x``.
      init_scale: the scale ``s`` of the initial density ``pi_0``.
      init_df: ``None`` for ``pi_0 = N(0, s^2 I)``; a number ``nu`` for
        independent Student-t coordinates with ``nu`` degrees of freedom
        and scale ``s``.
      log_density: ``log gamma_K``, unnormalised, on arrays ``(..., dim)``.
      log_Z: the exact ``log Z`` of ``gamma_K``.
      schedule_power: ``beta_k = (k / K)^schedule_power``.
    """

    name: str
    dim: int
    init_scale: float
    init_df: float | None
    log_density: Callable[[jax.Array], jax.Array]
    log_Z: float
    schedule_power: float


def get_target(name: str) -> Target:
    """The annealing problem called ``name`` (``"ring"`` or ``"funnel"``).

    Raises:
      ValueError: for any other name.
    """
    if name == "ring":
        return Target("ring", 2, 5.0, None, ring_log_density, math.log(RING_MODES), 3.0)
    if name == "funnel":
        d = FUNNEL_DIM - 1
        log_Z = 0.5 * math.log(2 * math.pi * FUNNEL_V_SCALE**2) + 0.5 * d * math.log(
            2 * math.pi
        )
        return Target(
            "funnel", FUNNEL_DIM, 3.0, FUNNEL_INIT_DF, funnel_log_density, log_Z, 2.0
        )
    raise ValueError(f"annealing: unknown target {name!r}; use 'ring' or 'funnel'.")


def annealing_schedule(num_transitions: int, power: float) -> jax.Array:
    """The inverse temperatures ``beta_k = (k / K)^power``, ``k = 0..K``.

    A power above one puts small steps near ``pi_0``, where
    ``log gamma_K - log pi_0`` is large in magnitude.
    """
    return (jnp.arange(num_transitions + 1) / num_transitions) ** power


def initial_distribution(target: Target) -> dist.Distribution:
    """The initial density ``pi_0`` over ``x`` (event shape ``(dim,)``)."""
    if target.init_df is None:
        coordinate = dist.Normal(0.0, target.init_scale)
    else:
        coordinate = dist.StudentT(target.init_df, 0.0, target.init_scale)
    return coordinate.expand([target.dim]).to_event(1)


def initial_log_density(target: Target, x: jax.Array) -> jax.Array:
    """``log pi_0(x)``."""
    return initial_distribution(target).log_prob(x)


def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(values, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(values - top), axis=axis))


def _initial_coordinate_log_density(
    s: float, nu: float | None, x: np.ndarray
) -> np.ndarray:
    """``log pi_0`` of one coordinate (scale ``s``, Student-t ``nu`` or normal)."""
    if nu is None:
        return -0.5 * np.square(x / s) - np.log(s * math.sqrt(2 * math.pi))
    log_norm = (
        math.lgamma((nu + 1) / 2)
        - math.lgamma(nu / 2)
        - 0.5 * math.log(nu * math.pi)
        - math.log(s)
    )
    return log_norm - 0.5 * (nu + 1) * np.log1p(np.square(x / s) / nu)


@functools.lru_cache(maxsize=2)
def _ring_grid(
    init_scale: float, init_df: float | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """``log pi_0`` and ``log gamma_K`` of the ring on the quadrature grid.

    They do not depend on ``beta``, so the grid (``[-25, 25]^2``, spacing
    0.025, 4 million points) is built once per initial density and each
    level's quadrature is one weighted sum of the two.
    """
    axis = np.linspace(-25.0, 25.0, 2001)
    xx, yy = np.meshgrid(axis, axis, sparse=True)
    log_pi0 = _initial_coordinate_log_density(
        init_scale, init_df, xx
    ) + _initial_coordinate_log_density(init_scale, init_df, yy)
    angles = 2.0 * np.pi * np.arange(RING_MODES) / RING_MODES
    per_mode = [
        -0.5
        * (
            np.square(xx - RING_RADIUS * np.cos(a))
            + np.square(yy - RING_RADIUS * np.sin(a))
        )
        / RING_VARIANCE
        for a in angles
    ]
    log_ring = _logsumexp(np.stack(per_mode), axis=0) - np.log(
        2 * np.pi * RING_VARIANCE
    )
    return log_pi0, log_ring, float(2 * np.log(axis[1] - axis[0]))


def quadrature_log_normalizer(target: Target, beta: float = 1.0) -> float:
    """``log Z_beta = log integral pi_0^(1 - beta) gamma_K^beta``, by quadrature.

    Riemann sums on uniform grids, which for smooth, fast-decaying
    integrands converge faster than any power of the spacing (float64):

    * ring: a square grid ``[-25, 25]^2`` with spacing 0.025;
    * funnel: the integrand factorises given ``v``,
      ``Z_beta = int dv a(v) b(v)^d`` with ``a(v) = pi_0(v)^(1 - beta)
      exp(-beta v^2 / 18)`` and ``b(v) = int dx pi_0(x)^(1 - beta)
      exp(-beta (x^2 exp(-v) + v) / 2)``; the inner grid is scaled to the
      width of the integrand at each ``v`` (so it resolves the funnel's
      neck).

    Args:
      target: the annealing problem.
      beta: the inverse temperature in ``[0, 1]``.

    Returns:
      The log normaliser, a Python float.
    """
    beta = float(beta)
    if target.name == "ring":
        log_pi0, log_ring, log_cell = _ring_grid(target.init_scale, target.init_df)
        log_gamma = (1.0 - beta) * log_pi0 + beta * log_ring
        return float(_logsumexp(log_gamma.ravel(), axis=0) + log_cell)
    if target.name == "funnel":
        v = np.linspace(-150.0, 150.0, 3001)[:, None]
        # The inner integrand's width, scale N(0, 3^2) and exp(v / 2) combined.
        width = 1.0 / np.sqrt((1.0 - beta) / target.init_scale**2 + beta * np.exp(-v))
        width = np.maximum(width, 1e-3 * target.init_scale * (1.0 - beta) + 1e-30)
        u = np.linspace(-60.0, 60.0, 2001)[None, :]
        x = width * u
        log_inner = (1.0 - beta) * _initial_coordinate_log_density(
            target.init_scale, target.init_df, x
        ) - 0.5 * beta * (np.square(x) * np.exp(-v) + v)
        log_b = _logsumexp(log_inner, axis=1) + np.log(
            width[:, 0] * (u[0, 1] - u[0, 0])
        )
        v = v[:, 0]
        log_a = (1.0 - beta) * _initial_coordinate_log_density(
            target.init_scale, target.init_df, v
        ) - beta * np.square(v / FUNNEL_V_SCALE) / 2
        d = target.dim - 1
        return float(_logsumexp(log_a + d * log_b, axis=0) + np.log(v[1] - v[0]))
    raise ValueError(f"annealing: no quadrature for target {target.name!r}.")
