"""Amortised population Gibbs on a 2-D Gaussian mixture, written as in Coix.

Each data set has ``N`` points from 3 clusters with unknown means and
precisions (a normal-gamma prior) and unknown assignments. Two Gibbs blocks
are learned: the cluster parameters given the assignments (a network that
outputs normal-gamma posterior parameters from soft sufficient statistics)
and the assignments given the parameters (a network scoring each point
against each cluster). A batch of data sets is an undeclared batch
dimension (``dim=-2``): every data set is its own importance-sampling
problem. Reference: Wu, Zimmermann, Sennesh, Le & van de Meent (2020),
https://arxiv.org/abs/1911.01382.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.ops.indexing import Vindex

import combinators as coix  # the only line that names the library

NUM_CLUSTERS = 3
PRIOR = (0.0, 0.1, 2.0, 2.0)  # normal-gamma: mean, precision scale, shape, rate


def simulate(num_sets: int, num_points: int, seed: int = 0):
    """Data sets of 2-D points from 3 clusters: ``(num_sets, num_points, 2)``."""
    rng = np.random.default_rng(seed)
    tau = rng.gamma(2.0, 0.5, (num_sets, NUM_CLUSTERS, 2))
    mean = rng.normal(0.0, 1.0, (num_sets, NUM_CLUSTERS, 2)) / np.sqrt(0.1 * tau)
    c = rng.integers(0, NUM_CLUSTERS, (num_sets, num_points))
    loc = np.take_along_axis(mean, c[..., None], axis=1)
    scale = 1.0 / np.sqrt(np.take_along_axis(tau, c[..., None], axis=1))
    x = loc + scale * rng.normal(size=(num_sets, num_points, 2))
    return x.astype(np.float32), c


class NormalGammaStats(nn.Module):
    """Normal-gamma posterior parameters from soft assignments of the points."""

    @nn.compact
    def __call__(self, x):
        features = nn.Dense(2)(x)
        resp = nn.softmax(nn.Dense(NUM_CLUSTERS)(x), -1)
        features, resp = features[..., None, :], resp[..., :, None]
        count = resp.sum(-3)
        total = (resp * features).sum(-3)
        squares = (resp * features**2).sum(-3)
        mu0, nu0, alpha0, beta0 = PRIOR
        mean = total / count
        alpha = alpha0 + 0.5 * count
        beta = (
            beta0
            + 0.5 * (squares - total * mean)
            + 0.5 * count * nu0 / (count + nu0) * (mean - mu0) ** 2
        )
        return alpha, beta, (mu0 * nu0 + total) / (nu0 + count), nu0 + count


class AssignmentScores(nn.Module):
    """Logits of each point's cluster from (point, cluster mean, precision)."""

    @nn.compact
    def __call__(self, features):
        hidden = nn.tanh(nn.Dense(32)(features))
        return nn.Dense(1)(hidden)[..., 0]


class GMMNetwork(nn.Module):
    def setup(self):
        self.initial_stats = NormalGammaStats()
        self.stats = NormalGammaStats()
        self.scores = AssignmentScores()

    def __call__(self, x):
        alpha, beta, mean, _ = self.initial_stats(x)
        tau = alpha / beta
        logits = self.scores(
            pair_features(x, mean[..., None, :, :], tau[..., None, :, :])
        )
        onehot = jax.nn.one_hot(jnp.argmax(logits, -1), NUM_CLUSTERS)
        return self.stats(jnp.concatenate([x, onehot], -1))


def pair_features(x, mean, tau):
    """``(..., N, K, 6)``: every point next to every cluster's parameters.

    ``mean`` and ``tau`` have a size-1 axis for the points: ``(..., 1, K, 2)``.
    """
    x = x[..., :, None, :]
    shape = jnp.broadcast_shapes(x.shape[:-1], mean.shape[:-1], tau.shape[:-1])
    parts = [jnp.broadcast_to(a, shape + a.shape[-1:]) for a in (x, mean, tau)]
    return jnp.concatenate(parts, -1)


def target(inputs):
    tau = numpyro.sample(
        "tau", dist.Gamma(2.0, 2.0).expand([NUM_CLUSTERS, 2]).to_event()
    )
    # .to_event(2), not .to_event(): tau carries the particle and batch dims
    # here, and a bare .to_event() would make them event dims too (each
    # particle scored with the sum over all particles). Coix's own example
    # has that bare call; this library refuses it and names the site.
    mean = numpyro.sample(
        "mean", dist.Normal(0.0, 1.0 / jnp.sqrt(0.1 * tau)).to_event(2)
    )
    with numpyro.plate("N", inputs.shape[-2], dim=-1):
        c = numpyro.sample(
            "c", dist.Categorical(probs=jnp.ones(NUM_CLUSTERS) / NUM_CLUSTERS)
        )
        loc = Vindex(mean)[..., c, :]
        scale = 1.0 / jnp.sqrt(Vindex(tau)[..., c, :])
        x = numpyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=inputs)
    return ({"mean": mean, "tau": tau, "c": c, "x": x},)


def kernel_mean_tau(network, inputs):
    if not isinstance(inputs, dict):
        inputs = {"x": inputs}
    if "c" in inputs:
        onehot = jax.nn.one_hot(inputs["c"], NUM_CLUSTERS)
        x = jnp.broadcast_to(inputs["x"], onehot.shape[:-1] + inputs["x"].shape[-1:])
        alpha, beta, mu, nu = network.stats(jnp.concatenate([x, onehot], -1))
    else:
        alpha, beta, mu, nu = network.initial_stats(inputs["x"])
    alpha, beta, mu, nu = (jnp.expand_dims(a, -3) for a in (alpha, beta, mu, nu))
    tau = numpyro.sample("tau", dist.Gamma(alpha, beta).to_event(2))
    mean = numpyro.sample("mean", dist.Normal(mu, 1.0 / jnp.sqrt(tau * nu)).to_event(2))
    return ({**inputs, "mean": mean, "tau": tau},)


def kernel_c(network, inputs):
    logits = network.scores(pair_features(inputs["x"], inputs["mean"], inputs["tau"]))
    with numpyro.plate("N", logits.shape[-2], dim=-1):
        c = numpyro.sample("c", dist.Categorical(logits=logits))
    return ({**inputs, "c": c},)


def make_program(params, num_sweeps, num_particles):
    network = coix.util.BindModule(GMMNetwork(), params)
    particles = lambda p: numpyro.plate("particle", num_particles, dim=-3)(p)  # noqa: E731
    kernels = [
        particles(partial(kernel_mean_tau, network)),
        particles(partial(kernel_c, network)),
    ]
    return coix.algo.apgs(particles(target), kernels, num_sweeps=num_sweeps)


def loss_fn(params, key, batch, num_sweeps, num_particles):
    program = make_program(params, num_sweeps, num_particles)
    _, _, metrics = coix.traced_evaluate(program, seed=key)(batch)
    for name in ("log_Z", "log_density", "loss"):
        metrics[name] = metrics[name] / batch.shape[0]
    return metrics["loss"], metrics


def init_params(num_points: int = 60):
    return GMMNetwork().init(jax.random.PRNGKey(0), jnp.zeros((num_points, 2)))


def batches(batch_size: int, num_points: int = 60, seed: int = 0):
    data, _ = simulate(100 * batch_size, num_points, seed)
    i = 0
    while True:
        yield data[i : i + batch_size]
        i = (i + batch_size) % len(data)


def main(num_steps=200, batch_size=20, num_sweeps=5, num_particles=10, lr=2.5e-4):
    params, _ = coix.util.train(
        partial(loss_fn, num_sweeps=num_sweeps, num_particles=num_particles),
        init_params(),
        optax.adam(lr),
        num_steps,
        batches(batch_size),
    )
    return params


def parity_setup():
    """Initial parameters, one batch and loss options for the parity check."""
    batch = next(batches(20))
    return init_params(), batch, {"num_sweeps": 5, "num_particles": 10}
