"""Amortised population Gibbs (APG) for 2-D Gaussian mixtures.

Wu, Zimmermann, Sennesh, Le & van de Meent (2020), "Amortized Population
Gibbs Samplers with Neural Sufficient Statistics", ICML,
https://arxiv.org/abs/1911.01382, section 6.2 (the GMM experiment), with a
known isotropic variance instead of the paper's Normal-Gamma prior.

Model (one *instance* = one small data set of ``N`` points)::

    mu_k ~ N(0, sigma_0^2 I_2)            k = 1..K   (cluster means)
    c_n  ~ Categorical(1/K, ..., 1/K)     n = 1..N   (assignments)
    x_n  ~ N(mu_{c_n}, sigma^2 I_2)                   (observed points)

Inference is block Gibbs over the two blocks ``mu`` and ``c`` with learned
kernels that take the place of the exact conditionals:

* ``q(mu | x, c)``: *neural sufficient statistics*. Every point gets a
  feature ``phi(x_n)`` (an MLP with a skip connection); the features are
  summed per cluster with the assignments as weights, and the sums enter
  the conjugate Gaussian update of each mean (learned pseudo-precisions).
  With ``phi(x) = x`` and precisions ``1/sigma_0^2`` and ``1/sigma^2`` it
  is the exact conditional, so the family contains the answer.
* ``q(c | x, mu)``: a per-point MLP over ``(x_n, mu_k)`` gives the logit of
  assigning point ``n`` to cluster ``k``.
* The initial proposal ``q(mu | x)`` is a set encoder: pooled moments of
  the instance (mean, covariance, third moments) define a canonical
  whitened frame; a per-point MLP of the point's coordinates in that frame
  gives soft assignments, which feed the same conjugate update (with its
  own parameters).

``combinators.algo.apgs(target, [kernel_mu, kernel_c], num_sweeps=S)``
assembles the sampler: the composed kernels propose the first population
(trained by reweighted wake-sleep), each sweep resamples and re-draws one
block at a time, weighted by ``p(x, z') q(z_b | z'_{-b}) / (p(x, z)
q(z'_b | z_{-b}))`` (the kernel is its own reverse kernel), and trained
by the APG objective.

Particles and instances are two plates: ``particles`` (dim -2, outermost)
and ``instances`` (dim -1, the minibatch of data sets); the points and
clusters are event dimensions (``to_event``), so the log weights have shape
``(particles, instances)`` and resampling is per instance. (Points and
clusters are not plates: the library reads every plate inside the particle
plate as an axis of the log weights, so a ``points`` plate would give one
weight per point, and ``points`` and ``clusters`` plates of different sizes
at the same dim would leave a trailing axis of size 1.)

Run it with ``python -m programs gmm_apg``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import math
import os
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax.scipy.stats import norm

import combinators
from combinators.flax_utils import BindModule
from combinators.train import train

__all__ = [
    "DESCRIPTION",
    "Data",
    "GMMKernels",
    "clustering_accuracy",
    "evaluate",
    "exact_kernel_c",
    "exact_kernel_mu",
    "kernel_c",
    "kernel_mu",
    "log_joint",
    "loss_fn",
    "make_program",
    "oracle_accuracy",
    "run",
    "simulate",
    "target",
    "well_separated",
]

DESCRIPTION = (
    "APG for 2-D Gaussian mixtures (Wu et al. 2020): apgs with learned Gibbs "
    "kernels (neural sufficient statistics)"
)

NUM_CLUSTERS = 3
NUM_POINTS = 60
PRIOR_SCALE = 5.0  # sigma_0: spread of the cluster means
NOISE_SCALE = 1.0  # sigma: known within-cluster standard deviation
NUM_TRAIN = 10_000
NUM_TEST = 500
BATCH = 20  # instances per training step
NUM_SWEEPS = 5
HIDDEN = 64
ASSIGN_HIDDEN = 32
LEARNING_RATE = 3e-3
EVAL_PARTICLES = 20
EVAL_CHUNK = 100  # test instances per evaluation call (bounds memory)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


class Data(NamedTuple):
    """Mixture instances with their true latents.

    Attributes:
      x: points, shape ``(instances, N, 2)``.
      c: true assignments, shape ``(instances, N)``.
      mu: true means, shape ``(instances, K, 2)``.
    """

    x: jax.Array
    c: jax.Array
    mu: jax.Array


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def simulate(
    key: jax.Array,
    num_instances: int,
    num_points: int = NUM_POINTS,
    num_clusters: int = NUM_CLUSTERS,
) -> Data:
    """Draws independent mixture instances from the generative model.

    Args:
      key: a PRNG key.
      num_instances: the number of data sets.
      num_points: points per data set.
      num_clusters: clusters per data set.

    Returns:
      :class:`Data` with float32 points and means and int32 assignments.
      The function is jit-compiled (the sizes are static).
    """
    key_mu, key_c, key_noise = jax.random.split(key, 3)
    mu = PRIOR_SCALE * jax.random.normal(key_mu, (num_instances, num_clusters, 2))
    c = jax.random.randint(key_c, (num_instances, num_points), 0, num_clusters)
    loc = jnp.take_along_axis(mu, c[..., None], axis=-2)
    x = loc + NOISE_SCALE * jax.random.normal(key_noise, loc.shape)
    return Data(x=x, c=c, mu=mu)


def log_joint(x, mu, c):
    """``log p(x, mu, c)`` by hand, summed over points, clusters and dimensions.

    Args:
      x: points ``(..., N, 2)``.
      mu: means ``(..., K, 2)``.
      c: assignments ``(..., N)``.

    Returns:
      The log joint density, shape ``broadcast(...)``.
    """
    num_clusters = mu.shape[-2]
    loc = jnp.take_along_axis(mu, c[..., None], axis=-2)
    return (
        jnp.sum(norm.logpdf(mu, 0.0, PRIOR_SCALE), axis=(-2, -1))
        - c.shape[-1] * jnp.log(num_clusters)
        + jnp.sum(norm.logpdf(x, loc, NOISE_SCALE), axis=(-2, -1))
    )


# ---------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------


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
    """The generative model ``p(mu, c, x)``, observed at ``x``.

    Args:
      num_particles: the size of the particle plate.
      x: the instances, shape ``(B, N, 2)``.

    Returns:
      ``(x, mu, c)``, the arguments every kernel receives.

    References:
      Wu et al. (2020), https://arxiv.org/abs/1911.01382, section 6.2.
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

    Called with the data alone it is the initial proposal (the set
    encoder); called with the target's outputs ``(x, mu, c)`` it re-draws
    the means given the assignments (the old ``mu`` is ignored: a Gibbs
    kernel does not look at the block it replaces).

    Args:
      network: a bound :class:`GMMKernels`.
      num_particles: the size of the particle plate.
      x: the instances, shape ``(B, N, 2)``.
      mu: ignored (present so the kernel accepts the target's outputs).
      c: assignments ``(P, B, N)``, or None for the initial proposal.

    Returns:
      ``(x, mu)``, the arguments of :func:`kernel_c`.
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
    """The learned Gibbs kernel ``q(c | x, mu)``: a categorical per point.

    Args:
      network: a bound :class:`GMMKernels`.
      num_particles: the size of the particle plate.
      x: the instances, shape ``(B, N, 2)``.
      mu: means ``(P, B, K, 2)``.
      c: ignored (the block this kernel replaces).

    Returns:
      ``(x, mu, c)``, the target's outputs.
    """
    del c
    logits = network.assignments(x, mu)
    with plates(num_particles, x.shape[0]):
        c = numpyro.sample("c", dist.Categorical(logits=logits).to_event(1))
    return x, mu, c


def exact_mean_posterior(x, c):
    """Exact ``p(mu | x, c)``: per-cluster conjugate Gaussian (loc, scale).

    ``precision_k = 1/sigma_0^2 + n_k / sigma^2`` and ``loc_k = (sum_{n in k}
    x_n / sigma^2) / precision_k``.
    """
    one_hot = jax.nn.one_hot(c, NUM_CLUSTERS)  # (..., N, K)
    counts = jnp.sum(one_hot, axis=-2)[..., None]  # (..., K, 1)
    sums = jnp.einsum(
        "...nk,...nd->...kd", one_hot, jnp.broadcast_to(x, c.shape + (2,))
    )
    precision = 1.0 / PRIOR_SCALE**2 + counts / NOISE_SCALE**2
    return sums / NOISE_SCALE**2 / precision, jnp.broadcast_to(
        1.0 / jnp.sqrt(precision), sums.shape
    )


def exact_assignment_logits(x, mu):
    """Exact ``p(c_n | x, mu)`` logits: ``-|x_n - mu_k|^2 / (2 sigma^2)``."""
    diff = x[..., :, None, :] - mu[..., None, :, :]  # (..., N, K, 2)
    return -0.5 * jnp.sum(diff**2, axis=-1) / NOISE_SCALE**2


def exact_kernel_mu(num_particles: int, x, mu=None, c=None, *, initial=None):
    """The exact Gibbs kernel ``p(mu | x, c)``.

    Without ``c`` it is the initial proposal: the prior, or
    ``N(initial(x))`` when a function ``initial(x) -> (loc, scale)`` is
    given (e.g. the learned set encoder).
    """
    del mu
    if c is None and initial is not None:
        loc, scale = initial(x)
    elif c is None:
        loc = jnp.zeros((x.shape[0], NUM_CLUSTERS, 2))
        scale = jnp.full(loc.shape, PRIOR_SCALE)
    else:
        loc, scale = exact_mean_posterior(x, c)
    with plates(num_particles, x.shape[0]):
        mu = numpyro.sample("mu", dist.Normal(loc, scale).to_event(2))
    return x, mu


def exact_kernel_c(num_particles: int, x, mu, c=None):
    """The exact Gibbs kernel ``p(c | x, mu)``."""
    del c
    with plates(num_particles, x.shape[0]):
        c = numpyro.sample(
            "c", dist.Categorical(logits=exact_assignment_logits(x, mu)).to_event(1)
        )
    return x, mu, c


# ---------------------------------------------------------------------------
# Networks (neural sufficient statistics)
# ---------------------------------------------------------------------------


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
    """Gaussian over each cluster mean from assignment-weighted point features.

    ``T_k = sum_n r_nk phi(x_n)`` with ``phi(x) = x + s * MLP(x / s)``
    (``s = sigma_0``), ``n_k = sum_n r_nk``, and the conjugate-form update
    ``precision_k = a_0 + a_1 n_k``, ``loc_k = a_1 T_k / precision_k``,
    ``scale_k = 1 / sqrt(precision_k)`` with learned ``a_0, a_1 > 0``.
    """

    @nn.compact
    def __call__(self, x, weights):
        """Mean and scale of ``q(mu | x, r)``.

        Args:
          x: points ``(B, N, 2)``.
          weights: assignment weights ``(..., B, N, K)`` (one-hot or soft).

        Returns:
          ``(loc, scale)``, each of shape ``(..., B, K, 2)``.
        """
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
    """The three networks of APG for the GMM.

    * ``initial_means(x)``: the set encoder of ``q(mu | x)``;
    * ``means(x, c)``: ``q(mu | x, c)``;
    * ``assignments(x, mu)``: logits of ``q(c | x, mu)``.

    References:
      Wu et al. (2020), https://arxiv.org/abs/1911.01382, section 6.2 and
      appendix F.1 (neural sufficient statistics).
    """

    def setup(self):
        """Creates the submodules."""
        self.soft_assign = MLP(NUM_CLUSTERS)
        self.initial_stats = ConjugateMeans()
        self.stats = ConjugateMeans()
        # Applied to every (point, cluster, particle, instance): kept small.
        self.logit = MLP(1, hidden=ASSIGN_HIDDEN, layers=1)

    def initial_means(self, x):
        """``q(mu | x)``: soft assignments from a set encoder, then the update.

        The set is summarised by pooled moments: its centre, its covariance
        (principal axes and spreads) and the third moment along each axis.
        Each point is expressed in the instance's whitened principal frame,
        with each axis signed so that the third moment is positive (a
        canonical frame: the same for any ordering, translation, rotation or
        reflection of the points), and a per-point MLP maps these
        coordinates and the spreads to soft assignments over the K clusters.
        The encoder is permutation invariant in the points.
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
        features = jnp.concatenate(
            [
                xs / PRIOR_SCALE,
                ms / PRIOR_SCALE,
                diff,
                jnp.sum(diff**2, -1, keepdims=True),
            ],
            axis=-1,
        )
        return self.logit(features)[..., 0]

    def __call__(self, x, c):
        """Touches every submodule (for ``init``)."""
        loc, _ = self.initial_means(x)
        return self.means(x, c), self.assignments(x, loc)


def init_params(key: jax.Array, num_points: int = NUM_POINTS):
    """Initial parameters of :class:`GMMKernels`."""
    x = jnp.zeros((1, num_points, 2))
    c = jnp.zeros((1, num_points), jnp.int32)
    return jax.jit(GMMKernels().init)(key, x, c)  # one compilation, not one per op


# ---------------------------------------------------------------------------
# The APG sampler
# ---------------------------------------------------------------------------


def make_program(params, num_particles: int, num_sweeps, *, exact: bool = False):
    """APG: ``apgs(target, [kernel_mu, kernel_c], num_sweeps)``.

    Args:
      params: :class:`GMMKernels` parameters, or None for the exact
        (conjugate) Gibbs kernels with the prior as initial proposal.
      num_particles: the size of the particle plate.
      num_sweeps: Gibbs sweeps after the initial proposal (an int, or a
        traced integer when the program is only evaluated).
      exact: with ``params``, use the exact Gibbs kernels for the sweeps
        and the learned set encoder only for the initial ``q(mu | x)``.

    Returns:
      The inference program of the data ``x`` (shape ``(B, N, 2)``);
      its loss is RWS for the initial proposal plus the APG loss of every
      kernel in every sweep, and its log weights have shape
      ``(num_particles, B)``.

    References:
      Wu et al. (2020), https://arxiv.org/abs/1911.01382.
    """
    p = functools.partial(target, num_particles)
    if params is None:
        kernels = [
            functools.partial(exact_kernel_mu, num_particles),
            functools.partial(exact_kernel_c, num_particles),
        ]
    elif exact:
        network = BindModule(GMMKernels(), params)
        kernels = [
            functools.partial(
                exact_kernel_mu, num_particles, initial=network.initial_means
            ),
            functools.partial(exact_kernel_c, num_particles),
        ]
    else:
        network = BindModule(GMMKernels(), params)
        kernels = [
            functools.partial(kernel_mu, network, num_particles),
            functools.partial(kernel_c, network, num_particles),
        ]
    return combinators.algo.apgs(p, kernels, num_sweeps=num_sweeps)


def loss_fn(params, key, *, data, batch_size: int, num_particles: int, num_sweeps: int):
    """The APG training loss on a random minibatch of instances.

    Args:
      params: :class:`GMMKernels` parameters.
      key: the step's key (split into a minibatch key and a program key).
      data: training points ``(num_train, N, 2)``.
      batch_size: instances per step.
      num_particles: particles per instance.
      num_sweeps: Gibbs sweeps.

    Returns:
      ``(loss, metrics)``; the loss is the program's loss divided by the
      number of instances.
    """
    key_batch, key_program = jax.random.split(key)
    index = jax.random.choice(key_batch, data.shape[0], (batch_size,), replace=False)
    program = make_program(params, num_particles, num_sweeps)
    _, _, metrics = combinators.traced_evaluate(program, seed=key_program)(data[index])
    metrics = metrics.replace(loss=metrics.loss / batch_size)
    return metrics["loss"], metrics


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _permutations(num_clusters: int) -> np.ndarray:
    return np.asarray(list(itertools.permutations(range(num_clusters))))


def clustering_accuracy(c_inferred, c_true):
    """Fraction of points assigned correctly, up to the best relabelling.

    The best matching of inferred to true labels is found by trying all
    ``K!`` permutations (6 for K = 3), vectorised.

    Args:
      c_inferred: inferred assignments ``(..., N)``.
      c_true: true assignments, broadcastable to ``c_inferred``.

    Returns:
      The accuracy of each instance, shape ``(...)``.
    """
    perms = jnp.asarray(_permutations(NUM_CLUSTERS))  # (K!, K)
    relabelled = perms[:, c_inferred]  # (K!, ..., N)
    correct = jnp.mean(relabelled == c_true, axis=-1)
    return jnp.max(correct, axis=0)


def best_permutation(c_inferred, c_true):
    """The permutation ``perm`` maximising agreement of ``perm[c_inferred]``."""
    perms = _permutations(NUM_CLUSTERS)
    scores = [(perm[c_inferred] == c_true).mean() for perm in perms]
    return perms[int(np.argmax(scores))]


WELL_SEPARATED = 4.0  # minimum distance between true means, in units of sigma


def well_separated(mu) -> np.ndarray:
    """Instances whose true means are all at least 4 sigma apart.

    Args:
      mu: true means ``(B, K, 2)``.

    Returns:
      A boolean array ``(B,)``.
    """
    mu = np.asarray(mu)
    distances = [
        np.linalg.norm(mu[:, i] - mu[:, j], axis=-1)
        for i, j in itertools.combinations(range(mu.shape[1]), 2)
    ]
    return np.min(distances, axis=0) >= WELL_SEPARATED * NOISE_SCALE


def oracle_accuracy(data: Data):
    """Accuracy of assigning each point to its nearest *true* mean (a ceiling)."""
    nearest = jnp.argmax(exact_assignment_logits(data.x, data.mu), axis=-1)
    return clustering_accuracy(nearest, data.c)


def _summaries(params, key, x, c_true, num_particles, num_sweeps, exact):
    program = make_program(params, num_particles, num_sweeps, exact=exact)
    (_, mu, c), _, metrics = combinators.traced_evaluate(program, seed=key)(x)
    w = jax.nn.softmax(metrics.log_weight, axis=0)  # (P, B)
    return {
        "log_joint": jnp.sum(w * log_joint(x, mu, c), axis=0),
        "accuracy": jnp.sum(w * clustering_accuracy(c, c_true), axis=0),
        "log_Z": jax.scipy.special.logsumexp(metrics.log_weight, axis=0)
        - jnp.log(num_particles),
        "ess": 1.0 / jnp.sum(w**2, axis=0),
        "mu": mu,
        "c": c,
        "weights": w,
    }


# The number of sweeps is a traced argument (the loop becomes a while loop),
# so every number of sweeps shares one compiled function.
_summaries_jit = jax.jit(_summaries, static_argnums=(4, 6))


def evaluate(
    params,
    key: jax.Array,
    data: Data,
    *,
    num_particles: int = EVAL_PARTICLES,
    sweeps=range(NUM_SWEEPS + 1),
    chunk: int = EVAL_CHUNK,
    exact: bool = False,
):
    """Log joint, clustering accuracy, log Z and ESS after each number of sweeps.

    Every number of sweeps uses the same key, so the run with ``s`` sweeps
    is the first part of the run with ``s + 1`` (the loop folds the sweep
    index into one key).

    Args:
      params: :class:`GMMKernels` parameters, or None for exact Gibbs.
      key: the evaluation key.
      data: the test instances.
      num_particles: particles per instance.
      sweeps: the numbers of sweeps to evaluate.
      chunk: instances per call (the whole set is split into chunks).
      exact: exact Gibbs kernels after the learned initial proposal (see
        :func:`make_program`).

    Returns:
      ``{s: {"log_joint", "accuracy", "log_Z", "ess"}}`` with per-instance
      arrays (the log joint is the weighted mean over particles, the
      accuracy the weighted mean over particles of the matched accuracy),
      and ``{s: (mu, c, weights)}`` for the first chunk (for plots).
    """
    results, samples = {}, {}
    for s in sweeps:
        parts = []
        for start in range(0, data.x.shape[0], chunk):
            part = _summaries_jit(
                params,
                jax.random.fold_in(key, start),
                data.x[start : start + chunk],
                data.c[start : start + chunk],
                num_particles,
                jnp.asarray(s, jnp.int32),
                exact,
            )
            if start == 0:
                samples[int(s)] = (part["mu"], part["c"], part["weights"])
            parts.append(
                {
                    k: np.asarray(part[k])
                    for k in ("log_joint", "accuracy", "log_Z", "ess")
                }
            )
        results[int(s)] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return results, samples


# ---------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------


def plot(
    path: str, data: Data, samples, sweeps, curves, losses, num_instances: int = 4
) -> None:
    """Saves the figure: instances coloured by inferred clusters per sweep, curves.

    Rows are test instances; columns show the highest-weight particle after
    each number of sweeps in ``sweeps`` (points coloured by its assignments,
    relabelled to best match the truth; crosses: its means; faint dots: the
    means of all particles; black stars: the true means). The last row shows
    accuracy and log joint against the number of sweeps and the training
    loss.

    Args:
      path: the PNG file.
      data: the test instances (the first ``num_instances`` are drawn).
      samples: ``{s: (mu, c, weights)}`` from :func:`evaluate`.
      sweeps: the sweep counts to show (keys of ``samples``).
      curves: ``{"sweeps": [...], "accuracy": [...], "log_joint": [...]}``,
        optionally with the same fields prefixed ``exact_`` (exact kernels
        after the learned initial proposal) and ``prior_`` (exact kernels
        from the prior), and ``reference_accuracy`` and
        ``reference_log_joint`` (horizontal lines: the nearest-true-mean
        accuracy and the log joint at the true latents).
      losses: training losses.
      num_instances: rows of scatter plots.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = plot_figure(Figure, data, samples, sweeps, curves, losses, num_instances)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90)


def plot_figure(
    figure_cls, data: Data, samples, sweeps, curves, losses, num_instances: int = 4
):
    """Builds the figure of :func:`plot` with ``figure_cls`` (e.g. plt.figure)."""
    ncols = max(len(sweeps), 3)
    fig = figure_cls(
        figsize=(4 * ncols, 3.6 * (num_instances + 1)), layout="constrained"
    )
    axes = fig.subplots(num_instances + 1, ncols, squeeze=False)
    colors = np.array(["C0", "C1", "C2", "C3", "C4"])
    x, c_true, mu_true = (np.asarray(a) for a in data)
    for row in range(num_instances):
        for col, s in enumerate(sweeps):
            ax = axes[row, col]
            mu, c, w = (np.asarray(a) for a in samples[s])
            best = int(np.argmax(w[:, row]))
            perm = best_permutation(c[best, row], c_true[row])
            ax.scatter(*x[row].T, s=9, color=colors[perm[c[best, row]]])
            all_means = mu[:, row].reshape(-1, 2)
            ax.scatter(*all_means.T, s=4, color="0.5", alpha=0.3)
            for k in range(NUM_CLUSTERS):
                ax.scatter(
                    *mu[best, row, k],
                    marker="X",
                    s=110,
                    color=colors[perm[k]],
                    edgecolor="k",
                )
            ax.scatter(*mu_true[row].T, marker="*", s=90, color="k")
            ax.set_title(
                f"instance {row}, {s} sweep{'s' if s != 1 else ''}", fontsize=9
            )
            ax.set_aspect("equal", adjustable="datalim")
        for col in range(len(sweeps), ncols):
            axes[row, col].axis("off")
    reference_labels = {
        "accuracy": "nearest true mean",
        "log_joint": "at the true latents",
    }
    variants = [
        ("", "APG, learned kernels", "o-"),
        ("exact_", "exact Gibbs kernels, learned q(mu | x)", "s--"),
        ("prior_", "exact Gibbs kernels, prior initialisation", "^:"),
    ]
    for ax, field, title in [
        (axes[-1, 0], "accuracy", "clustering accuracy (test)"),
        (axes[-1, 1], "log_joint", "log p(x, mu, c) per instance (test)"),
    ]:
        for prefix, label, style in variants:
            if prefix + field in curves:
                ax.plot(curves["sweeps"], curves[prefix + field], style, label=label)
        reference = curves.get(f"reference_{field}")
        if reference is not None:
            ax.axhline(
                reference, color="k", lw=0.8, ls="--", label=reference_labels[field]
            )
        ax.set_xlabel("sweeps")
        ax.set_title(title)
        ax.legend(fontsize=8)
    if "reference_log_joint" in curves:
        # Zoom on the learned sampler; exact Gibbs from the prior starts far below.
        top = max(curves["reference_log_joint"], *curves["log_joint"])
        axes[-1, 1].set_ylim(min(curves["log_joint"]) - 30.0, top + 5.0)
    ax = axes[-1, 2]
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.6, color="C3")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training loss (per instance)")
    for col in range(3, ncols):
        axes[-1, col].axis("off")
    return fig


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def run(
    *,
    steps: int = 1000,
    particles: int = 10,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    num_sweeps: int = NUM_SWEEPS,
    batch_size: int = BATCH,
    num_train: int = NUM_TRAIN,
    num_test: int = NUM_TEST,
) -> dict[str, float]:
    """Trains APG on simulated instances, evaluates it and saves figure and metrics.

    Args:
      steps: optimisation steps (Adam).
      particles: particles per instance during training (evaluation uses
        ``max(particles, 20)``).
      seed: seeds data, initialisation, training and evaluation.
      out: output directory; ``gmm_apg.png`` and ``gmm_apg_metrics.json``.
      progress: show a progress bar; if False, training prints nothing.
      num_sweeps: Gibbs sweeps during training and the largest number
        evaluated.
      batch_size: instances per training step.
      num_train: training instances.
      num_test: held-out test instances.

    Returns:
      The final metrics as floats: test accuracy and mean log joint after 0,
      1 and ``num_sweeps`` sweeps, the accuracy on well-separated instances
      (true means at least 4 sigma apart) and the ceiling set by assigning
      each point to its nearest true mean, log Z and ESS, the same after
      ``num_sweeps`` sweeps for two references (exact Gibbs kernels after
      the learned initial proposal; exact Gibbs kernels from the prior),
      and the first and last training losses.

    References:
      Wu et al. (2020), https://arxiv.org/abs/1911.01382.
    """
    if steps < 1:
        raise ValueError(f"gmm_apg: steps must be at least 1, got {steps}.")
    if particles < 1:
        raise ValueError(f"gmm_apg: particles must be at least 1, got {particles}.")
    if num_sweeps < 1:
        raise ValueError(f"gmm_apg: num_sweeps must be at least 1, got {num_sweeps}.")
    tic = time.perf_counter()
    key = jax.random.key(seed)
    key_train_data, key_test_data, key_init, key_train, key_eval = jax.random.split(
        key, 5
    )
    train_data = simulate(key_train_data, num_train)
    test_data = simulate(key_test_data, num_test)
    params = init_params(key_init)

    silent = (
        contextlib.nullcontext()
        if progress
        else contextlib.redirect_stdout(io.StringIO())
    )
    train_tic = time.perf_counter()
    with silent:
        result = train(
            functools.partial(
                loss_fn,
                batch_size=batch_size,
                num_particles=particles,
                num_sweeps=num_sweeps,
            ),
            params,
            optax.adam(LEARNING_RATE),
            steps,
            seed=key_train,
            progress=progress,
            return_result=True,
            data=train_data.x,
        )
    train_seconds = time.perf_counter() - train_tic
    losses = np.asarray(result.history["loss"])

    eval_particles = max(particles, EVAL_PARTICLES)
    sweeps = list(range(num_sweeps + 1))
    evaluate_ = functools.partial(
        evaluate,
        key=key_eval,
        data=test_data,
        num_particles=eval_particles,
        sweeps=sweeps,
    )
    tables = {"learned": evaluate_(result.params)}
    tables["exact"] = evaluate_(result.params, exact=True)
    tables["prior"] = evaluate_(None)
    samples = tables["learned"][1]
    separated = well_separated(test_data.mu)

    def curve(name, field, subset=None):
        table = tables[name][0]
        return [
            float(
                np.mean(table[s][field] if subset is None else table[s][field][subset])
            )
            for s in sweeps
        ]

    curves = {"sweeps": sweeps}
    for name in tables:
        prefix = "" if name == "learned" else f"{name}_"
        curves[prefix + "accuracy"] = curve(name, "accuracy")
        curves[prefix + "log_joint"] = curve(name, "log_joint")
    curves["log_Z"] = curve("learned", "log_Z")
    curves["ess"] = curve("learned", "ess")
    curves["accuracy_well_separated"] = curve("learned", "accuracy", separated)

    S = num_sweeps
    oracle = np.asarray(oracle_accuracy(test_data))
    true_log_joint = float(np.mean(log_joint(test_data.x, test_data.mu, test_data.c)))
    curves["reference_accuracy"] = float(np.mean(oracle))
    curves["reference_log_joint"] = true_log_joint

    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, "gmm_apg.png")
    plot(png, test_data, samples, sorted({0, 1, num_sweeps}), curves, losses)
    metrics = {
        "test_accuracy": curves["accuracy"][S],
        "test_accuracy_0_sweeps": curves["accuracy"][0],
        "test_accuracy_1_sweep": curves["accuracy"][1],
        "test_accuracy_well_separated": curves["accuracy_well_separated"][S],
        "well_separated_fraction": float(np.mean(separated)),
        "oracle_accuracy": float(np.mean(oracle)),
        "oracle_accuracy_well_separated": float(np.mean(oracle[separated])),
        "test_log_joint": curves["log_joint"][S],
        "test_log_joint_0_sweeps": curves["log_joint"][0],
        "test_log_joint_1_sweep": curves["log_joint"][1],
        "true_latents_log_joint": true_log_joint,
        "test_log_Z": curves["log_Z"][S],
        "test_ess": curves["ess"][S],
        "exact_kernels_accuracy": curves["exact_accuracy"][S],
        "exact_kernels_log_joint": curves["exact_log_joint"][S],
        "prior_init_exact_accuracy": curves["prior_accuracy"][S],
        "prior_init_exact_log_joint": curves["prior_log_joint"][S],
        "first_train_loss": float(losses[0]),
        "last_train_loss": float(np.mean(losses[-max(len(losses) // 20, 1) :])),
        "skipped_steps": float(result.skipped),
    }
    elapsed = time.perf_counter() - tic
    record: dict[str, Any] = {
        "program": "gmm_apg",
        "steps": steps,
        "particles": particles,
        "eval_particles": eval_particles,
        "num_sweeps": num_sweeps,
        "batch_size": batch_size,
        "num_train": num_train,
        "num_test": num_test,
        "seed": seed,
        "elapsed_seconds": elapsed,
        "train_seconds": train_seconds,
        "compile_seconds": float(result.history["compile_seconds"][0]),
        "backend": jax.default_backend(),
        "curves": curves,
        "metrics": metrics,
    }
    path = os.path.join(out, "gmm_apg_metrics.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)

    finite = all(math.isfinite(v) for v in metrics.values())
    header = f"gmm_apg: {steps} steps, {particles} particles, {num_sweeps} sweeps"
    print(f"{header}, seed {seed}")
    print("  accuracy and log joint by number of sweeps:")
    print(f"  {'sweeps':>6} {'APG':>17} {'exact kernels':>17} {'exact, prior':>17}")
    for s in sweeps:
        row = "".join(
            f" {curves[p + 'accuracy'][s]:7.4f} {curves[p + 'log_joint'][s]:9.2f}"
            for p in ("", "exact_", "prior_")
        )
        print(f"  {s:>6d}{row}")
    separated_share = metrics["well_separated_fraction"]
    print(
        f"  well-separated instances ({separated_share:.0%}): accuracy "
        f"{metrics['test_accuracy_well_separated']:.4f}, nearest true mean "
        f"{metrics['oracle_accuracy_well_separated']:.4f}"
    )
    print(f"  nearest true mean, all instances: {metrics['oracle_accuracy']:.4f}")
    print(f"  log joint at the true latents: {true_log_joint:.2f}")
    print(f"  ESS after {S} sweeps: {curves['ess'][S]:.1f} / {eval_particles}")
    print(f"  elapsed: {elapsed:.1f} s (training {train_seconds:.1f} s)")
    print(f"  wrote {png} and {path}" + ("" if finite else "  (non-finite metrics!)"))
    return metrics


if __name__ == "__main__":
    run()
