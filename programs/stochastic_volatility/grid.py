"""The exact reference for the SV model: forward-backward on a fine state grid.

The state is one-dimensional, so the filtering recursion can be run on a grid
``z_1 < ... < z_G`` over ``mu ± width`` stationary sds: with the transition
``K_ij = N(z_j; mu + phi (z_i - mu), sigma^2) dz`` (the midpoint rule) and the
emission ``g_t(z_j) = N(y_t; 0, exp(z_j))``, the forward algorithm gives
``log p(y_{0:T-1})`` and the filtering marginals, and the backward pass the
smoothing marginals, exact up to the quadrature error (a Gaussian kernel
integrated on a grid much finer than ``sigma`` converges geometrically fast;
Kitagawa 1987, "Non-Gaussian state-space modeling of nonstationary time
series", JASA 82(400)). Cost ``O(T G^2)``; differentiable in the parameters.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from programs.stochastic_volatility.model import SVParams, stationary_sd


class GridPosterior(NamedTuple):
    """What the grid forward-backward computes.

    Attributes:
      grid: the state grid, shape ``(G,)``.
      log_likelihood: ``log p(y_{0:T-1})``, shape ``()``.
      filtering: ``p(x_t = z_j | y_{0:t})`` as grid weights, ``(T, G)``.
      smoothing: ``p(x_t = z_j | y_{0:T-1})`` as grid weights, ``(T, G)``.
      smoothed_mean: ``E[x_t | y]``, shape ``(T,)``.
      smoothed_sd: ``sd[x_t | y]``, shape ``(T,)``.
    """

    grid: jax.Array
    log_likelihood: jax.Array
    filtering: jax.Array
    smoothing: jax.Array
    smoothed_mean: jax.Array
    smoothed_sd: jax.Array


def state_grid(params: SVParams, num_points: int = 400, width: float = 6.0):
    """``num_points`` equally spaced states over ``mu ± width`` stationary sds."""
    half = width * stationary_sd(params)
    return params.mu + jnp.linspace(-half, half, num_points)


def _forward(params: SVParams, ys, num_points: int, width: float):
    """The scaled forward pass: grid, kernel, emissions, constants, filtering."""
    z = state_grid(params, num_points, width)
    dz = z[1] - z[0]
    mean_next = params.mu + params.phi * (z - params.mu)
    kernel = norm.pdf(z[None, :], mean_next[:, None], params.sigma) * dz
    log_g = norm.logpdf(ys[:, None], 0.0, jnp.exp(z[None, :] / 2))  # (T, G)
    # Any shift cancels in log c_t + shift, so it needs no gradient (and the
    # gradient of max is NaN under XLA's fast-compile flags of the tests).
    shift = jax.lax.stop_gradient(jnp.max(log_g, axis=1, keepdims=True))
    g = jnp.exp(log_g - shift)
    prior0 = norm.pdf(z, params.mu, stationary_sd(params)) * dz

    def forward(predicted, g_t):
        joint = predicted * g_t
        c_t = jnp.sum(joint)
        filtered = joint / c_t
        return filtered @ kernel, (filtered, c_t)

    _, (filtering, c) = jax.lax.scan(forward, prior0, g)
    log_likelihood = jnp.sum(jnp.log(c) + shift[:, 0])
    return z, kernel, g, c, filtering, log_likelihood


@functools.partial(jax.jit, static_argnames=("num_points", "width"))
def forward_backward(
    params: SVParams, ys: jax.Array, num_points: int = 400, width: float = 6.0
) -> GridPosterior:
    """The grid forward-backward algorithm (scaled, in probability space).

    Args:
      params: the model (floats or traced scalars: ``jit`` and ``vmap``
        apply; differentiate :func:`log_likelihood`).
      ys: observations, shape ``(T,)``.
      num_points: ``G``, grid points.
      width: the grid's half-width in stationary sds.

    Returns:
      :class:`GridPosterior`.
    """
    z, kernel, g, c, filtering, log_likelihood = _forward(params, ys, num_points, width)

    def backward(beta_next, inputs):
        g_next, c_next = inputs
        beta = kernel @ (g_next * beta_next) / c_next
        return beta, beta

    _, betas = jax.lax.scan(backward, jnp.ones_like(z), (g[1:], c[1:]), reverse=True)
    betas = jnp.concatenate([betas, jnp.ones_like(z)[None]], axis=0)
    smoothing = filtering * betas
    smoothing = smoothing / jnp.sum(smoothing, axis=1, keepdims=True)
    mean = smoothing @ z
    sd = jnp.sqrt(jnp.maximum(smoothing @ z**2 - mean**2, 0.0))
    return GridPosterior(z, log_likelihood, filtering, smoothing, mean, sd)


@functools.partial(jax.jit, static_argnames=("num_points", "width"))
def log_likelihood(params: SVParams, ys, num_points: int = 400, width: float = 6.0):
    """``log p(y_{0:T-1} | params)`` on the grid (the forward pass only).

    Differentiable in ``params`` (``jax.grad`` gives the grid's score).
    """
    return _forward(params, ys, num_points, width)[-1]


def parameter_posterior(ys, phis, sigmas, log_prior, num_points: int = 200, mu=0.0):
    """The posterior over a ``(phi, sigma)`` grid from the grid log-likelihood.

    Args:
      ys: observations, shape ``(T,)``.
      phis: grid of ``phi`` values, shape ``(P,)``.
      sigmas: grid of ``sigma`` values, shape ``(S,)``.
      log_prior: ``log_prior(phi, sigma)``, a density in ``(phi, sigma)``.
      num_points: state grid points per likelihood.
      mu: the (known) mean log-volatility.

    Returns:
      Normalised cell probabilities, shape ``(P, S)``, and the
      log-likelihoods, shape ``(P, S)``.
    """
    phi_grid, sigma_grid = jnp.meshgrid(phis, sigmas, indexing="ij")

    def one(phi, sigma):
        return log_likelihood(SVParams(phi, sigma, mu), ys, num_points)

    log_lik = jax.jit(jax.vmap(jax.vmap(one)))(phi_grid, sigma_grid)
    log_post = log_lik + log_prior(phi_grid, sigma_grid)
    probs = jax.nn.softmax(log_post.ravel()).reshape(log_post.shape)
    return probs, log_lik
