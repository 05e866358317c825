"""Amortised population Gibbs for a deep mixture model, written as in Coix.

Points lie on rings of radius one around 4 unknown centres: a point's
cluster ``c`` picks the centre ``mu[c]`` and a local angle code ``h`` in
(0, 1) is decoded by a network into a position on the ring. Two Gibbs
blocks are learned: the centres given the points (global), and each point's
cluster and code given the centres (local, one weight per point). As in
Coix's examples, a batch of data sets is an undeclared batch dimension.
Reference: Wu, Zimmermann, Sennesh, Le & van de Meent (2020),
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

NUM_CLUSTERS = 4


def simulate(num_sets: int, num_points: int, seed: int = 0):
    """Data sets of points on 4 noisy rings: ``(num_sets, num_points, 2)``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (num_sets, NUM_CLUSTERS, 2))
    c = rng.integers(0, NUM_CLUSTERS, (num_sets, num_points))
    angle = rng.uniform(0.0, 2 * np.pi, (num_sets, num_points))
    ring = np.stack([np.cos(angle), np.sin(angle)], -1)
    x = np.take_along_axis(centres, c[..., None], 1) + ring
    x = x + 0.1 * rng.normal(size=x.shape)
    return x.astype(np.float32)


class CentreEncoder(nn.Module):
    """Posterior mean and scale of the centres from soft assignments."""

    @nn.compact
    def __call__(self, x):
        resp = nn.softmax(nn.Dense(NUM_CLUSTERS)(x), -1)[..., None]
        features = x[..., None, :2]
        count = resp.sum(-3) + 1e-2
        loc = (resp * features).sum(-3) / count
        return loc, 1.0 / jnp.sqrt(count + 0.01)


class ClusterScores(nn.Module):
    @nn.compact
    def __call__(self, offsets):
        return nn.Dense(1)(nn.relu(nn.Dense(32)(offsets)))[..., 0]


class CodeEncoder(nn.Module):
    @nn.compact
    def __call__(self, offset):
        hidden = nn.tanh(nn.Dense(32)(offset))
        return jnp.exp(nn.Dense(1)(hidden)[..., 0]), jnp.exp(
            nn.Dense(1)(hidden)[..., 0]
        )


class RingDecoder(nn.Module):
    @nn.compact
    def __call__(self, h):
        direction = nn.Dense(2)(nn.tanh(nn.Dense(32)(h[..., None])))
        return direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)


class DMMNetwork(nn.Module):
    def setup(self):
        self.initial_centres = CentreEncoder()
        self.centres = CentreEncoder()
        self.scores = ClusterScores()
        self.codes = CodeEncoder()
        self.decode = RingDecoder()

    def __call__(self, x):
        mu, _ = self.initial_centres(x)
        c = jnp.argmax(self.scores(x[..., None, :] - mu), -1)
        alpha, beta = self.codes(x - mu[c])
        h = alpha / (alpha + beta)
        xch = jnp.concatenate([x, jax.nn.one_hot(c, NUM_CLUSTERS), h[..., None]], -1)
        mu, _ = self.centres(xch)
        return self.decode(h) + mu[c]


def target(network, inputs):
    mu = numpyro.sample(
        "mu", dist.Normal(0.0, 10.0).expand([NUM_CLUSTERS, 2]).to_event()
    )
    with numpyro.plate("N", inputs.shape[-2], dim=-1):
        c = numpyro.sample(
            "c", dist.Categorical(probs=jnp.ones(NUM_CLUSTERS) / NUM_CLUSTERS)
        )
        h = numpyro.sample("h", dist.Beta(1.0, 1.0))
        recon = network.decode(h) + Vindex(mu)[..., c, :]
        x = numpyro.sample("x", dist.Normal(recon, 0.1).to_event(1), obs=inputs)
    return ({"mu": mu, "c": c, "h": h, "x": x},)


def kernel_mu(network, inputs):
    if not isinstance(inputs, dict):
        inputs = {"x": inputs}
    if "c" in inputs:
        x = jnp.broadcast_to(inputs["x"], inputs["h"].shape + (2,))
        onehot = jax.nn.one_hot(inputs["c"], NUM_CLUSTERS)
        loc, scale = network.centres(
            jnp.concatenate([x, onehot, inputs["h"][..., None]], -1)
        )
    else:
        loc, scale = network.initial_centres(inputs["x"])
    loc, scale = jnp.expand_dims(loc, -3), jnp.expand_dims(scale, -3)
    mu = numpyro.sample("mu", dist.Normal(loc, scale).to_event(2))
    return ({**inputs, "mu": mu},)


def kernel_c_h(network, inputs):
    x, mu = inputs["x"], inputs["mu"]
    logits = network.scores(jnp.expand_dims(x, -2) - mu)
    with numpyro.plate("N", logits.shape[-2], dim=-1):
        c = numpyro.sample("c", dist.Categorical(logits=logits))
        alpha, beta = network.codes(x - Vindex(mu)[..., c, :])
        h = numpyro.sample("h", dist.Beta(alpha, beta))
    return ({**inputs, "c": c, "h": h},)


def make_program(params, num_sweeps, num_particles):
    network = coix.util.BindModule(DMMNetwork(), params)
    particles = lambda p: numpyro.plate("particle", num_particles, dim=-3)(p)  # noqa: E731
    kernels = [
        particles(partial(kernel_mu, network)),
        particles(partial(kernel_c_h, network)),
    ]
    return coix.algo.apgs(
        particles(partial(target, network)), kernels, num_sweeps=num_sweeps
    )


def loss_fn(params, key, batch, num_sweeps, num_particles):
    program = make_program(params, num_sweeps, num_particles)
    _, _, metrics = coix.traced_evaluate(program, seed=key)(batch)
    for name in ("log_Z", "log_density", "loss"):
        metrics[name] = metrics[name] / batch.shape[0]
    return metrics["loss"], metrics


def init_params(num_points: int = 100):
    return DMMNetwork().init(jax.random.PRNGKey(0), jnp.zeros((num_points, 2)))


def batches(batch_size: int, num_points: int = 100, seed: int = 0):
    data = simulate(100 * batch_size, num_points, seed)
    i = 0
    while True:
        yield data[i : i + batch_size]
        i = (i + batch_size) % len(data)


def main(num_steps=200, batch_size=20, num_sweeps=5, num_particles=10, lr=1e-3):
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
    return init_params(), next(batches(20)), {"num_sweeps": 5, "num_particles": 10}
