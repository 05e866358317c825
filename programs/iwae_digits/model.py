"""IWAE vs VAE on binarised 8x8 digits: the model, the objectives, the measures.

The model of Burda, Grosse & Salakhutdinov (2016), "Importance Weighted
Autoencoders", https://arxiv.org/abs/1509.00519, with one stochastic layer,
scaled to 64 pixels: ``p(z) = N(0, I_20)``, ``p(x | z)`` Bernoulli with
logits from a 20-100-100-64 tanh network, and ``q(z | x)`` a diagonal
Gaussian from a 64-100-100-40 tanh network (the paper: 784-200-200-50, tanh).
The networks are :mod:`programs.digits_vae`'s.

The objectives (:data:`CONFIGURATIONS`) are the paper's:

* ``vae_k<k>``: the ELBO with ``k`` samples averaged,
  ``mean_i log w_i`` (``combinators.elbo_loss``);
* ``iwae_k<k>``: the ``k``-sample bound ``log mean_i w_i``
  (``combinators.iwae_loss``). At ``k = 1`` the two coincide.

The measures: the held-out log-likelihood estimated by the ``k = 5000``
bound (:func:`test_bounds`), and the number of active units
(:func:`unit_activity`), ``A_u = Cov_x(E_{q(z | x)}[z_u]) > 10^-2``
(the paper's Section 5.2).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from combinators import amortized
from combinators.loss import elbo_loss, iwae_loss
from programs.digits_vae.model import VAE, init_params, make_vae

__all__ = [
    "ACTIVITY_THRESHOLD",
    "CONFIGURATIONS",
    "EVAL_PARTICLES",
    "HIDDEN",
    "LATENT_DIM",
    "make_model",
    "make_objective",
    "init_params",
    "test_bounds",
    "unit_activity",
]

LATENT_DIM = 20
HIDDEN = 100
#: Samples per test image of the held-out bound (the paper's k = 5000).
EVAL_PARTICLES = 5000
#: A unit is active when the variance over x of its posterior mean exceeds this.
ACTIVITY_THRESHOLD = 1e-2

#: name -> (objective, k): the paper's VAE and IWAE at k = 1, 5, 50 (IWAE at
#: k = 1 is VAE at k = 1).
CONFIGURATIONS: dict[str, tuple[str, int]] = {
    "vae_k1": ("vae", 1),
    "vae_k5": ("vae", 5),
    "vae_k50": ("vae", 50),
    "iwae_k5": ("iwae", 5),
    "iwae_k50": ("iwae", 50),
}


def make_model(latent_dim: int = LATENT_DIM, hidden: int = HIDDEN) -> VAE:
    """The Bernoulli VAE with tanh networks of ``hidden`` units."""
    return make_vae(latent_dim, hidden, nn.tanh)


def make_objective(vae: VAE, name: str):
    """``(params, key, x) -> (loss, metrics)`` of configuration ``name``.

    Args:
      vae: the model.
      name: a key of :data:`CONFIGURATIONS`.

    Returns:
      The per-image loss of :func:`combinators.amortized.make_loss_fn`:
      ``elbo_loss`` for ``vae_k<k>``, ``iwae_loss`` for ``iwae_k<k>``.
    """
    if name not in CONFIGURATIONS:
        raise ValueError(
            f"iwae_digits: unknown configuration {name!r}; choose from "
            f"{sorted(CONFIGURATIONS)}."
        )
    objective, k = CONFIGURATIONS[name]
    loss_fn = elbo_loss if objective == "vae" else iwae_loss
    return amortized.make_loss_fn(
        vae.model, vae.guide, num_particles=k, loss_fn=loss_fn
    )


def unit_activity(vae: VAE, params: amortized.AmortizedParams, x) -> jax.Array:
    """``Cov_x(E_q[z_u | x])`` for every latent unit ``u``, shape ``(latent_dim,)``.

    The variance over the images ``x`` of the encoder's mean (Burda et al.,
    Section 5.2); a unit is *active* when it exceeds
    :data:`ACTIVITY_THRESHOLD`.
    """
    mean = vae.guide.distribution(params.q, jnp.asarray(x)).base_dist.loc
    return jnp.var(mean, axis=0)


def test_bounds(
    vae: VAE,
    params: amortized.AmortizedParams,
    key: jax.Array,
    x,
    num_particles: int = EVAL_PARTICLES,
    batch_size: int = 20,
) -> amortized.Bounds:
    """ELBO and ``num_particles``-sample bound per test image, averaged (nats).

    The ``k = 5000`` bound is the paper's estimate of ``log p(x)``.
    """
    return amortized.bounds(
        vae.model,
        vae.guide,
        params,
        key,
        jnp.asarray(x),
        num_particles,
        batch_size=batch_size,
    )
