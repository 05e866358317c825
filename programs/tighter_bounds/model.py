"""The Gaussian toy of "Tighter variational bounds are not necessarily better".

Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh (2018), "Tighter
Variational Bounds are Not Necessarily Better", ICML,
https://arxiv.org/abs/1802.04537, study the gradients of the
importance weighted bound on a model small enough to solve by hand::

    z ~ N(mu, I),    x | z ~ N(z, I),    q(z | x) = N(A x + b, (2/3) I),

in ``D = 20`` dimensions, with generative parameter ``theta = mu`` and
inference-network parameters ``phi = (A, b)``. Everything is Gaussian:

* the marginal is ``p(x) = N(x; mu, 2 I)`` and the posterior is
  ``p(z | x) = N((x + mu) / 2, I / 2)``;
* the maximum-likelihood ``mu`` is the data mean, and the best ``q`` puts
  its mean on the posterior mean: ``A = I / 2``, ``b = mu / 2`` (its
  variance, fixed at 2/3, cannot match the posterior's 1/2);
* the K = 1 bound (the ELBO) is ``log p(x) - KL(q || p(z | x))``, and the
  K-sample bound ``E log (1/K sum_k w_k)`` is, by the delta method,
  ``log p(x) - chi2 / (2K) + O(K^-2)`` with ``chi2 = Var_q(w) / p(x)^2`` the
  chi-square divergence of the posterior from ``q``, also closed-form here
  (Rainforth et al. 2018; Maddison et al. 2017, "Filtering Variational
  Objectives", https://arxiv.org/abs/1705.09279).

The model and the inference network are numpyro programs inside
``plate("particles", K)``; the target is ``compose(likelihood, prior)`` and
the gradient estimators are the library's own:

* ``"iwae"``: ``propose(target, proposal, loss_fn=iwae_loss)``, the
  reparameterised gradient of ``log (1/K sum_k w_k)`` (Burda, Grosse &
  Salakhutdinov 2016, https://arxiv.org/abs/1509.00519);
* ``"dreg"``: ``algo.dreg_iwae(target, proposal)``, the doubly
  reparameterised gradient (Tucker, Lawson, Gu & Maddison 2019, "Doubly
  Reparameterized Gradient Estimators for Monte Carlo Objectives", ICLR,
  https://arxiv.org/abs/1810.04152), unbiased for the same gradient.

Parameters are a dict ``{"mu": (D,), "A": (D, D), "b": (D,)}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

import combinators
from combinators import algo
from combinators.loss import iwae_loss

DIM = 20
NUM_DATA = 1024
PROPOSAL_VARIANCE = 2.0 / 3.0
POSTERIOR_VARIANCE = 0.5
PERTURBATION = 0.01
ESTIMATORS = ("iwae", "dreg")


# ---------------------------------------------------------------------------
# Programs: prior, likelihood, proposal
# ---------------------------------------------------------------------------


def prior(mu, num_particles: int) -> Callable:
    """The prior program of ``x``: ``z ~ N(mu, I)``, K particles.

    Returns a program that returns ``(z, x)``, the arguments of
    :func:`likelihood`.
    """

    def program(x):
        with numpyro.plate("particles", num_particles):
            z = numpyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        return z, x

    return program


def likelihood(num_particles: int) -> Callable:
    """The likelihood program ``x | z ~ N(z, I)``, ``x`` observed."""

    def program(z, x):
        with numpyro.plate("particles", num_particles):
            numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
        return (z,)

    return program


def proposal(A, b, num_particles: int) -> Callable:
    """The inference network ``q(z | x) = N(A x + b, (2/3) I)``, K particles."""
    scale = math.sqrt(PROPOSAL_VARIANCE)

    def program(x):
        with numpyro.plate("particles", num_particles):
            z = numpyro.sample("z", dist.Normal(A @ x + b, scale).to_event(1))
        return (z,)

    return program


def make_program(params: Mapping, num_particles: int, estimator: str) -> Callable:
    """The weighted program of ``x`` whose ``loss`` is ``-log (1/K sum_k w_k)``.

    Args:
      params: ``{"mu", "A", "b"}``.
      num_particles: K.
      estimator: ``"iwae"`` (``propose`` with ``iwae_loss``) or ``"dreg"``
        (``algo.dreg_iwae``); the loss's value is the same, its gradient
        differs.

    Returns:
      A program of one data point ``x`` of shape ``(D,)``.

    Raises:
      ValueError: for an unknown estimator.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"make_program: unknown estimator {estimator!r}; choose from {ESTIMATORS}."
        )
    target = combinators.compose(
        likelihood(num_particles), prior(params["mu"], num_particles), suffix=False
    )
    q = proposal(params["A"], params["b"], num_particles)
    if estimator == "dreg":
        return algo.dreg_iwae(target, q)
    return combinators.propose(target, q, loss_fn=iwae_loss)


def bound_gradient(
    params: Mapping, key: jax.Array, x, num_particles: int, estimator: str
) -> dict:
    """One estimate of the gradient of the K-sample bound (ascent direction).

    The negative of ``jax.grad`` of the program's loss, so that its
    expectation is ``grad E log (1/K sum_k w_k)``.

    Args:
      params: ``{"mu", "A", "b"}``.
      key: the PRNG key of the K samples.
      x: one data point, shape ``(D,)``.
      num_particles: K.
      estimator: ``"iwae"`` or ``"dreg"``.

    Returns:
      A dict shaped like ``params``.
    """

    def loss(p):
        program = make_program(p, num_particles, estimator)
        _, _, metrics = combinators.traced_evaluate(program, seed=key)(x)
        return metrics.loss

    return jax.tree.map(jnp.negative, jax.grad(loss)(dict(params)))


# ---------------------------------------------------------------------------
# Data and parameters
# ---------------------------------------------------------------------------


def simulate(key: jax.Array, num_data: int = NUM_DATA, dim: int = DIM):
    """Data from the model: ``mu ~ N(0, I)``, ``z_n ~ N(mu, I)``, ``x_n ~ N(z_n, I)``.

    Returns:
      ``(x, mu)``: the data ``(N, D)`` and the true ``mu`` ``(D,)``.
    """
    key_mu, key_z, key_x = jax.random.split(key, 3)
    mu = jax.random.normal(key_mu, (dim,))
    z = mu + jax.random.normal(key_z, (num_data, dim))
    return z + jax.random.normal(key_x, (num_data, dim)), mu


def optimal_params(x) -> dict:
    """The optimum: ``mu`` = data mean (the MLE), ``A = I/2``, ``b = mu/2``."""
    mu = jnp.mean(jnp.asarray(x), axis=0)
    return {"mu": mu, "A": 0.5 * jnp.eye(mu.shape[0]), "b": 0.5 * mu}


def perturb(key: jax.Array, params: Mapping, scale: float = PERTURBATION) -> dict:
    """Adds independent ``N(0, scale^2)`` noise to every parameter entry.

    Rainforth et al. (2018) measure the gradients at parameters perturbed
    this way from the optimum, where the expected gradient is small but not
    zero.
    """
    leaves, tree = jax.tree.flatten(dict(params))
    keys = jax.random.split(key, len(leaves))
    noisy = [
        v + scale * jax.random.normal(k, v.shape)
        for v, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


# ---------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------


def _proposal_offset(params, x):
    """``delta = (A x + b) - (x + mu) / 2``: q's mean minus the posterior mean."""
    return params["A"] @ x + params["b"] - 0.5 * (x + params["mu"])


@jax.jit
def log_marginal(mu, x) -> jax.Array:
    """``log p(x) = log N(x; mu, 2 I)``."""
    return jnp.sum(dist.Normal(mu, math.sqrt(2.0)).log_prob(x))


@jax.jit
def elbo(params: Mapping, x) -> jax.Array:
    """The K = 1 bound ``log p(x) - KL(q(z | x) || p(z | x))``."""
    ratio = PROPOSAL_VARIANCE / POSTERIOR_VARIANCE
    delta = _proposal_offset(params, x)
    dim = delta.shape[0]
    kl = 0.5 * dim * (ratio - 1.0 - math.log(ratio)) + jnp.sum(delta**2) / (
        2.0 * POSTERIOR_VARIANCE
    )
    return log_marginal(params["mu"], x) - kl


@jax.jit
def chi_square(params: Mapping, x) -> jax.Array:
    """``chi2(p(z | x) || q) = E_q[(p(z | x) / q(z))^2] - 1 = Var_q(w) / p(x)^2``.

    Per dimension, ``int N(z; a, s1)^2 / N(z; m, s2) dz = sqrt(s2) / (s1
    sqrt(2 (alpha - beta))) exp(alpha beta (m - a)^2 / (alpha - beta))``
    with ``alpha = 1 / s1``, ``beta = 1 / (2 s2)`` (finite because
    ``alpha > beta``, i.e. ``s2 > s1 / 2``).
    """
    s1, s2 = POSTERIOR_VARIANCE, PROPOSAL_VARIANCE
    alpha, beta = 1.0 / s1, 1.0 / (2.0 * s2)
    delta = _proposal_offset(params, x)
    dim = delta.shape[0]
    log_factor = 0.5 * math.log(s2) - math.log(s1) - 0.5 * math.log(2 * (alpha - beta))
    log_second_moment = dim * log_factor + alpha * beta / (alpha - beta) * jnp.sum(
        delta**2
    )
    return jnp.expm1(log_second_moment)


@jax.jit
def asymptotic_bound(params: Mapping, x, num_particles) -> jax.Array:
    """``log p(x) - chi2 / (2K)``: the K-sample bound up to ``O(K^-2)``."""
    return log_marginal(params["mu"], x) - chi_square(params, x) / (2.0 * num_particles)


@jax.jit
def elbo_gradient(params: Mapping, x) -> dict:
    """The exact expected gradient at K = 1 (of :func:`elbo`)."""
    return jax.grad(elbo)(dict(params), x)


@jax.jit
def asymptotic_gradient(params: Mapping, x, num_particles) -> dict:
    """The gradient of :func:`asymptotic_bound`: the mean gradient up to ``O(K^-2)``.

    For ``phi = (A, b)`` it is ``-grad chi2 / (2K)``, so the expected
    inference-network gradient vanishes like ``1/K``; for ``mu`` it tends to
    ``grad log p(x) = (x - mu) / 2``.
    """
    return jax.grad(asymptotic_bound)(dict(params), x, num_particles)
