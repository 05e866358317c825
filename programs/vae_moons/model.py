"""A variational autoencoder on 2-D points, written as importance sampling.

The VAE of Kingma & Welling (2014), "Auto-Encoding Variational Bayes",
https://arxiv.org/abs/1312.6114, as three numpyro programs and two
combinators:

* the prior ``z ~ N(0, I)`` (2-D latent) and the decoder (likelihood)
  ``x ~ N(decoder(z), I)`` are composed into the target ``p(x, z)``;
* the encoder ``q(z | x) = N(encoder(x), 0.01^2 I)`` is the proposal;
* ``propose(target, encoder, loss_fn=elbo_loss)`` weights each proposed
  ``z`` by ``p(x, z) / q(z | x)`` and reports the negative ELBO as its loss.

The particle plate is the data batch: particle ``i`` is the latent of data
point ``i``, so the number of particles is the minibatch size.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpyro
import numpyro.distributions as dist

import combinators
from combinators.flax_utils import BindModule

HIDDEN = 32
LATENT_DIM = 2
ENCODER_SCALE = 0.01


# ---------------------------------------------------------------------------
# Programs: prior, likelihood, proposal
# ---------------------------------------------------------------------------


def prior(x):
    """The prior program: ``z ~ N(0, I)`` in two dimensions.

    Args:
      x: the data, passed through to the decoder.

    Returns:
      ``(z, x)``, the arguments of :func:`decoder`.
    """
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT_DIM]).to_event(1))
    return z, x


def decoder(network, z, x):
    """The likelihood program: ``x ~ N(decoder(z), I)``, observed.

    Args:
      network: a bound :class:`VAE` (``network.decoder`` is called).
      z: the latents, shape ``(particles, 2)``.
      x: the observed data, shape ``(particles, 2)``.

    Returns:
      ``(x,)``.
    """
    mean = network.decoder(z)
    x = numpyro.sample("x", dist.Normal(mean, 1.0).to_event(1), obs=x)
    return (x,)


def encoder(network, x):
    """The proposal program: ``z ~ q(z | x) = N(encoder(x), 0.01^2 I)``.

    Args:
      network: a bound :class:`VAE` (``network.encoder`` is called).
      x: the data, shape ``(particles, 2)``.

    Returns:
      ``(z,)``.
    """
    loc = network.encoder(x)
    z = numpyro.sample("z", dist.Normal(loc, ENCODER_SCALE).to_event(1))
    return (z,)


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    """``Dense(hidden) - relu - Dense(features)``.

    Attributes:
      features: output width.
      hidden: hidden width.
    """

    features: int = LATENT_DIM
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x):
        """Applies the network to the last axis of ``x``."""
        return nn.Dense(self.features)(nn.relu(nn.Dense(self.hidden)(x)))


class VAE(nn.Module):
    """Encoder and decoder networks.

    ``VAE()(x)`` is the reconstruction ``decoder(encoder(x))`` (means only);
    the programs call ``encoder`` and ``decoder`` separately through
    :class:`combinators.flax_utils.BindModule`.
    """

    def setup(self):
        """Creates the two MLPs."""
        self.encoder = MLP(features=LATENT_DIM)
        self.decoder = MLP(features=2)

    def __call__(self, x):
        """Decoder mean of the encoder mean of ``x``."""
        return self.decoder(self.encoder(x))


# ---------------------------------------------------------------------------
# The combinator program
# ---------------------------------------------------------------------------


def in_particle_plate(program, num_particles: int):
    """Wraps ``program`` in ``numpyro.plate("particle", num_particles, dim=-1)``.

    A plate used as a decorator stores the function it wraps, so each
    program needs a fresh plate.
    """
    return numpyro.plate("particle", num_particles, dim=-1)(program)


def make_program(network, num_particles: int):
    """The VAE as an importance sampler: ``propose(p(x, z), q(z | x))``.

    The target is ``compose(decoder, prior)``; the encoder proposes ``z``.
    The plate wraps the target and the proposal themselves (not only the
    result of ``propose``), so that every sample statement is inside it.

    Args:
      network: a bound :class:`VAE`.
      num_particles: the batch size (one particle per data point).

    Returns:
      A weighted program of the data ``x`` whose ``loss`` metric is the
      negative ELBO averaged over the batch.
    """
    target = in_particle_plate(
        combinators.compose(functools.partial(decoder, network), prior, suffix=False),
        num_particles,
    )
    proposal = in_particle_plate(functools.partial(encoder, network), num_particles)
    return combinators.propose(target, proposal, loss_fn=combinators.loss.elbo_loss)


def program_metrics(params, key: jax.Array, x: jax.Array):
    """Runs the VAE program on a batch and returns its metrics.

    Args:
      params: the :class:`VAE` parameters.
      key: a PRNG key for the encoder's samples.
      x: the batch, shape ``(n, 2)``; ``n`` is the number of particles.

    Returns:
      The program's :class:`combinators.Metrics` (``loss`` = negative ELBO).
    """
    program = make_program(BindModule(VAE(), params), x.shape[0])
    _, _, metrics = combinators.traced_evaluate(program, seed=key)(x)
    return metrics


def loss_fn(params, key: jax.Array, *, data: jax.Array, batch_size: int):
    """Negative ELBO of a random minibatch (the training objective).

    Args:
      params: the :class:`VAE` parameters.
      key: the step's key; split into a minibatch key and a program key.
      data: the whole training set, shape ``(N, 2)``.
      batch_size: the minibatch size (= particles).

    Returns:
      ``(loss, metrics)`` as :func:`combinators.train.train` expects.
    """
    key_batch, key_program = jax.random.split(key)
    index = jax.random.choice(key_batch, data.shape[0], (batch_size,), replace=False)
    metrics = program_metrics(params, key_program, data[index])
    return metrics["loss"], metrics
