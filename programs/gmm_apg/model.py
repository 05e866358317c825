"""Amortised population Gibbs (APG) for 2-D Gaussian mixtures: the model.

Wu, Zimmermann, Sennesh, Le & van de Meent (2020), "Amortized Population
Gibbs Samplers with Neural Sufficient Statistics", ICML,
https://arxiv.org/abs/1911.01382, section 6.2 (the GMM experiment), with a
known isotropic variance instead of the paper's Normal-Gamma prior.

One *instance* is a small data set of ``N`` points::

    mu_k ~ N(0, sigma_0^2 I_2)            k = 1..K   (cluster means)
    c_n  ~ Categorical(1/K, ..., 1/K)     n = 1..N   (assignments)
    x_n  ~ N(mu_{c_n}, sigma^2 I_2)                   (observed points)

Block Gibbs over ``mu`` and ``c`` with learned kernels in place of the
exact conditionals: ``q(mu | x, c)`` sums per-point features ``phi(x_n)``
per cluster (*neural sufficient statistics*) and feeds the sums to the
conjugate Gaussian update with learned precisions (with ``phi(x) = x`` it
is the exact conditional); ``q(c | x, mu)`` is an MLP per (point,
cluster); the initial proposal ``q(mu | x)`` is a set encoder whose soft
assignments feed the same update. ``algo.apgs(target, [kernel_mu,
kernel_c], num_sweeps)`` proposes from the composed kernels (trained by
reweighted wake-sleep), then each sweep resamples and re-draws one block at
a time (a Gibbs kernel is its own reverse kernel).

Particles and instances are plates (``particles`` at dim -2, outermost;
``instances`` at dim -1), points and clusters are event dimensions: the
library reads every plate inside the particle plate as an axis of the log
weights, which thus have shape ``(particles, instances)``.
"""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

import combinators
from combinators.flax_utils import BindModule

NUM_CLUSTERS = 3
NUM_POINTS = 60
PRIOR_SCALE = 5.0  # sigma_0: spread of the cluster means
NOISE_SCALE = 1.0  # sigma: known within-cluster standard deviation
HIDDEN = 64
ASSIGN_HIDDEN = 32


@contextlib.contextmanager
def plates(num_particles: int, num_instances: int):
    """The particle plate (dim -2, outermost) and the instance plate (dim -1)."""
    with numpyro.plate("particles", num_particles, dim=-2):
        with numpyro.plate("instances", num_instances, dim=-1):
            yield


def _gather_means(mu, c):
    """``mu[..., c_n, :]`` for every point: shape ``c.shape + (2,)``."""
    return jnp.take_along_axis(mu, c[..., None], axis=-2)


def target(num_particles: int, x):
    """The generative model ``p(mu, c, x)`` observed at ``x`` ``(B, N, 2)``.

    Returns ``(x, mu, c)``, the arguments every kernel receives.
    """
    num_instances, num_points, _ = x.shape
    with plates(num_particles, num_instances):
        mu = numpyro.sample(
            "mu", dist.Normal(0.0, PRIOR_SCALE).expand([NUM_CLUSTERS, 2]).to_event(2)
        )
        c = numpyro.sample(
            "c",
            dist.Categorical(logits=jnp.zeros(NUM_CLUSTERS))
            .expand([num_points])
            .to_event(1),
        )
        numpyro.sample(
            "x", dist.Normal(_gather_means(mu, c), NOISE_SCALE).to_event(2), obs=x
        )
    return x, mu, c


def kernel_mu(network, num_particles: int, x, mu=None, c=None):
    """The learned Gibbs kernel ``q(mu | x, c)``; ``q(mu | x)`` when ``c`` is None.

    The old ``mu`` is ignored (a Gibbs kernel does not look at the block it
    replaces). Returns ``(x, mu)``, the arguments of :func:`kernel_c`.
    """
    del mu
    if c is None:
        loc, scale = network.initial_means(x)
    else:
        loc, scale = network.means(x, c)
    with plates(num_particles, x.shape[0]):
        mu = numpyro.sample("mu", dist.Normal(loc, scale).to_event(2))
    return x, mu


def kernel_c(network, num_particles: int, x, mu, c=None):
    """The learned Gibbs kernel ``q(c | x, mu)``: a categorical per point."""
    del c
    logits = network.assignments(x, mu)
    with plates(num_particles, x.shape[0]):
        c = numpyro.sample("c", dist.Categorical(logits=logits).to_event(1))
    return x, mu, c


class MLP(nn.Module):
    """``layers`` times ``Dense(hidden) - tanh``, then ``Dense(features)``."""

    features: int
    hidden: int = HIDDEN
    layers: int = 2

    @nn.compact
    def __call__(self, x):
        """Applies the network to the last axis of ``x``."""
        for _ in range(self.layers):
            x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.features)(x)


class ConjugateMeans(nn.Module):
    """``q(mu | x, r)`` from assignment-weighted point features ``(B, K, 2)``.

    ``T_k = sum_n r_nk phi(x_n)`` with ``phi(x) = x + s * MLP(x / s)``
    (``s = sigma_0``), ``n_k = sum_n r_nk``, ``precision_k = a_0 + a_1 n_k``,
    ``loc_k = a_1 T_k / precision_k``, ``scale_k = precision_k^(-1/2)``.
    """

    @nn.compact
    def __call__(self, x, weights):
        """``(loc, scale)`` from points ``(B, N, 2)`` and weights ``(..., B, N, K)``."""
        phi = x + PRIOR_SCALE * MLP(2)(x / PRIOR_SCALE)
        phi = jnp.broadcast_to(phi, weights.shape[:-1] + (2,))
        counts = jnp.sum(weights, axis=-2)[..., None]
        sums = jnp.einsum("...nk,...nd->...kd", weights, phi)
        init_a0 = math.log(math.expm1(1.0 / PRIOR_SCALE**2))
        init_a1 = math.log(math.expm1(0.5 / NOISE_SCALE**2))
        a0 = nn.softplus(self.param("a0", nn.initializers.constant(init_a0), ()))
        a1 = nn.softplus(self.param("a1", nn.initializers.constant(init_a1), ()))
        precision = a0 + a1 * counts
        loc = a1 * sums / precision
        return loc, jnp.broadcast_to(1.0 / jnp.sqrt(precision), loc.shape)


class GMMKernels(nn.Module):
    """The networks: ``initial_means(x)``, ``means(x, c)``, ``assignments(x, mu)``."""

    def setup(self):
        """Creates the submodules."""
        self.soft_assign = MLP(NUM_CLUSTERS)
        self.initial_stats = ConjugateMeans()
        self.stats = ConjugateMeans()
        # Applied to every (point, cluster, particle, instance): kept small.
        self.logit = MLP(1, hidden=ASSIGN_HIDDEN, layers=1)

    def initial_means(self, x):
        """``q(mu | x)``: soft assignments from a set encoder, then the update.

        Each point is expressed in the instance's whitened principal frame,
        each axis signed so that its third moment is positive (the same
        frame for any ordering, translation, rotation or reflection of the
        points); an MLP of these coordinates and the spreads gives soft
        assignments over the K clusters.
        """
        centre = jnp.mean(x, axis=-2, keepdims=True)
        deviation = x - centre
        covariance = (
            jnp.einsum("...ni,...nj->...ij", deviation, deviation) / x.shape[-2]
        )
        variances, axes = jnp.linalg.eigh(covariance)  # (..., 2), (..., 2, 2)
        coords = jnp.einsum("...ni,...ij->...nj", deviation, axes)
        coords = coords / jnp.sqrt(variances[..., None, :] + 1e-3)
        sign = jnp.where(jnp.mean(coords**3, axis=-2, keepdims=True) < 0, -1.0, 1.0)
        spreads = jnp.broadcast_to(
            jnp.sqrt(variances)[..., None, :] / PRIOR_SCALE, coords.shape
        )
        features = jnp.concatenate([sign * coords, spreads], axis=-1)
        weights = jax.nn.softmax(self.soft_assign(features), axis=-1)
        return self.initial_stats(x, weights)

    def means(self, x, c):
        """``q(mu | x, c)``: one-hot assignments weight the point features."""
        return self.stats(x, jax.nn.one_hot(c, NUM_CLUSTERS))

    def assignments(self, x, mu):
        """Logits of ``q(c_n = k | x_n, mu_k)``, shape ``(P, B, N, K)``."""
        xs = jnp.broadcast_to(
            x[..., :, None, :], mu.shape[:-2] + (x.shape[-2], NUM_CLUSTERS, 2)
        )
        ms = jnp.broadcast_to(mu[..., None, :, :], xs.shape)
        diff = (xs - ms) / NOISE_SCALE
        features = [xs / PRIOR_SCALE, ms / PRIOR_SCALE, diff]
        features.append(jnp.sum(diff**2, -1, keepdims=True))
        return self.logit(jnp.concatenate(features, axis=-1))[..., 0]

    def __call__(self, x, c):
        """Touches every submodule (for ``init``)."""
        loc, _ = self.initial_means(x)
        return self.means(x, c), self.assignments(x, loc)


def init_params(key: jax.Array, num_points: int = NUM_POINTS):
    """Initial parameters of :class:`GMMKernels`."""
    x = jnp.zeros((1, num_points, 2))
    c = jnp.zeros((1, num_points), jnp.int32)
    return jax.jit(GMMKernels().init)(key, x, c)  # one compilation, not one per op


def make_program(params, num_particles: int, num_sweeps):
    """APG, ``apgs(target, [kernel_mu, kernel_c], num_sweeps)``, a program of ``x``.

    Args:
      params: :class:`GMMKernels` parameters.
      num_particles: the size of the particle plate.
      num_sweeps: Gibbs sweeps after the initial proposal (an int, or a
        traced integer when the program is only evaluated).

    Returns:
      The program of ``x`` ``(B, N, 2)``; its loss is RWS for the initial
      proposal plus the APG loss of every sweep, its log weights ``(P, B)``.
    """
    network = BindModule(GMMKernels(), params)
    kernels = [
        functools.partial(kernel_mu, network, num_particles),
        functools.partial(kernel_c, network, num_particles),
    ]
    p = functools.partial(target, num_particles)
    return combinators.algo.apgs(p, kernels, num_sweeps=num_sweeps)
