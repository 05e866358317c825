"""A sigmoid belief network on binary images: the model and its programs.

The sigmoid belief network (SBN) of Neal (1992), "Connectionist learning of
belief networks", Artificial Intelligence 56,
https://doi.org/10.1016/0004-3702(92)90065-6, with one layer of ``H``
binary latent units over ``D`` binary pixels:

* generative model ``p(h) = prod_i Bernoulli(h_i; sigmoid(b_i))`` and
  ``p(x | h) = prod_j Bernoulli(x_j; sigmoid(W^T h + c)_j)``;
* inference network ``q(h | x) = prod_i Bernoulli(h_i; sigmoid(U^T x + d)_i)``
  (linear, mirroring the model).

Both halves are :mod:`combinators.amortized` objects, so their programs
sample inside ``plate("particles", K)`` (outer) and ``plate("data", B)``
(inner), and :func:`make_program` is ``propose(p, q, loss_fn=...)``, which
weights particle ``k`` of image ``b`` by ``log p(x_b, h_kb) - log q(h_kb |
x_b)``. For pathwise gradients each ``h_i`` is also relaxed to a binary
Concrete variable (Maddison, Mnih & Teh 2017, "The Concrete Distribution",
https://arxiv.org/abs/1611.00712, appendix C; Jang, Gu & Poole 2017,
"Categorical Reparameterization with Gumbel-Softmax",
https://arxiv.org/abs/1611.01144), kept in logit space (a logistic
variable) for numerical stability. Wake-sleep's sleep phase needs the model
run forwards (:func:`dream_program`) and ``q`` on the dreams
(:func:`sleep_proposal`). The training objectives are in
:mod:`programs.sbn.estimators`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from combinators import amortized

NUM_LATENT = 16
NUM_PIXELS = 64
TEMPERATURE = 2.0 / 3.0
LATENT = "h"
OBSERVED = "x"


class SBN(NamedTuple):
    """A one-layer sigmoid belief network and its inference network.

    Attributes:
      model: ``p(h) p(x | h)`` with Bernoulli ``h``, an
        :class:`~combinators.amortized.GenerativeModel`.
      guide: ``q(h | x)``, an :class:`~combinators.amortized.InferenceNetwork`.
      relaxed_model: the same model with each ``h_i`` relaxed to a binary
        Concrete variable at ``temperature``, represented by its logit
        ``z_i ~ Logistic(b_i / t, 1 / t)``; the likelihood sees
        ``sigmoid(z)``.
      relaxed_guide: ``q`` relaxed the same way,
        ``z_i ~ Logistic((U^T x + d)_i / t, 1 / t)``.
      num_latent: ``H``, the number of latent units.
      num_pixels: ``D``, the number of pixels.
      temperature: ``t`` of the relaxation.
    """

    model: amortized.GenerativeModel
    guide: amortized.InferenceNetwork
    relaxed_model: amortized.GenerativeModel
    relaxed_guide: amortized.InferenceNetwork
    num_latent: int
    num_pixels: int
    temperature: float


def _prior_logits(p):
    return p["b"]


def pixel_logits(p, h):
    """The logits ``W^T h + c`` of ``p(x | h)``."""
    return h @ p["W"] + p["c"]


def _proposal_logits(q, x):
    return x @ q["U"] + q["d"]


def make_sbn(
    num_latent: int = NUM_LATENT,
    num_pixels: int = NUM_PIXELS,
    temperature: float = TEMPERATURE,
) -> SBN:
    """The SBN ``p(h) p(x | h)``, its inference network, and their relaxations.

    Parameters are plain dictionaries: ``p = {"b": (H,), "W": (H, D), "c":
    (D,)}`` and ``q = {"U": (D, H), "d": (H,)}`` (see :func:`init_params`).

    Args:
      num_latent: ``H``, binary latent units.
      num_pixels: ``D``, binary pixels.
      temperature: temperature of the Concrete relaxation.

    Returns:
      An :class:`SBN`.
    """
    if num_latent < 1 or num_pixels < 1:
        raise ValueError(
            f"make_sbn: num_latent and num_pixels must be positive, got "
            f"{num_latent} and {num_pixels}."
        )
    if not temperature > 0:
        raise ValueError(f"make_sbn: temperature must be positive, got {temperature}.")
    t = float(temperature)

    def prior_fn(p):
        return dist.Bernoulli(logits=_prior_logits(p)).to_event(1)

    def likelihood_fn(p, h):
        return dist.Bernoulli(logits=pixel_logits(p, h)).to_event(1)

    def proposal_fn(q, x):
        return dist.Bernoulli(logits=_proposal_logits(q, x)).to_event(1)

    def relaxed_prior_fn(p):
        return dist.Logistic(_prior_logits(p) / t, 1.0 / t).to_event(1)

    def relaxed_likelihood_fn(p, z):
        return dist.Bernoulli(logits=pixel_logits(p, jax.nn.sigmoid(z))).to_event(1)

    def relaxed_proposal_fn(q, x):
        return dist.Logistic(_proposal_logits(q, x) / t, 1.0 / t).to_event(1)

    names = {"latent": LATENT}
    return SBN(
        model=amortized.GenerativeModel(
            prior_fn, likelihood_fn, observed=OBSERVED, **names
        ),
        guide=amortized.InferenceNetwork(proposal_fn, **names),
        relaxed_model=amortized.GenerativeModel(
            relaxed_prior_fn, relaxed_likelihood_fn, observed=OBSERVED, **names
        ),
        relaxed_guide=amortized.InferenceNetwork(relaxed_proposal_fn, **names),
        num_latent=num_latent,
        num_pixels=num_pixels,
        temperature=t,
    )


def init_params(sbn: SBN, key: jax.Array, pixel_mean=None) -> dict:
    """Initial parameters ``{"p": {b, W, c}, "q": {U, d}}``.

    ``W`` and ``U`` are drawn from ``N(0, 0.1^2)``, ``b = d = 0``, and ``c``
    is the logit of ``pixel_mean`` (the mean training image, clipped to
    [0.01, 0.99]) when given, else 0.
    """
    key_w, key_u = jax.random.split(key)
    h, d = sbn.num_latent, sbn.num_pixels
    if pixel_mean is None:
        c = jnp.zeros(d)
    else:
        m = jnp.clip(jnp.asarray(pixel_mean, jnp.float32), 0.01, 0.99)
        c = jnp.log(m) - jnp.log1p(-m)
    return {
        "p": {"b": jnp.zeros(h), "W": 0.1 * jax.random.normal(key_w, (h, d)), "c": c},
        "q": {"U": 0.1 * jax.random.normal(key_u, (d, h)), "d": jnp.zeros(h)},
    }


def make_program(
    sbn: SBN, params: Mapping, num_particles: int, loss_fn, relaxed: bool = False
):
    """``propose(p, q, loss_fn)`` of a minibatch ``x`` ``(B, D)``, K particles each.

    ``relaxed`` selects the Concrete-relaxed model and guide.
    """
    model, guide = (
        (sbn.relaxed_model, sbn.relaxed_guide) if relaxed else (sbn.model, sbn.guide)
    )
    return amortized.make_program(
        model,
        guide,
        amortized.AmortizedParams(p=params["p"], q=params["q"]),
        num_particles,
        loss_fn=loss_fn,
    )


def _plates(num_particles: int, num_data: int):
    """The particle plate (outermost, dim -2) and the data plate (dim -1)."""
    return (
        numpyro.plate("particles", num_particles, dim=-2),
        numpyro.plate("data", num_data, dim=-1),
    )


def dream_program(sbn: SBN, p: Mapping, num_particles: int, num_data: int) -> Callable:
    """The generative program run forwards: ``h ~ p(h)``, ``x ~ p(x | h)``.

    Both sites are sampled (nothing observed) inside the particle (K) and
    data (B) plates, so the program of no arguments dreams ``K * B`` images;
    it returns ``(x,)``, the argument of :func:`sleep_proposal`.
    """

    def dream():
        particles, data = _plates(num_particles, num_data)
        with particles, data:
            h = numpyro.sample(LATENT, sbn.model.prior(p))
            x = numpyro.sample(OBSERVED, sbn.model.likelihood(p, h))
        return (x,)

    return dream


def sleep_proposal(sbn: SBN, q: Mapping, num_particles: int, num_data: int) -> Callable:
    """``q(h | x)`` for dreamed images ``x`` of shape ``(K, B, D)``.

    :meth:`combinators.amortized.InferenceNetwork.program` takes data with
    a single batch axis ``(B, D)``; a dream has one image per particle, so
    this program calls the same ``distribution_fn`` on ``(K, B, D)``.
    """

    def proposal(x):
        d = sbn.guide.distribution_fn(q, x)
        particles, data = _plates(num_particles, num_data)
        with particles, data:
            numpyro.sample(LATENT, d)
        return ()

    return proposal
