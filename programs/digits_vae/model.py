"""A Bernoulli variational autoencoder on binary images: the model.

The VAE of Kingma & Welling (2014), "Auto-Encoding Variational Bayes",
https://arxiv.org/abs/1312.6114, built from :mod:`combinators.amortized`:

* generative model ``p(z) = N(0, I_2)``, ``p(x | z) = prod_j
  Bernoulli(x_j; sigmoid(decoder(z))_j)`` over the 64 pixels;
* inference network ``q(z | x) = N(mu(x), diag sigma(x)^2)``;
* trained by SVI: :func:`make_loss_fn` is the loss of
  ``propose(compose(p(x | z), p(z)), q(z | x), loss_fn=elbo_loss)`` with K
  particles per image, for :func:`combinators.train.train`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from combinators import amortized

LATENT_DIM = 2
HIDDEN = 128


class Encoder(nn.Module):
    """``x -> [mu, s]``: two hidden layers, then ``2 * latent_dim`` outputs.

    Attributes:
      latent_dim: dimension of ``z``.
      hidden: hidden width.
      activation: the hidden layers' nonlinearity (relu; Burda et al. use tanh).
    """

    latent_dim: int = LATENT_DIM
    hidden: int = HIDDEN
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x):
        """Raw outputs for :func:`combinators.amortized.diagonal_normal`."""
        h = self.activation(nn.Dense(self.hidden)(x))
        h = self.activation(nn.Dense(self.hidden)(h))
        return nn.Dense(2 * self.latent_dim)(h)


class Decoder(nn.Module):
    """``z -> logits`` of the 64 pixels: two hidden layers.

    Attributes:
      pixels: number of pixels.
      hidden: hidden width.
      activation: the hidden layers' nonlinearity.
    """

    pixels: int = 64
    hidden: int = HIDDEN
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, z):
        """Bernoulli logits, one per pixel."""
        h = self.activation(nn.Dense(self.hidden)(z))
        h = self.activation(nn.Dense(self.hidden)(h))
        return nn.Dense(self.pixels)(h)


class VAE(NamedTuple):
    """The networks and the two halves of the model.

    Attributes:
      encoder: the encoder module.
      decoder: the decoder module.
      guide: ``q(z | x)`` as an :class:`~combinators.amortized.InferenceNetwork`.
      model: ``p(x, z)`` as a :class:`~combinators.amortized.GenerativeModel`.
    """

    encoder: Encoder
    decoder: Decoder
    guide: amortized.InferenceNetwork
    model: amortized.GenerativeModel


def make_vae(
    latent_dim: int = LATENT_DIM,
    hidden: int = HIDDEN,
    activation: Callable[[jax.Array], jax.Array] = nn.relu,
) -> VAE:
    """The Bernoulli VAE with a standard normal prior.

    Args:
      latent_dim: dimension of ``z``.
      hidden: width of the networks' two hidden layers.
      activation: their nonlinearity.
    """
    encoder = Encoder(latent_dim, hidden, activation)
    decoder = Decoder(64, hidden, activation)
    guide = amortized.InferenceNetwork(
        amortized.from_apply(encoder.apply, amortized.diagonal_normal)
    )
    model = amortized.GenerativeModel(
        amortized.standard_normal(latent_dim),
        amortized.from_apply(decoder.apply, amortized.bernoulli_logits),
    )
    return VAE(encoder, decoder, guide, model)


def init_params(vae: VAE, key: jax.Array) -> amortized.AmortizedParams:
    """Initial parameters ``(p = decoder, q = encoder)``."""
    key_p, key_q = jax.random.split(key)
    latent_dim = vae.encoder.latent_dim
    return amortized.AmortizedParams(
        p=vae.decoder.init(key_p, jnp.zeros((1, latent_dim))),
        q=vae.encoder.init(key_q, jnp.zeros((1, 64))),
    )


def make_loss_fn(vae: VAE, num_particles: int, loss_fn=None):
    """``(params, key, x) -> (loss, metrics)`` of ``propose(p, q, loss_fn)``.

    Args:
      vae: the model.
      num_particles: K, importance samples per image.
      loss_fn: the objective (default: the ELBO, ``elbo_loss``).

    Returns:
      The per-image loss of a minibatch ``x`` ``(B, 64)``, with the metrics
      ``elbo`` and ``iwae``, in :func:`combinators.train.train`'s shape.
    """
    return amortized.make_loss_fn(
        vae.model,
        vae.guide,
        num_particles=num_particles,
        **({} if loss_fn is None else {"loss_fn": loss_fn}),
    )


def kl_to_prior(vae: VAE, params: amortized.AmortizedParams, x) -> jax.Array:
    """Mean over ``x`` of ``KL(q(z | x) || N(0, I))``, in closed form (nats)."""
    q = vae.guide.distribution(params.q, x).base_dist
    loc, scale = q.loc, q.scale
    kl = 0.5 * jnp.sum(loc**2 + scale**2 - 1.0 - 2.0 * jnp.log(scale), axis=-1)
    return jnp.mean(kl)
