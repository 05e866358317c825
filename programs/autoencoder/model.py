"""A deterministic autoencoder on binary images, for comparison with the VAE.

Hinton & Salakhutdinov (2006), "Reducing the Dimensionality of Data with
Neural Networks", Science 313. The same networks as
:mod:`programs.digits_vae.model` (two hidden relu layers of 128 units each
way, a 2-D code; the decoder is that module's), but the encoder returns one
code ``c = f(x)`` instead of a distribution, there is no prior and no KL
term, and the loss is the binary cross-entropy of the pixels,
``BCE(x, g(c)) = -sum_j [x_j log s_j + (1 - x_j) log(1 - s_j)]`` with
``s = sigmoid(g(c))``: the VAE's reconstruction term with ``z`` fixed at the
code. Nothing here is probabilistic; training is a plain optax loop.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from programs.digits_vae.model import HIDDEN, LATENT_DIM, Decoder


class CodeEncoder(nn.Module):
    """``x -> c``: two hidden relu layers, then ``latent_dim`` outputs.

    Attributes:
      latent_dim: dimension of the code.
      hidden: hidden width.
    """

    latent_dim: int = LATENT_DIM
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x):
        """The code of ``x``."""
        h = nn.relu(nn.Dense(self.hidden)(x))
        h = nn.relu(nn.Dense(self.hidden)(h))
        return nn.Dense(self.latent_dim)(h)


class Autoencoder(nn.Module):
    """Encoder ``f`` and decoder ``g``; ``Autoencoder()(x)`` are the logits ``g(f(x))``.

    Attributes:
      latent_dim: dimension of the code.
      hidden: hidden width.
    """

    latent_dim: int = LATENT_DIM
    hidden: int = HIDDEN

    def setup(self):
        """Creates the encoder and decoder."""
        self.encoder = CodeEncoder(self.latent_dim, self.hidden)
        self.decoder = Decoder(64, self.hidden)

    def encode(self, x):
        """The code ``f(x)``."""
        return self.encoder(x)

    def decode(self, c):
        """Pixel logits ``g(c)``."""
        return self.decoder(c)

    def __call__(self, x):
        """Reconstruction logits."""
        return self.decode(self.encode(x))


def bce(logits, x) -> jax.Array:
    """Binary cross-entropy summed over pixels, averaged over images (nats)."""
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=-1))


def loss_fn(params, key: jax.Array, batch, *, network: Autoencoder):
    """``(BCE, metrics)`` of a minibatch, in :func:`combinators.train.train`'s shape.

    The key is unused: the autoencoder is deterministic.
    """
    del key
    loss = bce(network.apply(params, batch), batch)
    return loss, {"loss": loss, "bce": loss}


def interpolate(network: Autoencoder, params, c0, c1, num: int = 10) -> jax.Array:
    """Pixel means decoded along the segment from code ``c0`` to code ``c1``.

    Returns:
      Shape ``(num, 64)``: ``sigmoid(g((1 - t) c0 + t c1))`` for ``t`` in
      ``linspace(0, 1, num)``.
    """
    t = jnp.linspace(0.0, 1.0, num)[:, None]
    codes = (1.0 - t) * jnp.asarray(c0) + t * jnp.asarray(c1)
    return jax.nn.sigmoid(network.apply(params, codes, method=Autoencoder.decode))
