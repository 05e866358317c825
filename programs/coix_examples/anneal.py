"""Annealed nested variational inference, written as in Coix.

From a broad Gaussian to a ring of 8 Gaussians through 8 annealed targets
``gamma_k(x) = target(x)^beta_k init(x)^(1 - beta_k)`` with learned
``beta`` and learned forward and reverse Gaussian kernels per level,
trained with ``algo.nvi_rkl`` (Zimmermann, Wu, Esmaeili & van de Meent
2021, https://arxiv.org/abs/2106.11302). The annealed density is a latent
``Unit`` site, so it does not weight the first proposal.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax

import combinators as coix  # the only line that names the library

NUM_LEVELS = 8


class Kernel(nn.Module):
    """A Gaussian kernel x -> N(x + shift(x), scale(x)), one per level."""

    @nn.compact
    def __call__(self, x, index):
        weights = self.param(
            "hidden", nn.initializers.normal(0.1), (NUM_LEVELS - 1, 2, 32)
        )
        out = self.param("out", nn.initializers.zeros, (NUM_LEVELS - 1, 32, 4))
        hidden = nn.relu(x @ weights[index])
        loc_scale = hidden @ out[index]
        return x + loc_scale[..., :2], nn.softplus(loc_scale[..., 2:]) + 0.5


class AnnealedDensity(nn.Module):
    @nn.compact
    def __call__(self, x, index):
        raw = self.param("beta_raw", lambda _: -jnp.ones(NUM_LEVELS - 2))
        inner = nn.sigmoid(raw[0] + jnp.pad(jnp.cumsum(nn.softplus(raw[1:])), (1, 0)))
        beta = jnp.pad(inner, (1, 1), constant_values=(0.0, 1.0))[index]
        angles = 2 * jnp.pi * jnp.arange(1, 9) / 8
        centres = 10 * jnp.stack([jnp.sin(angles), jnp.cos(angles)], -1)
        ring = jax.nn.logsumexp(
            dist.Normal(centres, jnp.sqrt(0.5)).log_prob(x[..., None, :]).sum(-1), -1
        )
        broad = dist.Normal(0.0, 5.0).log_prob(x).sum(-1)
        return beta * ring + (1 - beta) * broad


class AnnealNetwork(nn.Module):
    def setup(self):
        self.forward_kernel = Kernel()
        self.reverse_kernel = Kernel()
        self.density = AnnealedDensity()

    def __call__(self, x):
        self.reverse_kernel(x, 0)
        self.density(x, 0)
        return self.forward_kernel(x, 0)


def anneal_target(network, k=0):
    x = numpyro.sample("x", dist.Normal(0.0, 5.0).expand([2]).mask(False).to_event())
    numpyro.sample("anneal_density", dist.Unit(network.density(x, k)))
    return ({"x": x},)


def anneal_forward(network, inputs, k=0):
    loc, scale = network.forward_kernel(inputs["x"], k)
    return numpyro.sample("x", dist.Normal(loc, scale).to_event(1))


def anneal_reverse(network, inputs, k=0):
    loc, scale = network.reverse_kernel(inputs["x"], k)
    return numpyro.sample("x", dist.Normal(loc, scale).to_event(1))


def make_program(params, num_particles=10, unroll=False):
    network = coix.util.BindModule(AnnealNetwork(), params)
    particles = lambda p: numpyro.plate("particle", num_particles, dim=-1)(p)  # noqa: E731
    targets = lambda k: particles(partial(anneal_target, network, k=k))  # noqa: E731
    forwards = lambda k: particles(partial(anneal_forward, network, k=k))  # noqa: E731
    reverses = lambda k: particles(partial(anneal_reverse, network, k=k))  # noqa: E731
    if unroll:
        targets = [targets(k) for k in range(NUM_LEVELS)]
        forwards = [forwards(k) for k in range(NUM_LEVELS - 1)]
        reverses = [reverses(k) for k in range(NUM_LEVELS - 1)]
    return coix.algo.nvi_rkl(targets, forwards, reverses, num_targets=NUM_LEVELS)


def loss_fn(params, key, num_particles, unroll=False):
    program = make_program(params, num_particles=num_particles, unroll=unroll)
    _, _, metrics = coix.traced_evaluate(program, seed=key)()
    return metrics["loss"], metrics


def init_params():
    return AnnealNetwork().init(jax.random.PRNGKey(0), jnp.zeros(2))


def main(num_steps=200, num_particles=10, lr=1e-3, unroll=False):
    params, _ = coix.util.train(
        partial(loss_fn, num_particles=num_particles, unroll=unroll),
        init_params(),
        optax.adam(lr),
        num_steps,
        jit_compile=True,
    )
    return params


def parity_setup():
    """Initial parameters, no batch, and loss options for the parity check."""
    return init_params(), None, {"num_particles": 10}
