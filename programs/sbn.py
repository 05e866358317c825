"""A sigmoid belief network on binarised 8x8 digits, six gradient estimators.

The sigmoid belief network (SBN) of Neal (1992), "Connectionist learning of
belief networks", Artificial Intelligence 56, with one layer of ``H`` binary
latent units over the 64 pixels of scikit-learn's 8x8 digits (binarised at
1/2, :func:`programs.data.load_digits`):

* generative model ``p(h) = prod_i Bernoulli(h_i; sigmoid(b_i))`` and
  ``p(x | h) = prod_j Bernoulli(x_j; sigmoid(W^T h + c)_j)``;
* inference network ``q(h | x) = prod_i Bernoulli(h_i; sigmoid(U^T x + d)_i)``
  (linear, mirroring the model).

Both halves are :mod:`combinators.amortized` objects, so their programs
sample inside ``plate("particles", K)`` (outer) and ``plate("data", B)``
(inner) and ``propose(p, q, loss_fn=...)`` weights particle ``k`` of image
``b`` by ``log p(x_b, h_kb) - log q(h_kb | x_b)``. The latents are discrete,
so the reparameterisation trick does not apply; :func:`make_estimator`
trains the network with one of

* ``"reinforce"``: the score-function ELBO gradient without baseline
  (Williams 1992), :func:`combinators.estimators.reinforce_loss`;
* ``"nvil"``: the same with NVIL's learned input-dependent baseline, moving
  average and variance normalisation (Mnih & Gregor 2014),
  :func:`combinators.estimators.nvil_loss`;
* ``"vimco"``: the K-sample bound with leave-one-out baselines (Mnih &
  Rezende 2016), :func:`combinators.estimators.vimco_loss`;
* ``"rws"``: reweighted wake-sleep (Bornschein & Bengio 2015),
  :func:`combinators.loss.rws_loss`;
* ``"wake_sleep"``: classic wake-sleep (Hinton, Dayan, Frey & Neal 1995),
  :func:`combinators.estimators.wake_theta_loss` plus
  :func:`combinators.estimators.sleep_phi`;
* ``"gumbel"``: the binary Concrete / Gumbel-softmax relaxation (Maddison,
  Mnih & Teh 2017; Jang, Gu & Poole 2017) of the K-sample bound, trained by
  pathwise gradients (:func:`combinators.loss.iwae_loss`); the relaxed unit
  is kept in logit space (a logistic variable) for numerical stability.

Whatever the estimator, the model is evaluated as the *discrete* SBN: the
held-out log-likelihood is estimated by the K = 1000 importance weighted
bound of Burda, Grosse & Salakhutdinov (2016) with ``q`` as proposal, and,
since ``2^16`` latent states can be enumerated, computed exactly as well
(:func:`exact_log_likelihood`).

Run it with ``python -m programs sbn`` (VIMCO) or ``python -m programs.sbn
--estimator NAME``.

References:
  Neal (1992), https://doi.org/10.1016/0004-3702(92)90065-6; Mnih & Gregor
  (2014), "Neural Variational Inference and Learning in Belief Networks",
  https://arxiv.org/abs/1402.0030; Mnih & Rezende (2016), "Variational
  Inference for Monte Carlo Objectives", https://arxiv.org/abs/1602.06725;
  Bornschein & Bengio (2015), "Reweighted Wake-Sleep",
  https://arxiv.org/abs/1406.2751; Hinton, Dayan, Frey & Neal (1995), "The
  'Wake-Sleep' Algorithm for Unsupervised Neural Networks", Science 268;
  Maddison, Mnih & Teh (2017), https://arxiv.org/abs/1611.00712; Jang, Gu &
  Poole (2017), https://arxiv.org/abs/1611.01144; Burda, Grosse &
  Salakhutdinov (2016), https://arxiv.org/abs/1509.00519.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax.scipy.special import logsumexp

import combinators as coix
from combinators import amortized
from combinators import estimators as E
from combinators import loss as L
from combinators.train import train
from programs import data

__all__ = [
    "DESCRIPTION",
    "ESTIMATORS",
    "SBN",
    "Estimator",
    "TrainedSBN",
    "baseline_apply",
    "dream_program",
    "evaluate",
    "exact_log_likelihood",
    "init_baseline",
    "init_params",
    "main",
    "make_estimator",
    "make_sbn",
    "proposal_gradient_moments",
    "run",
    "signal_to_noise",
    "sleep_proposal",
    "train_sbn",
]

DESCRIPTION = (
    "Sigmoid belief network on 8x8 digits, discrete latents: REINFORCE, NVIL, VIMCO, "
    "RWS, wake-sleep or Gumbel-softmax; held-out IWAE bound (K=1000)"
)

ESTIMATORS = ("reinforce", "nvil", "vimco", "rws", "wake_sleep", "gumbel")

NUM_LATENT = 16
NUM_PIXELS = 64
TEMPERATURE = 2.0 / 3.0
BASELINE_HIDDEN = 32
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
IWAE_PARTICLES = 1000
VARIANCE_DRAWS = 100
NVIL_DECAY = 0.9
LATENT = "h"
OBSERVED = "x"
MAX_ENUMERATED_LATENTS = 20


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


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


def _pixel_logits(p, h):
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
      temperature: temperature of the Concrete relaxation (``"gumbel"``).

    Returns:
      An :class:`SBN`.

    References:
      Neal (1992), https://doi.org/10.1016/0004-3702(92)90065-6; Maddison,
      Mnih & Teh (2017), https://arxiv.org/abs/1611.00712, Appendix C (the
      binary Concrete variable as a sigmoid of a logistic one).
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
        return dist.Bernoulli(logits=_pixel_logits(p, h)).to_event(1)

    def proposal_fn(q, x):
        return dist.Bernoulli(logits=_proposal_logits(q, x)).to_event(1)

    def relaxed_prior_fn(p):
        return dist.Logistic(_prior_logits(p) / t, 1.0 / t).to_event(1)

    def relaxed_likelihood_fn(p, z):
        return dist.Bernoulli(logits=_pixel_logits(p, jax.nn.sigmoid(z))).to_event(1)

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
    is the logit of the mean training image when ``pixel_mean`` is given
    (clipped to [0.01, 0.99]), else 0.

    Args:
      sbn: the network.
      key: a PRNG key.
      pixel_mean: optional mean of the training images, shape ``(D,)``.

    Returns:
      The parameter dictionary.
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


def exact_log_likelihood(sbn: SBN, p: Mapping, x, chunk: int = 4096) -> jax.Array:
    """``log p(x_n) = log sum_h p(h) p(x_n | h)`` by enumerating all ``2^H`` states.

    The states are visited ``chunk`` at a time with a running log-sum-exp,
    so memory is ``O(chunk * (N + D))``.

    Args:
      sbn: the network (``H <= 20``).
      p: the generative parameters.
      x: binary images, shape ``(N, D)``.
      chunk: states per block (a power of two; reduced to ``2^H`` if larger).

    Returns:
      Shape ``(N,)``.

    Raises:
      ValueError: for more than 20 latent units.
    """
    h_dim = sbn.num_latent
    if h_dim > MAX_ENUMERATED_LATENTS:
        raise ValueError(
            f"exact_log_likelihood: enumerating 2^{h_dim} latent states is too "
            f"expensive; use the IWAE bound (evaluate) for more than "
            f"{MAX_ENUMERATED_LATENTS} units."
        )
    return _exact_log_likelihood(sbn, p, jnp.asarray(x), min(chunk, 2**h_dim))


@functools.partial(jax.jit, static_argnames=("sbn", "chunk"))
def _exact_log_likelihood(sbn, p, x, chunk):
    h_dim = sbn.num_latent
    bits = jnp.arange(h_dim)
    prior = sbn.model.prior(p)

    def block(carry, start):
        index = start + jnp.arange(chunk)
        states = ((index[:, None] >> bits) & 1).astype(x.dtype)  # (S, H)
        logits = _pixel_logits(p, states)  # (S, D)
        log_lik = x @ logits.T - jnp.sum(jax.nn.softplus(logits), axis=-1)  # (N, S)
        log_joint = prior.log_prob(states) + log_lik
        return jnp.logaddexp(carry, logsumexp(log_joint, axis=-1)), None

    starts = jnp.arange(0, 2**h_dim, chunk)
    init = jnp.full(x.shape[:1], -jnp.inf)
    total, _ = jax.lax.scan(block, init, starts)
    return total


def evaluate(
    sbn: SBN,
    params: Mapping,
    key: jax.Array,
    x,
    num_particles: int,
    *,
    exact: bool = False,
) -> dict[str, float]:
    """Held-out bounds of the discrete SBN, per image (nats).

    Args:
      sbn: the network.
      params: ``{"p", "q", ...}``.
      key: a PRNG key for the importance samples.
      x: the images, shape ``(N, D)``.
      num_particles: K of the IWAE bound.
      exact: also compute ``log p(x)`` exactly (:func:`exact_log_likelihood`).

    Returns:
      ``{"elbo", "iwae", "ess"}`` (and ``"exact"``): the mean over images of
      the K-sample ELBO estimate, of ``log (1/K) sum_k w_k`` (the IWAE bound,
      below ``log p(x)`` in expectation) and of the ESS of the K weights.

    References:
      Burda, Grosse & Salakhutdinov (2016), https://arxiv.org/abs/1509.00519.
    """
    x = jnp.asarray(x)
    chunk = max(1, min(len(x), 40_000 // max(num_particles, 1) or 1))
    b = amortized.bounds(
        sbn.model,
        sbn.guide,
        amortized.AmortizedParams(p=params["p"], q=params["q"]),
        key,
        x,
        num_particles,
        batch_size=chunk,
    )
    result = {"elbo": float(b.elbo), "iwae": float(b.iwae), "ess": float(b.ess)}
    if exact:
        result["exact"] = float(jnp.mean(exact_log_likelihood(sbn, params["p"], x)))
    return result


# ---------------------------------------------------------------------------
# Programs beyond the amortised pair: dreams for the sleep phase
# ---------------------------------------------------------------------------


def dream_program(sbn: SBN, p: Mapping, num_particles: int, num_data: int) -> Callable:
    """The generative program run forwards: ``h ~ p(h)``, ``x ~ p(x | h)``.

    Both sites are sampled (nothing observed) inside
    ``plate("particles", K, dim=-2)`` and ``plate("data", B, dim=-1)``, so the
    program dreams ``K * B`` images; it returns ``(x,)``, the argument of
    :func:`sleep_proposal`.

    Args:
      sbn: the network.
      p: the generative parameters.
      num_particles: K.
      num_data: B.

    Returns:
      A program of no arguments.
    """

    def dream():
        with (
            numpyro.plate("particles", num_particles, dim=-2),
            numpyro.plate("data", num_data, dim=-1),
        ):
            h = numpyro.sample(LATENT, sbn.model.prior(p))
            x = numpyro.sample(OBSERVED, sbn.model.likelihood(p, h))
        return (x,)

    return dream


def sleep_proposal(sbn: SBN, q: Mapping, num_particles: int, num_data: int) -> Callable:
    """``q(h | x)`` for dreamed images ``x`` of shape ``(K, B, D)``.

    :meth:`combinators.amortized.InferenceNetwork.program` takes data with
    a single batch axis ``(B, D)``; a dream has one image per particle, so
    this program calls the same ``distribution_fn`` on ``(K, B, D)``.

    Args:
      sbn: the network.
      q: the inference network's parameters.
      num_particles: K.
      num_data: B.

    Returns:
      A program of the dreamed ``x``.
    """

    def proposal(x):
        d = sbn.guide.distribution_fn(q, x)
        with (
            numpyro.plate("particles", num_particles, dim=-2),
            numpyro.plate("data", num_data, dim=-1),
        ):
            numpyro.sample(LATENT, d)
        return ()

    return proposal


# ---------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------


class Estimator(NamedTuple):
    """A training objective for the SBN.

    Attributes:
      name: one of :data:`ESTIMATORS`.
      loss_fn: ``loss_fn(params, key, x, **state) -> (loss, metrics)``, the
        per-image loss of a minibatch ``x`` of shape ``(B, D)``, with
        scalar metrics ``elbo`` and ``iwae`` (per image, of the training
        program: relaxed ones for ``"gumbel"``) and, for stateful
        estimators, the updated state under the state's own names.
      init_state: keyword state carried between steps (NVIL's moving
        moments), fed back by :func:`combinators.train.train`.
      baseline: whether the parameters need a ``"baseline"`` network.
      relaxed: whether the training programs are the relaxed ones.
      num_particles: K.
    """

    name: str
    loss_fn: Callable
    init_state: dict
    baseline: bool
    relaxed: bool
    num_particles: int


def baseline_apply(psi: Mapping, x) -> jax.Array:
    """NVIL's input-dependent baseline ``b(x) = v^T tanh(A^T x + a) + v0``, ``(B,)``.

    References:
      Mnih & Gregor (2014), https://arxiv.org/abs/1402.0030.
    """
    return jnp.tanh(x @ psi["A"] + psi["a"]) @ psi["v"] + psi["v0"]


def init_baseline(
    key: jax.Array, num_pixels: int, hidden: int = BASELINE_HIDDEN
) -> dict:
    """Baseline parameters: ``A ~ N(0, 0.1^2)``, the rest zero."""
    return {
        "A": 0.1 * jax.random.normal(key, (num_pixels, hidden)),
        "a": jnp.zeros(hidden),
        "v": jnp.zeros(hidden),
        "v0": jnp.zeros(()),
    }


def _wake(sbn, params, key, x, num_particles, loss_fn, relaxed=False):
    """Metrics of ``propose(p, q, loss_fn)`` at the minibatch ``x``."""
    model, guide = (
        (sbn.relaxed_model, sbn.relaxed_guide) if relaxed else (sbn.model, sbn.guide)
    )
    program = amortized.make_program(
        model,
        guide,
        amortized.AmortizedParams(p=params["p"], q=params["q"]),
        num_particles,
        loss_fn=loss_fn,
    )
    _, _, metrics = coix.traced_evaluate(program, seed=key)(x)
    return metrics


def _summaries(metrics, num_data):
    log_weight = jax.lax.stop_gradient(metrics["log_weight"])
    return {
        "elbo": jnp.mean(log_weight),
        "iwae": jnp.sum(logsumexp(log_weight, axis=0) - math.log(log_weight.shape[0]))
        / num_data,
    }


def make_estimator(name: str, sbn: SBN, num_particles: int) -> Estimator:
    """The training objective ``name`` with K = ``num_particles`` samples per image.

    All estimators use the same programs, ``propose(p, q, loss_fn=...)``
    with ``q`` detached for the score-function losses (the amortised
    interface decides from the loss), and return the loss per image.

    * ``"reinforce"``: ``-(1/K) sum_k log w_k``; ``q`` learns from
      ``log w_k * grad log q(h_k | x)``.
    * ``"nvil"``: the same objective; the learning signal is centred by
      ``b(x)`` (:func:`baseline_apply`, trained by regression) and a moving
      average ``c``, and divided by ``max(1, sqrt(v))`` with ``v`` a moving
      variance (decay 0.9).
    * ``"vimco"``: ``-log (1/K) sum_k w_k`` with leave-one-out baselines.
    * ``"rws"``: wake-theta and wake-phi, ``-sum_k wbar_k [log p(x, h_k) +
      log q(h_k | x)]`` with the normalised weights ``wbar`` fixed.
    * ``"wake_sleep"``: wake-theta ``-(1/K) sum_k log p(x, h_k)`` for the
      model and the sleep phase ``-(1/(K B)) sum log q(h | x)`` over ``K * B``
      dreams ``(h, x) ~ p`` for the inference network.
    * ``"gumbel"``: the relaxed K-sample bound, pathwise gradients.

    Args:
      name: one of :data:`ESTIMATORS`.
      sbn: the network.
      num_particles: K (at least 2 for ``"vimco"``).

    Returns:
      An :class:`Estimator`.

    Raises:
      ValueError: for an unknown name, or ``"vimco"`` with one particle.

    References:
      Williams (1992), Machine Learning 8; Mnih & Gregor (2014),
      https://arxiv.org/abs/1402.0030; Mnih & Rezende (2016),
      https://arxiv.org/abs/1602.06725; Bornschein & Bengio (2015),
      https://arxiv.org/abs/1406.2751; Hinton et al. (1995), Science 268;
      Maddison, Mnih & Teh (2017), https://arxiv.org/abs/1611.00712; Jang,
      Gu & Poole (2017), https://arxiv.org/abs/1611.01144.
    """
    if name not in ESTIMATORS:
        raise ValueError(
            f"make_estimator: unknown estimator {name!r}; choose from {ESTIMATORS}."
        )
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(
            f"make_estimator: num_particles must be a positive int, "
            f"got {num_particles!r}."
        )
    if name == "vimco" and num_particles < 2:
        raise ValueError(
            "make_estimator: VIMCO's leave-one-out baselines need at least 2 particles."
        )
    k = num_particles

    def simple(loss, relaxed=False):
        def loss_fn(params, key, x):
            metrics = _wake(sbn, params, key, x, k, loss, relaxed)
            num_data = x.shape[0]
            return metrics["loss"] / num_data, _summaries(metrics, num_data)

        return loss_fn

    state: dict = {}
    if name == "reinforce":
        loss_fn = simple(E.reinforce_loss)
    elif name == "vimco":
        loss_fn = simple(E.vimco_loss)
    elif name == "rws":
        loss_fn = simple(L.rws_loss)
    elif name == "gumbel":
        loss_fn = simple(L.iwae_loss, relaxed=True)
    elif name == "nvil":
        state = {"moments": E.init_signal_moments()}

        def loss_fn(params, key, x, moments):
            b = baseline_apply(params["baseline"], x)
            metrics = _wake(
                sbn, params, key, x, k, E.nvil_loss(b, moments, normalize=True)
            )
            num_data = x.shape[0]
            signal = jax.lax.stop_gradient(metrics["log_weight"] - b)
            summaries = _summaries(metrics, num_data)
            summaries["moments"] = E.update_signal_moments(moments, signal, NVIL_DECAY)
            return metrics["loss"] / num_data, summaries

    else:  # wake_sleep

        def loss_fn(params, key, x):
            key_wake, key_sleep = jax.random.split(key)
            metrics = _wake(sbn, params, key_wake, x, k, E.wake_theta_loss)
            num_data = x.shape[0]
            sleep = E.sleep_phi(
                dream_program(sbn, params["p"], k, num_data),
                sleep_proposal(sbn, params["q"], k, num_data),
                seed=key_sleep,
            )()
            summaries = _summaries(metrics, num_data)
            summaries["sleep_loss"] = jax.lax.stop_gradient(sleep.loss) / num_data
            return (metrics["loss"] + sleep.loss) / num_data, summaries

    return Estimator(name, loss_fn, state, name == "nvil", name == "gumbel", k)


def proposal_gradient_moments(
    estimator: Estimator,
    params: Mapping,
    state: Mapping,
    key: jax.Array,
    x,
    num_draws: int,
    *,
    fast_compile: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Spread of the inference network's gradient at fixed parameters.

    Draws ``num_draws`` independent estimates ``g_r`` of the gradient of
    ``estimator``'s loss in ``params["q"]`` (all components flattened to a
    vector) on the minibatch ``x`` and returns the total variance
    ``sum_j Var_r(g_rj)`` (``ddof=1``) and ``|mean_r g_r|^2``.

    NVIL divides its learning signal by ``max(1, sqrt(v))``, a positive
    scalar that changes the gradient's scale but not its direction (and
    that Adam's per-parameter scaling would undo anyway). To compare
    estimators in the same units, NVIL's gradient is measured here with
    ``v = 1``, i.e. centred by its baselines but not normalised.

    Args:
      estimator: the estimator.
      params: parameters (held fixed).
      state: the estimator's state (e.g. NVIL's moments).
      key: a PRNG key, split into ``num_draws`` keys.
      x: the minibatch.
      num_draws: number of gradient draws (at least 2).
      fast_compile: compile with XLA's backend optimisation level 0.

    Returns:
      ``(total_variance, squared_norm_of_mean)``.
    """
    if num_draws < 2:
        raise ValueError(
            f"proposal_gradient_moments: num_draws must be >= 2, got {num_draws}."
        )
    state = dict(state)
    if "moments" in state:
        state["moments"] = state["moments"]._replace(variance=jnp.ones(()))
    moments_fn = _fast_gradient_moments if fast_compile else _gradient_moments
    return moments_fn(estimator.loss_fn, params, state, key, jnp.asarray(x), num_draws)


def _gradient_moments_fn(loss_fn, params, state, key, x, num_draws):
    def draw(k):
        grads = jax.grad(lambda p: loss_fn(p, k, x, **state)[0])(params)
        return jnp.concatenate(
            [g.ravel() for g in jax.tree_util.tree_leaves(grads["q"])]
        )

    g = jax.vmap(draw)(jax.random.split(key, num_draws))
    mean = jnp.mean(g, axis=0)
    variance = jnp.sum(jnp.square(g - mean)) / (num_draws - 1)
    return variance, jnp.sum(jnp.square(mean))


# XLA's backend optimisation level 0 compiles several times faster and runs
# slower: the right trade for short runs (tests, smoke configurations).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_STATIC = ("loss_fn", "num_draws")
_gradient_moments = jax.jit(_gradient_moments_fn, static_argnames=_STATIC)
_fast_gradient_moments = jax.jit(
    _gradient_moments_fn, static_argnames=_STATIC, compiler_options=FAST_COMPILE
)


def signal_to_noise(variance: float, mean_sq: float, num_draws: int) -> float:
    """``|E g|^2 / tr Cov(g)`` from :func:`proposal_gradient_moments`' outputs.

    ``|mean_r g_r|^2`` overestimates ``|E g|^2`` by ``tr Cov(g) / R`` for
    ``R`` draws; that term is subtracted (the result may be slightly
    negative when the signal is lost in the noise). The ratio does not
    change when the gradient is multiplied by a constant, so it compares
    estimators of differently scaled objectives.

    References:
      Rainforth et al. (2018), "Tighter Variational Bounds are Not
      Necessarily Better", https://arxiv.org/abs/1802.04537, who study the
      per-parameter ratio ``|E g_j| / sd(g_j)``; this is a squared ratio
      summed over parameters.
    """
    if variance <= 0:
        return math.inf
    return (mean_sq - variance / num_draws) / variance


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


class TrainedSBN(NamedTuple):
    """The outcome of :func:`train_sbn`.

    Attributes:
      params: the trained parameters.
      result: the :class:`combinators.train.TrainResult` (metric history).
      evaluations: numpy arrays at the checkpoints: ``step``, ``test_iwae``
        (the ``eval_particles``-sample bound on the test set, per image),
        ``test_elbo``, ``test_ess`` (of the ``eval_particles`` weights per
        image, averaged), ``grad_variance``, ``grad_mean_sq`` and ``grad_snr``
        (:func:`proposal_gradient_moments` and :func:`signal_to_noise` on a
        fixed training minibatch).
      train_seconds: wall-clock time of the training steps alone (the
        checkpoint evaluations excluded; compilation included).
      eval_seconds: wall-clock time of the checkpoint evaluations.
    """

    params: Any
    result: Any
    evaluations: dict
    train_seconds: float
    eval_seconds: float


def train_sbn(
    sbn: SBN,
    estimator: Estimator,
    params: Mapping,
    dataset: data.Dataset,
    *,
    steps: int,
    key: jax.Array,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    num_evals: int = 10,
    eval_particles: int = IWAE_PARTICLES,
    variance_draws: int = VARIANCE_DRAWS,
    progress: bool = True,
    fast_compile: bool = False,
) -> TrainedSBN:
    """Trains the SBN with ``estimator`` (Adam, minibatches) and checkpoints it.

    At step 0, every ``steps // num_evals`` steps and at the end, the test
    IWAE bound and the spread of the inference network's gradient (on the
    first ``batch_size`` training images, ``variance_draws`` draws) are
    recorded. Given the same ``key``, two estimators see the same initial
    parameters (the caller's), the same minibatches and the same evaluation
    keys.

    Args:
      sbn: the network.
      estimator: from :func:`make_estimator`.
      params: initial ``{"p", "q"}``; a ``"baseline"`` network is added for
        NVIL if missing (its key is folded from ``key``).
      dataset: train and test images.
      steps: optimisation steps.
      key: a PRNG key.
      batch_size: images per minibatch.
      learning_rate: Adam's step size.
      num_evals: checkpoints after step 0.
      eval_particles: K of the test IWAE bound.
      variance_draws: gradient draws per checkpoint (0 to skip).
      progress: show a progress bar; if False nothing is printed.
      fast_compile: compile the training step and the gradient draws with
        XLA's backend optimisation level 0 (faster compilation, slower
        steps: for short runs).

    Returns:
      A :class:`TrainedSBN`.
    """
    if steps < 1:
        raise ValueError(f"train_sbn: steps must be at least 1, got {steps}.")
    key_data, key_train, key_eval, key_variance, key_baseline = jax.random.split(key, 5)
    params = dict(params)
    if estimator.baseline and "baseline" not in params:
        params["baseline"] = init_baseline(key_baseline, sbn.num_pixels)
    seed = int(jax.random.randint(key_data, (), 0, 2**31 - 1))
    loader = (
        jnp.asarray(b)
        for b in data.batches(dataset.x_train, batch_size=batch_size, seed=seed)
    )
    x_test = jnp.asarray(dataset.x_test)
    x_variance = jnp.asarray(dataset.x_train[:batch_size])
    eval_every = max(steps // max(num_evals, 1), 1)
    eval_seconds = [0.0]

    def eval_fn(step, params, opt_state, metrics):
        del opt_state
        tic = time.perf_counter()
        state = estimator.init_state
        if metrics is not None:
            state = {name: metrics[name] for name in estimator.init_state}
        bounds = evaluate(sbn, params, key_eval, x_test, eval_particles)
        row = {
            "test_iwae": bounds["iwae"],
            "test_elbo": bounds["elbo"],
            "test_ess": bounds["ess"],
        }
        if variance_draws:
            variance, mean_sq = proposal_gradient_moments(
                estimator,
                params,
                state,
                key_variance,
                x_variance,
                variance_draws,
                fast_compile=fast_compile,
            )
            row["grad_variance"] = float(variance)
            row["grad_mean_sq"] = float(mean_sq)
            row["grad_snr"] = signal_to_noise(
                float(variance), float(mean_sq), variance_draws
            )
        eval_seconds[0] += time.perf_counter() - tic
        return row

    silent = (
        contextlib.nullcontext()
        if progress
        else contextlib.redirect_stdout(io.StringIO())
    )
    tic = time.perf_counter()
    with silent:
        result = train(
            estimator.loss_fn,
            params,
            optax.adam(learning_rate),
            steps,
            dataloader=loader,
            seed=key_train,
            eval_fn=eval_fn,
            eval_every=eval_every,
            log_every=eval_every,
            progress=progress,
            return_result=True,
            jit_compile=_fast_jit if fast_compile else True,
            **estimator.init_state,
        )
    seconds = time.perf_counter() - tic
    evaluations = {name: np.asarray(v) for name, v in result.evaluations.items()}
    return TrainedSBN(
        result.params, result, evaluations, seconds - eval_seconds[0], eval_seconds[0]
    )


def _fast_jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


# ---------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------


def plot(
    path: str, sbn: SBN, trained: TrainedSBN, name: str, key: jax.Array, x_test
) -> None:
    """Saves four panels: test bound, gradient variance, samples, receptive fields.

    Uses matplotlib's object-oriented API with the Agg canvas (no global
    backend, no window).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(20, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    ev = trained.evaluations
    axes[0].plot(ev["step"], ev["test_iwae"], "o-", ms=3, color="C0")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("nats per image")
    axes[0].set_title(f"{name}: held-out IWAE bound")
    if "grad_variance" in ev:
        axes[1].semilogy(ev["step"], ev["grad_variance"], "o-", ms=3, color="C1")
    axes[1].set_xlabel("step")
    axes[1].set_title("variance of the inference network's gradient")

    p = trained.params["p"]
    h = sbn.model.prior(p).sample(key, (32,))
    means = jax.nn.sigmoid(_pixel_logits(p, h))
    pairs = np.stack([np.asarray(x_test[:16]), np.asarray(means[:16])], axis=1)
    axes[2].imshow(data.tile_images(pairs.reshape(-1, 64), columns=8), cmap="gray_r")
    axes[2].set_title("test images | model samples (pixel means)")
    weights = np.asarray(p["W"])
    scale = float(np.max(np.abs(weights))) or 1.0
    axes[3].imshow(
        data.tile_images(weights, columns=8), cmap="RdBu_r", vmin=-scale, vmax=scale
    )
    axes[3].set_title("rows of W: each latent unit's effect on the pixel logits")
    for ax in axes[2:]:
        ax.set_axis_off()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def run(
    *,
    steps: int = 10_000,
    particles: int = 5,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    estimator: str = "vimco",
    iwae_particles: int = IWAE_PARTICLES,
    variance_draws: int = VARIANCE_DRAWS,
    fast_compile: bool = False,
) -> dict[str, float]:
    """Trains the SBN with one estimator, evaluates it, saves figure and metrics.

    Args:
      steps: optimisation steps (Adam, minibatches of 32 images).
      particles: K, samples per image in the training objective.
      seed: seeds the data split, initialisation and training.
      out: output directory; ``sbn_<estimator>.png`` and
        ``sbn_<estimator>_metrics.json`` are written there.
      progress: show a progress bar; if False, training prints nothing.
      estimator: one of :data:`ESTIMATORS`.
      iwae_particles: K of the held-out IWAE bound (1000; smaller for smoke
        runs).
      variance_draws: gradient draws per checkpoint for the variance curve.
      fast_compile: compile with XLA's optimisation level 0 (smoke runs).

    Returns:
      Final metrics as floats: the test IWAE bound, ELBO, exact
      log-likelihood and ESS after (and before) training, the gradient
      variance at the last checkpoint, and the skipped steps.

    References:
      See the module docstring.
    """
    if steps < 1:
        raise ValueError(f"sbn: steps must be at least 1, got {steps}.")
    if particles < 1 or iwae_particles < 1:
        raise ValueError(
            f"sbn: particles and iwae_particles must be positive, got {particles} "
            f"and {iwae_particles}."
        )
    tic = time.perf_counter()
    dataset = data.load_digits(seed=seed)
    key_init, key_train, key_eval, key_plot = jax.random.split(jax.random.key(seed), 4)
    sbn = make_sbn()
    est = make_estimator(estimator, sbn, particles)
    params0 = init_params(sbn, key_init, dataset.x_train.mean(axis=0))
    x_test = jnp.asarray(dataset.x_test)
    before = evaluate(sbn, params0, key_eval, x_test, iwae_particles, exact=True)

    trained = train_sbn(
        sbn,
        est,
        params0,
        dataset,
        steps=steps,
        key=key_train,
        eval_particles=iwae_particles,
        variance_draws=variance_draws,
        progress=progress,
        fast_compile=fast_compile,
    )
    after = evaluate(sbn, trained.params, key_eval, x_test, iwae_particles, exact=True)

    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, f"sbn_{estimator}.png")
    plot(png, sbn, trained, estimator, key_plot, x_test)

    ev = trained.evaluations
    metrics = {
        "test_iwae": after["iwae"],
        "test_elbo": after["elbo"],
        "test_log_likelihood": after["exact"],
        "test_ess": after["ess"],
        "initial_test_iwae": before["iwae"],
        "initial_test_elbo": before["elbo"],
        "initial_test_log_likelihood": before["exact"],
        "skipped_steps": float(trained.result.skipped),
    }
    if "grad_variance" in ev:
        metrics["final_grad_variance"] = float(ev["grad_variance"][-1])
    elapsed = time.perf_counter() - tic
    record: dict[str, Any] = {
        "program": "sbn",
        "estimator": estimator,
        "steps": steps,
        "particles": particles,
        "iwae_particles": iwae_particles,
        "num_latent": sbn.num_latent,
        "seed": seed,
        "elapsed_seconds": elapsed,
        "train_seconds": trained.train_seconds,
        "backend": jax.default_backend(),
        "metrics": metrics,
        "checkpoints": {name: np.asarray(v).tolist() for name, v in ev.items()},
    }
    path = os.path.join(out, f"sbn_{estimator}_metrics.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)

    finite = all(math.isfinite(v) for v in metrics.values())
    print(f"sbn ({estimator}): {steps} steps, {particles} particles, seed {seed}")
    print(
        f"  initial test IWAE (K={iwae_particles}): {before['iwae']:.3f} nats per image"
    )
    print(f"  final test IWAE (K={iwae_particles}):   {after['iwae']:.3f}")
    print(f"  final test ELBO:               {after['elbo']:.3f}")
    print(f"  exact test log-likelihood:     {after['exact']:.3f}")
    print(f"  elapsed:                       {elapsed:.1f} s")
    print(f"  wrote {png} and {path}" + ("" if finite else "  (non-finite metrics!)"))
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    """``python -m programs.sbn [--estimator NAME] [--steps N] ...``.

    ``python -m programs sbn`` runs the default estimator (VIMCO); this
    entry point also chooses the estimator.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m programs.sbn", description=DESCRIPTION
    )
    parser.add_argument("--estimator", choices=ESTIMATORS, default="vimco")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--particles", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run(
        steps=args.steps,
        particles=args.particles,
        seed=args.seed,
        out=args.out,
        progress=not args.quiet,
        estimator=args.estimator,
    )


if __name__ == "__main__":
    main()
