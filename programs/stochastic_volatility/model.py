"""A stochastic volatility model as SMC step programs, with a learned proposal.

The model (Kim, Shephard & Chib 1998, "Stochastic volatility: likelihood
inference and comparison with ARCH models", Review of Economic Studies
65(3):361-393), a latent log-volatility ``x_t`` and returns ``y_t``::

    x_0 ~ N(mu, sigma^2 / (1 - phi^2)),
    x_t | x_{t-1} ~ N(mu + phi (x_{t-1} - mu), sigma^2),
    y_t | x_t ~ N(0, exp(x_t)),

with ``|phi| < 1`` and ``sigma > 0``. The observation is not linear in the
state, so there is no Kalman filter; ``grid.py`` gives the exact reference
on a fine grid of the 1-D state instead.

Each time step is one small program in the incremental form of
:func:`combinators.algo.smc`: ``target(t)`` takes the previous state and
scores only what step ``t`` adds (the transition and ``y_t``), and a
proposal draws ``x_t`` (site ``"x"``). Two proposals:

* bootstrap: the transition itself (Gordon, Salmond & Smith 1993), whose
  incremental weight is ``p(y_t | x_t)``;
* learned: ``q(x_t | x_{t-1}, y_t) = N(m_t + a d_t + b, (s_t e^c)^2)`` with
  ``m_t, s_t`` the transition's mean and sd and ``d_t`` one Newton step from
  ``m_t`` towards the mode of ``p(x_t | x_{t-1}, y_t)`` (:func:`newton_step`;
  ``a = 1, b = c = 0`` is its Laplace mean). Its three parameters
  ``(a, b, c)`` start at 0, the bootstrap proposal, and are trained by
  maximising ``log Z-hat`` of variational SMC (Naesseth et al. 2018, Le et
  al. 2018, Maddison et al. 2017) with Adam, following one of three
  gradients (:func:`vsmc_loss`): the path gradient with the ancestors held
  fixed, the same plus the score-gradient resampling terms of Ścibior &
  Wood (2021), "Differentiable particle filtering without modifying the
  forward pass", https://arxiv.org/abs/2106.10314, or a local gradient that
  detaches the previous states.

Particle MCMC over this model (``experiment.py``) follows Andrieu, Doucet &
Holenstein (2010), "Particle Markov chain Monte Carlo methods", JRSS B 72(3),
and Lindsten, Jordan & Schön (2014), "Particle Gibbs with ancestor
sampling", JMLR 15.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

import combinators
from combinators import algo

PARTICLES = "particles"


class SVParams(NamedTuple):
    """The model's parameters (floats or traced scalars).

    Attributes:
      phi: the autoregression, ``|phi| < 1``.
      sigma: the state noise sd, ``> 0``.
      mu: the mean log-volatility.
    """

    phi: float = 0.95
    sigma: float = 0.25
    mu: float = 0.0


def stationary_sd(params: SVParams):
    """The sd ``sigma / sqrt(1 - phi^2)`` of the stationary law of ``x_t``."""
    return params.sigma / jnp.sqrt(1.0 - params.phi**2)


def simulate(key: jax.Array, params: SVParams, num_steps: int):
    """Draws ``(xs, ys)``, each of shape ``(T,)``, from the model.

    Args:
      key: a PRNG key.
      params: the model.
      num_steps: ``T``.

    Returns:
      The log-volatilities ``xs`` and the observations ``ys``.
    """
    key_x0, key_eps, key_y = jax.random.split(key, 3)
    x0 = params.mu + stationary_sd(params) * jax.random.normal(key_x0)
    eps = params.sigma * jax.random.normal(key_eps, (num_steps - 1,))

    def step(x, e):
        x = params.mu + params.phi * (x - params.mu) + e
        return x, x

    _, rest = jax.lax.scan(step, x0, eps)
    xs = jnp.concatenate([x0[None], rest])
    ys = jnp.exp(xs / 2) * jax.random.normal(key_y, (num_steps,))
    return xs, ys


def _is_first(t) -> bool:
    """Whether ``t`` is the (static) first step; a traced ``t`` never is."""
    return isinstance(t, (int, np.integer)) and int(t) == 0


def _observation(ys, t):
    return jax.lax.dynamic_index_in_dim(ys, t, axis=0, keepdims=False)


def newton_step(prior: dist.Normal, y_t):
    """One Newton step from the prior mean to the mode of ``p(x_t | x_{t-1}, y_t)``.

    With ``m, s`` the prior's mean and sd and ``l(x) = -x / 2 - y_t^2 e^{-x} / 2``
    the log-likelihood, the step is ``l'(m) / (1 / s^2 - l''(m))`` with
    ``l'(m) = (y_t^2 e^{-m} - 1) / 2`` and ``-l''(m) = y_t^2 e^{-m} / 2`` (the
    Laplace approximation of the locally optimal proposal; Pitt & Shephard
    1999, "Filtering via simulation: auxiliary particle filters", JASA
    94(446), use the first-order version).
    """
    curvature = y_t**2 * jnp.exp(-prior.loc) / 2
    return (curvature - 0.5) / (1.0 / prior.scale**2 + curvature)


def init_proposal_params() -> dict:
    """The learned proposal's parameters at the bootstrap proposal: all zero."""
    return {"a": jnp.zeros(()), "b": jnp.zeros(()), "c": jnp.zeros(())}


class Model(NamedTuple):
    """The SV model on data ``ys`` with ``num_particles`` particles.

    ``detach_previous=True`` stops gradients through the previous state (see
    :func:`train_proposal`); leave it False for filtering and smoothing.

    Its methods give the step programs of :func:`combinators.algo.smc`
    (``t = 0`` a Python int, later steps a traced int).
    """

    params: SVParams
    ys: jax.Array
    num_particles: int
    detach_previous: bool = False

    def transition(self, x_prev=None):
        """``p(x_0)`` when ``x_prev`` is None, else ``p(x_t | x_{t-1})``.

        With ``detach_previous`` no gradient flows back through ``x_prev``
        (the local training objective of :func:`train_proposal`).
        """
        p = self.params
        if x_prev is not None and self.detach_previous:
            x_prev = jax.lax.stop_gradient(x_prev)
        if x_prev is None:
            loc = jnp.full((self.num_particles,), p.mu)
            return dist.Normal(loc, stationary_sd(p))
        return dist.Normal(p.mu + p.phi * (x_prev - p.mu), p.sigma)

    def target(self, t) -> Callable:
        """Step ``t``'s target ``p(x_t | x_{t-1}) p(y_t | x_t)``, ``(*x_prev) -> (x,)``.

        ``x_prev`` is empty at step 0 (the stationary law of ``x_0``).
        """

        def program(*x_prev):
            with numpyro.plate(PARTICLES, self.num_particles):
                x = numpyro.sample("x", self.transition(*x_prev))
                y_t = _observation(self.ys, t)
                numpyro.sample("y", dist.Normal(0.0, jnp.exp(x / 2)), obs=y_t)
            return (x,)

        return program

    def bootstrap_proposal(self, t) -> Callable:
        """Step ``t``'s bootstrap proposal: the transition."""
        del t

        def program(*x_prev):
            with numpyro.plate(PARTICLES, self.num_particles):
                return (numpyro.sample("x", self.transition(*x_prev)),)

        return program

    def learned_proposal(self, theta: dict) -> Callable:
        """The affine proposal ``q_theta(x_t | x_{t-1}, y_t)`` as ``proposals(t)``.

        Args:
          theta: ``{"a", "b", "c"}`` (see the module docstring); zeros give
            the bootstrap proposal.
        """

        def proposals(t):
            def program(*x_prev):
                prior = self.transition(*x_prev)
                y_t = _observation(self.ys, t)
                loc = prior.loc + theta["a"] * newton_step(prior, y_t) + theta["b"]
                scale = prior.scale * jnp.exp(theta["c"])
                with numpyro.plate(PARTICLES, self.num_particles):
                    return (numpyro.sample("x", dist.Normal(loc, scale)),)

            return program

        return proposals


def particle_filter(
    params: SVParams,
    ys: jax.Array,
    num_particles: int,
    *,
    theta: dict | None = None,
    ess_threshold: float | None = None,
    record: Callable | None = None,
    score_gradient: bool = False,
) -> Callable:
    """A particle filter over the ``T = len(ys)`` steps (``algo.smc``).

    Args:
      params: the model.
      ys: observations, shape ``(T,)``, ``T >= 2``.
      num_particles: N.
      theta: the learned proposal's parameters; ``None``: bootstrap.
      ess_threshold: adaptive resampling threshold (``None``: every step).
      record: per-step record (e.g. ``smoothing.record_particles("x")``).
      score_gradient: the unbiased score-gradient resampling.

    Returns:
      A program of no arguments; ``metrics["log_Z"]`` estimates
      ``log p(y_{0:T-1})``.
    """
    model = Model(params, ys, int(num_particles))
    proposals = (
        model.bootstrap_proposal if theta is None else model.learned_proposal(theta)
    )
    return algo.smc(
        model.target,
        proposals,
        num_targets=ys.shape[0],
        ess_threshold=ess_threshold,
        record=record,
        score_gradient=score_gradient,
    )


def log_z_hat(key, params: SVParams, ys, num_particles: int, theta=None, **kwargs):
    """One particle filter's ``log Z-hat``; ``jit``/``vmap``/``grad`` apply."""
    program = particle_filter(params, ys, num_particles, theta=theta, **kwargs)
    return combinators.traced_evaluate(program, seed=key)()[2]["log_Z"]


#: The gradients :func:`train_proposal` can follow.
GRADIENTS = ("local", "score", "path")


def vsmc_loss(theta, key, params: SVParams, ys, num_particles: int, gradient="local"):
    """``-log Z-hat`` of the learned proposal (``algo.vsmc``, incremental form).

    The value is always ``-log Z-hat`` (resampling at every step); the
    gradient in ``theta`` is, by ``gradient``:

    * ``"path"``: the VSMC/FIVO gradient through the reparameterised states,
      ancestor draws held fixed (biased for ``grad E[log Z-hat]``);
    * ``"score"``: ``score_gradient=True``, adding the stop-gradient score
      terms of the resampling (Ścibior & Wood 2021): unbiased for ``grad Z``,
      which is 0 for proposal parameters (``Z`` does not depend on them);
    * ``"local"``: the path gradient with the previous states detached, so
      step ``t`` only sees ``grad log mean_i w_t^i`` given ``x_{t-1}``: each
      step's proposal is fitted to ``p(x_t | x_{t-1}, y_t)`` (the locally
      optimal proposal; cf. Gu, Ghahramani & Turner 2015, "Neural adaptive
      sequential Monte Carlo", NeurIPS).
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"vsmc_loss: gradient must be one of {GRADIENTS}.")
    model = Model(params, ys, int(num_particles), gradient == "local")
    program = algo.vsmc(
        model.target,
        model.learned_proposal(theta),
        num_targets=ys.shape[0],
        form="incremental",
        score_gradient=gradient == "score",
    )
    return combinators.traced_evaluate(program, seed=key)()[2].loss


def train_proposal(
    key,
    params: SVParams,
    ys,
    num_particles: int,
    num_steps: int,
    *,
    batch: int = 8,
    learning_rate: float = 0.05,
    gradient: str = "local",
):
    """Trains the learned proposal by maximising ``log Z-hat`` with Adam.

    Args:
      key: a PRNG key.
      params: the model (held fixed).
      ys: observations, shape ``(T,)``.
      num_particles: N per filter.
      num_steps: optimiser steps.
      batch: filters averaged per step.
      learning_rate: Adam's initial step size (cosine decay to 0, which
        averages out the gradient noise at the end).
      gradient: ``"local"``, ``"score"`` or ``"path"`` (see :func:`vsmc_loss`).

    Returns:
      ``(theta, losses)``: the trained parameters and the per-step mean
      ``-log Z-hat``, shape ``(num_steps,)``.
    """
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
    theta = init_proposal_params()

    def batch_loss(theta, key):
        keys = jax.random.split(key, batch)
        losses = jax.vmap(
            lambda k: vsmc_loss(theta, k, params, ys, num_particles, gradient)
        )(keys)
        return jnp.mean(losses)

    def step(carry, key_step):
        theta, state = carry
        loss, grads = jax.value_and_grad(batch_loss)(theta, key_step)
        updates, state = optimizer.update(grads, state, theta)
        return (optax.apply_updates(theta, updates), state), loss

    (theta, _), losses = jax.jit(
        lambda theta, keys: jax.lax.scan(step, (theta, optimizer.init(theta)), keys)
    )(theta, jax.random.split(key, num_steps))
    return theta, losses
