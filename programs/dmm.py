"""A deep Markov model on noisy rings, trained with variational SMC.

The deep Markov model (DMM) of Krishnan, Shalit & Sontag (2017) is a
state-space model whose transition and emission are neural networks. For a
batch of ``B`` sequences ``x_{0:T-1}`` of 2-D points and latents ``z_t`` in
``R^d``::

    z_0 ~ N(0, I)
    z_t | z_{t-1} ~ N(mu(z_{t-1}), diag sigma(z_{t-1})^2)    gated transition
    x_t | z_t     ~ N(f(z_t), diag s^2)                      MLP emission

The gated transition is the one of Krishnan et al. (2017, Section 5): a
gate ``g = sigmoid(MLP(z))`` mixes a linear map of ``z`` (initialised to the
identity) with a non-linear proposal ``h = MLP(z)``, ``mu = (1 - g) * Wz + g
* h``, and ``sigma = softplus(Linear(relu(h)))``.

Inference is sequential Monte Carlo with a learned proposal
``q(z_t | z_{t-1}, x_t)`` (an MLP; at ``t = 0`` the same MLP given
``z_{-1} = 0``), written with the combinators as
``combinators.algo.vsmc(targets, proposals, num_targets=T)``: step ``t`` is
``compose(propose(targets(t), proposals(t)), resample(q))``, where
``targets(t)(z_prev)`` scores only the new sites ``z_t | z_{t-1}`` and
``x_t | z_t``, so each step costs O(N) and the loop over time compiles once
(``lax.scan``; the data are indexed with ``jax.lax.dynamic_index_in_dim`` on
the traced step number). The log weights have shape ``(particles, batch)``:
the particle plate is outermost (``dim=-2``) and every sequence of the batch
is an independent particle filter (resampled column by column). Model and
proposal are trained jointly by maximising ``log Z-hat`` (FIVO / AESMC /
VSMC); the loss ``-log Z-hat`` is reported per sequence and time step.

The data, "noisy rings", are points moving around a circle of radius about
one with a per-sequence angular velocity (either direction), starting
phase and radius, observed with Gaussian noise of standard deviation
``OBS_NOISE``. They are drawn with ``jax.random``; nothing is downloaded.
A model that knew every ring exactly would score ``-log(2 pi e
OBS_NOISE^2)`` nats per time step on average (the entropy of the noise);
``run`` reports that as a reference.

Run it with ``python -m programs dmm`` or ``python -m programs.dmm``.

References:
  Krishnan, Shalit & Sontag (2017), "Structured Inference Networks for
  Nonlinear State Space Models", AAAI, https://arxiv.org/abs/1609.09869.
  Maddison et al. (2017), "Filtering Variational Objectives",
  https://arxiv.org/abs/1705.09279; Le, Igl, Rainforth, Jin & Wood (2018),
  "Auto-Encoding Sequential Monte Carlo", https://arxiv.org/abs/1705.10306;
  Naesseth, Linderman, Ranganath & Blei (2018), "Variational Sequential
  Monte Carlo", https://arxiv.org/abs/1705.11140.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax.scipy.special import logsumexp

import combinators
from combinators import algo
from combinators.flax_utils import BindModule
from combinators.train import train

__all__ = [
    "DESCRIPTION",
    "DMM",
    "SMOKE_CONFIG",
    "Config",
    "LinearGaussianDMM",
    "bind",
    "evaluate",
    "filter_batch",
    "filter_records",
    "generate",
    "init_params",
    "load_data",
    "log_z_columns",
    "loss_fn",
    "make_rings",
    "make_smc",
    "oracle_log_lik_per_step",
    "proposal_step",
    "run",
    "target_step",
]

DESCRIPTION = (
    "Deep Markov model (Krishnan et al. 2017) on noisy rings: vsmc (FIVO/AESMC) "
    "with a learned proposal, O(N) per step, batch of sequences"
)

OBS_DIM = 2
OBS_NOISE = 0.1
NUM_TRAIN = 2048
NUM_TEST = 256
MIN_SCALE = 1e-3


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the data, networks and training.

    Attributes:
      latent_dim: ``d``, the dimension of ``z_t``.
      hidden: width of every hidden layer.
      length: ``T``, time steps per sequence.
      batch_size: sequences per training step (the ``batch`` plate).
      num_train: training sequences.
      num_test: held-out sequences.
      test_particles_factor: the evaluation uses this many times the
        training particles.
      learning_rate: Adam's step size.
    """

    latent_dim: int = 4
    hidden: int = 64
    length: int = 25
    batch_size: int = 32
    num_train: int = NUM_TRAIN
    num_test: int = NUM_TEST
    test_particles_factor: int = 8
    learning_rate: float = 3e-3


SMOKE_CONFIG = Config(hidden=16, length=10, batch_size=8, num_train=64, num_test=16)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def make_rings(key: jax.Array, num_sequences: int, length: int) -> jax.Array:
    """Noisy rings: points moving around a circle, observed with noise.

    Sequence ``n`` has radius ``r_n ~ N(1, 0.05^2)``, starting phase
    ``phi_n ~ U(0, 2 pi)`` and angular velocity ``omega_n = s_n u_n`` with
    a random direction ``s_n = +-1`` and speed ``u_n ~ U(0.2, 0.5)`` radians
    per step; ``x_t = r_n (cos, sin)(phi_n + omega_n t) + OBS_NOISE * eps``.

    Args:
      key: a PRNG key.
      num_sequences: the number of sequences.
      length: ``T``, the number of time steps.

    Returns:
      Points of shape ``(num_sequences, length, 2)`` (float32).
    """
    key_radius, key_phase, key_speed, key_sign, key_noise = jax.random.split(key, 5)
    shape = (num_sequences, 1)
    radius = 1.0 + 0.05 * jax.random.normal(key_radius, shape)
    phase = jax.random.uniform(key_phase, shape, maxval=2.0 * math.pi)
    speed = jax.random.uniform(key_speed, shape, minval=0.2, maxval=0.5)
    sign = jnp.where(jax.random.bernoulli(key_sign, 0.5, shape), 1.0, -1.0)
    angle = phase + sign * speed * jnp.arange(length)
    ring = radius[..., None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
    noise = OBS_NOISE * jax.random.normal(key_noise, ring.shape)
    return (ring + noise).astype(jnp.float32)


def load_data(seed: int, config: Config = Config()) -> tuple[jax.Array, jax.Array]:
    """Training and held-out sequences, independent draws.

    Args:
      seed: the data seed.
      config: sizes (``num_train``, ``num_test``, ``length``).

    Returns:
      ``(x_train, x_test)`` of shapes ``(num_train, T, 2)`` and
      ``(num_test, T, 2)``.
    """
    key_train, key_test = jax.random.split(jax.random.key(seed))
    return (
        make_rings(key_train, config.num_train, config.length),
        make_rings(key_test, config.num_test, config.length),
    )


def oracle_log_lik_per_step(noise: float = OBS_NOISE) -> float:
    """Expected log density of a noisy ring point given the noiseless point.

    ``E[log N(x; mean, noise^2 I_2)] = -log(2 pi e noise^2)``: what a model
    that knew every sequence's ring exactly would score per time step; a
    learnt model's ``log Z-hat`` per step stays below it on average.
    """
    return -math.log(2.0 * math.pi * math.e * noise**2)


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


def _scale(x):
    return jax.nn.softplus(x) + MIN_SCALE


def _identity_init(key, shape, dtype=jnp.float32):
    """The identity matrix as a ``Dense`` kernel (Krishnan et al. 2017, Sec. 5)."""
    del key
    return jnp.eye(*shape, dtype=dtype)


class GatedTransition(nn.Module):
    """Krishnan et al. (2017), Section 5: gated transition ``p(z_t | z_{t-1})``.

    Attributes:
      latent_dim: ``d``.
      hidden: hidden width.
    """

    latent_dim: int
    hidden: int

    @nn.compact
    def __call__(self, z):
        """``(loc, scale)`` of ``z_t`` given ``z_{t-1} = z``."""
        gate = nn.sigmoid(nn.Dense(self.latent_dim)(nn.relu(nn.Dense(self.hidden)(z))))
        proposed = nn.Dense(self.latent_dim)(nn.relu(nn.Dense(self.hidden)(z)))
        linear = nn.Dense(self.latent_dim, kernel_init=_identity_init, name="linear")(z)
        loc = (1.0 - gate) * linear + gate * proposed
        scale = _scale(nn.Dense(self.latent_dim)(nn.relu(proposed)))
        return loc, scale


class Emission(nn.Module):
    """``p(x_t | z_t) = N(MLP(z_t), diag s^2)`` with a learned ``s``.

    Attributes:
      hidden: hidden width.
    """

    hidden: int

    @nn.compact
    def __call__(self, z):
        """``(loc, scale)`` of ``x_t`` given ``z_t = z``."""
        h = nn.relu(nn.Dense(self.hidden)(nn.relu(nn.Dense(self.hidden)(z))))
        loc = nn.Dense(OBS_DIM)(h)
        raw = self.param("raw_scale", nn.initializers.zeros, (OBS_DIM,))
        return loc, jnp.broadcast_to(_scale(raw), loc.shape)


class Proposal(nn.Module):
    """The proposal ``q(z_t | z_{t-1}, x_t)``: an MLP of both.

    Untrained, its scale can be far smaller than the transition's in parts
    of the latent space (down to 0.002 against 0.69 in a 1-D test), which
    makes the importance weights heavy-tailed: ``Z-hat`` stays unbiased,
    but its sample mean over a few hundred runs is then usually below
    ``Z``.

    Attributes:
      latent_dim: ``d``.
      hidden: hidden width.
    """

    latent_dim: int
    hidden: int

    @nn.compact
    def __call__(self, z_prev, x):
        """``(loc, scale)`` of the proposed ``z_t``."""
        h = jnp.concatenate([z_prev, x], axis=-1)
        h = nn.relu(nn.Dense(self.hidden)(nn.relu(nn.Dense(self.hidden)(h))))
        loc = nn.Dense(self.latent_dim)(h)
        scale = _scale(nn.Dense(self.latent_dim)(h))
        return loc, scale


class DMM(nn.Module):
    """The deep Markov model's networks and the SMC proposal.

    Programs call ``transition(z_prev)``, ``emission(z)``,
    ``proposal(z_prev, x)`` and ``initial_proposal(x)``, each returning
    ``(loc, scale)`` of a diagonal Gaussian (through
    :class:`combinators.flax_utils.BindModule`). :class:`LinearGaussianDMM`
    has the same methods.

    Attributes:
      latent_dim: ``d``.
      hidden: hidden width of every network.

    References:
      Krishnan, Shalit & Sontag (2017), https://arxiv.org/abs/1609.09869.
    """

    latent_dim: int = 4
    hidden: int = 64

    def setup(self):
        """Creates the transition, emission and proposal networks."""
        self.transition_net = GatedTransition(self.latent_dim, self.hidden)
        self.emission_net = Emission(self.hidden)
        self.proposal_net = Proposal(self.latent_dim, self.hidden)

    def transition(self, z_prev):
        """``(loc, scale)`` of ``p(z_t | z_{t-1})``."""
        return self.transition_net(z_prev)

    def emission(self, z):
        """``(loc, scale)`` of ``p(x_t | z_t)``."""
        return self.emission_net(z)

    def proposal(self, z_prev, x):
        """``(loc, scale)`` of ``q(z_t | z_{t-1}, x_t)``."""
        return self.proposal_net(z_prev, x)

    def initial_proposal(self, x):
        """``(loc, scale)`` of ``q(z_0 | x_0)``: the proposal net at ``z_{-1} = 0``."""
        return self.proposal_net(jnp.zeros(x.shape[:-1] + (self.latent_dim,)), x)

    def __call__(self, z_prev, x):
        """Runs all three networks (used by ``init``)."""
        z, _ = self.transition(z_prev)
        return self.emission(z), self.proposal(z_prev, x)


class LinearGaussianDMM(NamedTuple):
    """A DMM whose networks are linear maps: a linear-Gaussian state space.

    ``z_0 ~ N(0, I)``, ``z_t ~ N(A z_{t-1}, diag q^2)``, ``x_t ~ N(C z_t,
    diag r^2)``, with the proposals ``q(z_0 | x_0) = N(K_0 x_0, diag
    s_0^2)`` and ``q(z_t | z_{t-1}, x_t) = N(A z + K (x - C A z), diag
    s^2)``. It has the methods of :class:`DMM`, so the same SMC program runs
    on it, and its exact ``log p(x_{0:T-1})`` is a Kalman filter's (the
    tests compare the two).

    Attributes:
      A: transition matrix ``(d, d)``.
      transition_scale: ``q``, shape ``(d,)``.
      C: emission matrix ``(2, d)``.
      emission_scale: ``r``, shape ``(2,)``.
      gain: the proposal's gain ``K``, shape ``(d, 2)``.
      proposal_scale: ``s``, shape ``(d,)``.
      initial_gain: ``K_0``, shape ``(d, 2)``.
      initial_scale: ``s_0``, shape ``(d,)``.
    """

    A: jax.Array
    transition_scale: jax.Array
    C: jax.Array
    emission_scale: jax.Array
    gain: jax.Array
    proposal_scale: jax.Array
    initial_gain: jax.Array
    initial_scale: jax.Array

    @property
    def latent_dim(self) -> int:
        """``d``."""
        return int(self.A.shape[-1])

    def transition(self, z_prev):
        """``(A z_{t-1}, q)``."""
        loc = z_prev @ self.A.T
        return loc, jnp.broadcast_to(self.transition_scale, loc.shape)

    def emission(self, z):
        """``(C z_t, r)``."""
        loc = z @ self.C.T
        return loc, jnp.broadcast_to(self.emission_scale, loc.shape)

    def proposal(self, z_prev, x):
        """``(A z + K (x - C A z), s)``."""
        predicted = z_prev @ self.A.T
        loc = predicted + (x - predicted @ self.C.T) @ self.gain.T
        return loc, jnp.broadcast_to(self.proposal_scale, loc.shape)

    def initial_proposal(self, x):
        """``(K_0 x_0, s_0)``."""
        loc = x @ self.initial_gain.T
        return loc, jnp.broadcast_to(self.initial_scale, loc.shape)


# ---------------------------------------------------------------------------
# Programs: one SMC step scores only what it adds.
# ---------------------------------------------------------------------------


def _plates(num_particles: int, batch_size: int):
    """The particle plate (outermost, ``dim=-2``) and the sequence plate."""
    return (
        numpyro.plate("particles", num_particles, dim=-2),
        numpyro.plate("batch", batch_size, dim=-1),
    )


def _observation(xs: jax.Array, t) -> jax.Array:
    """``x_t`` of every sequence, shape ``(B, 2)``; ``t`` may be traced."""
    return jax.lax.dynamic_index_in_dim(xs, t, axis=1, keepdims=False)


def target_step(model, xs: jax.Array, t, num_particles: int) -> Callable:
    """The target of step ``t``: ``p(z_t | z_{t-1}) p(x_t | z_t)``.

    Only the new sites are scored (``z`` and the observed ``x``); the
    previous steps are already in the incoming weights. Step 0 is called
    with no arguments and scores ``z_0 ~ N(0, I)``.

    Args:
      model: a bound :class:`DMM` or a :class:`LinearGaussianDMM`.
      xs: the observed batch, shape ``(B, T, 2)``.
      t: the step (a Python int or a traced integer).
      num_particles: ``N``.

    Returns:
      The program ``p(z_prev=None) -> (z,)`` with ``z`` of shape ``(N, B, d)``.

    References:
      Krishnan, Shalit & Sontag (2017), https://arxiv.org/abs/1609.09869.
    """
    batch_size = xs.shape[0]

    def target(z_prev=None):
        particles, batch = _plates(num_particles, batch_size)
        with particles, batch:
            if z_prev is None:
                d = model.latent_dim
                z = numpyro.sample("z", dist.Normal(jnp.zeros(d), 1.0).to_event(1))
            else:
                loc, scale = model.transition(z_prev)
                z = numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
            loc, scale = model.emission(z)
            numpyro.sample(
                "x", dist.Normal(loc, scale).to_event(1), obs=_observation(xs, t)
            )
        return (z,)

    return target


def proposal_step(model, xs: jax.Array, t, num_particles: int) -> Callable:
    """The proposal of step ``t``: ``z_t ~ q(z_t | z_{t-1}, x_t)``.

    Step 0 is called with no arguments and draws from
    ``model.initial_proposal(x_0)``.

    Args:
      model: a bound :class:`DMM` or a :class:`LinearGaussianDMM`.
      xs: the observed batch, shape ``(B, T, 2)``.
      t: the step (a Python int or a traced integer).
      num_particles: ``N``.

    Returns:
      The program ``q(z_prev=None) -> (z,)``.
    """
    batch_size = xs.shape[0]

    def proposal(z_prev=None):
        shape = (num_particles, batch_size, OBS_DIM)
        x_t = jnp.broadcast_to(_observation(xs, t), shape)
        if z_prev is None:
            loc, scale = model.initial_proposal(x_t)
        else:
            loc, scale = model.proposal(z_prev, x_t)
        particles, batch = _plates(num_particles, batch_size)
        with particles, batch:
            z = numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
        return (z,)

    return proposal


def _check_data(xs) -> None:
    if jnp.ndim(xs) != 3 or jnp.shape(xs)[-1] != OBS_DIM:
        raise ValueError(
            f"dmm: the data must have shape (batch, T, {OBS_DIM}); got "
            f"{jnp.shape(xs)}. A single sequence is xs[None]."
        )
    if jnp.shape(xs)[1] < 2:
        raise ValueError(f"dmm: sequences need T >= 2 steps; got {jnp.shape(xs)[1]}.")


def filter_records(model) -> Callable:
    """The per-step values kept while filtering (``record`` of the scan).

    Returns:
      ``record(out, trace, metrics)`` giving, for each sequence, the log
      weights ``(N, B)``, the filtered mean of ``z_t``, the filtered
      reconstruction ``E[f(z_t) | x_{0:t}]`` and the one-step prediction
      ``E[f(mu(z_t)) | x_{0:t}]`` of ``x_{t+1}`` (the transition's mean is
      plugged in; its noise is ignored).
    """

    def record(out, trace, metrics):
        del trace
        (z,) = out
        log_weight = metrics.log_weight
        w = jax.nn.softmax(log_weight, axis=0)[..., None]
        reconstruction, _ = model.emission(z)
        predicted, _ = model.emission(model.transition(z)[0])
        return {
            "log_weight": log_weight,
            "z_mean": jnp.sum(w * z, axis=0),
            "reconstruction": jnp.sum(w * reconstruction, axis=0),
            "prediction": jnp.sum(w * predicted, axis=0),
        }

    return record


def make_smc(
    model, xs: jax.Array, num_particles: int, *, record: Callable | None = None
):
    """Variational SMC over a batch of sequences, one compiled step.

    ``vsmc(targets, proposals, num_targets=T)`` with :func:`target_step`
    and :func:`proposal_step`: every step resamples, the loss is ``-log
    Z-hat`` summed over the batch, the log weights are ``(N, B)``. With a
    ``record`` the same program is built with :func:`combinators.algo.smc`
    and ``loss_fn=iwae_loss`` (identical to ``vsmc``, which takes no
    ``record``), so the per-step history keeps the recorded values.

    Args:
      model: a bound :class:`DMM` or a :class:`LinearGaussianDMM`.
      xs: the batch, shape ``(B, T, 2)``.
      num_particles: ``N``.
      record: optional per-step record (e.g. :func:`filter_records`).

    Returns:
      The program, called with no arguments under a seed.

    References:
      Maddison et al. (2017), https://arxiv.org/abs/1705.09279; Le et al.
      (2018), https://arxiv.org/abs/1705.10306; Naesseth et al. (2018),
      https://arxiv.org/abs/1705.11140.
    """
    _check_data(xs)
    length = xs.shape[1]
    targets = functools.partial(_target_at, model, xs, num_particles)
    proposals = functools.partial(_proposal_at, model, xs, num_particles)
    if record is None:
        return algo.vsmc(targets, proposals, num_targets=length)
    return algo.smc(
        targets,
        proposals,
        num_targets=length,
        loss_fn=combinators.loss.iwae_loss,
        record=record,
    )


def _target_at(model, xs, num_particles, t):
    return target_step(model, xs, t, num_particles)


def _proposal_at(model, xs, num_particles, t):
    return proposal_step(model, xs, t, num_particles)


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------


def bind(params, config: Config) -> BindModule:
    """The :class:`DMM` of ``config`` with ``params``."""
    return BindModule(DMM(config.latent_dim, config.hidden), params)


def init_params(key: jax.Array, config: Config):
    """Initial :class:`DMM` parameters."""
    z = jnp.zeros((1, config.latent_dim))
    x = jnp.zeros((1, OBS_DIM))
    return DMM(config.latent_dim, config.hidden).init(key, z, x)


def loss_fn(
    params,
    key: jax.Array,
    *,
    data: jax.Array,
    config: Config,
    num_particles: int,
):
    """``-log Z-hat`` per sequence and time step on a random minibatch.

    Args:
      params: the :class:`DMM` parameters.
      key: the step's key; split into a minibatch key and an SMC key.
      data: the training set, shape ``(n, T, 2)``.
      config: sizes (``batch_size``).
      num_particles: ``N``.

    Returns:
      ``(loss, metrics)`` as :func:`combinators.train.train` expects, with
      ``log_Z`` per step and the final mean ``ess``.

    References:
      Le et al. (2018), https://arxiv.org/abs/1705.10306.
    """
    key_batch, key_smc = jax.random.split(key)
    index = jax.random.choice(
        key_batch, data.shape[0], (config.batch_size,), replace=False
    )
    xs = data[index]
    program = make_smc(bind(params, config), xs, num_particles)
    _, _, metrics = combinators.traced_evaluate(program, seed=key_smc)()
    scale = xs.shape[0] * xs.shape[1]
    loss = metrics["loss"] / scale
    return loss, {
        "loss": loss,
        "log_Z": metrics["log_Z"] / scale,
        "ess": metrics["ess"],
    }


def log_z_columns(log_weight: jax.Array) -> jax.Array:
    """``log Z-hat`` of each column (sequence) from log weights ``(..., N, B)``."""
    n = log_weight.shape[-2]
    return logsumexp(log_weight, axis=-2) - jnp.log(n)


@functools.partial(jax.jit, static_argnames=("config", "num_particles"))
def filter_batch(
    params, key: jax.Array, xs: jax.Array, *, config: Config, num_particles: int
):
    """Runs the SMC on ``xs`` and returns its metrics and per-step records."""
    model = bind(params, config)
    program = make_smc(model, xs, num_particles, record=filter_records(model))
    _, _, metrics = combinators.traced_evaluate(program, seed=key)()
    history = metrics["history"]
    return {
        "log_Z": metrics["log_Z"],
        "ess": history.ess,
        "records": history.records,
    }


def evaluate(params, key: jax.Array, xs: jax.Array, config: Config, num_particles: int):
    """Held-out ``log Z-hat`` per sequence and time step, with per-step detail.

    Args:
      params: the :class:`DMM` parameters.
      key: the SMC key.
      xs: sequences, shape ``(B, T, 2)`` (all filtered as one batch).
      config: sizes.
      num_particles: ``N``.

    Returns:
      ``(summary, detail)``: ``summary`` holds floats (``log_Z_per_step``
      averaged over sequences, the standard error of that average, and
      the mean ``ess``);
      ``detail`` holds arrays (per-step ``log Z`` increments averaged over
      sequences, records).
    """
    result = filter_batch(params, key, xs, config=config, num_particles=num_particles)
    records = result["records"]
    cumulative = log_z_columns(records["log_weight"])  # (T, B)
    per_sequence = np.asarray(cumulative[-1]) / xs.shape[1]
    increments = np.diff(np.asarray(cumulative), axis=0, prepend=0.0)
    summary = {
        "log_Z_per_step": float(np.mean(per_sequence)),
        "log_Z_per_step_se": float(np.std(per_sequence) / math.sqrt(len(per_sequence))),
        "ess": float(np.mean(result["ess"])),
    }
    detail = {
        "log_Z_increments": increments.mean(axis=1),
        "reconstruction": np.asarray(records["reconstruction"]),
        "prediction": np.asarray(records["prediction"]),
    }
    return summary, detail


def generate(model, key: jax.Array, num_sequences: int, length: int) -> jax.Array:
    """Sequences drawn from the model: ``z_0 ~ N(0, I)``, transitions, emissions.

    Returns:
      The emission means ``f(z_t)``, shape ``(num_sequences, length, 2)``.
    """
    key_init, key_steps = jax.random.split(key)
    z0 = jax.random.normal(key_init, (num_sequences, model.latent_dim))

    def step(z, k):
        loc, scale = model.transition(z)
        z_next = loc + scale * jax.random.normal(k, loc.shape)
        return z_next, z

    _, zs = jax.lax.scan(step, z0, jax.random.split(key_steps, length))
    means, _ = model.emission(zs)
    return jnp.swapaxes(means, 0, 1)


# ---------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------


def plot(path, x_test, detail, generated, x_train, train_log_z, increments_before):
    """Saves the figure: filtered sequences, generated trajectories, curves.

    Top row: three held-out sequences (points coloured by time) with the
    filtered reconstructions ``E[f(z_t) | x_{0:t}]`` and the one-step
    predictions of ``x_{t+1}``. Bottom row: trajectories generated by the
    model next to data sequences, the training curve (``log Z-hat`` per
    step) and the held-out ``log Z-hat`` increment at every time step
    before and after training.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    x_test = np.asarray(x_test)
    for i, ax in enumerate(axes[0]):
        x = x_test[i]
        ax.scatter(
            x[:, 0], x[:, 1], c=np.arange(len(x)), cmap="viridis", s=18, label="data"
        )
        rec = detail["reconstruction"][:, i]
        pred = detail["prediction"][:-1, i]
        ax.plot(
            rec[:, 0],
            rec[:, 1],
            "-",
            color="C3",
            lw=1.2,
            label="filtered reconstruction",
        )
        ax.plot(
            pred[:, 0],
            pred[:, 1],
            "--",
            color="C1",
            lw=1.0,
            label="one-step prediction",
        )
        ax.set_aspect("equal")
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_title(f"held-out sequence {i}")
        if i == 0:
            ax.legend(loc="lower left", fontsize=8)

    ax = axes[1, 0]
    x_train = np.asarray(x_train)
    for n in range(min(4, len(generated))):
        ax.plot(x_train[n, :, 0], x_train[n, :, 1], color="0.6", lw=0.8)
        g = np.asarray(generated[n])
        ax.plot(g[:, 0], g[:, 1], "-o", ms=2, lw=1.0, color=f"C{n}")
    ax.set_aspect("equal")
    ax.set_xlim(-1.8, 1.8)
    ax.set_ylim(-1.8, 1.8)
    ax.set_title("generated (colour) vs data (grey)")

    ax = axes[1, 1]
    steps = np.arange(1, len(train_log_z) + 1)
    ax.plot(steps, train_log_z, lw=0.5, color="C0", alpha=0.4)
    window = max(1, len(train_log_z) // 50)
    smooth = np.convolve(train_log_z, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], smooth, lw=1.5, color="C0")
    ax.axhline(
        oracle_log_lik_per_step(), color="k", ls=":", lw=1, label="noise entropy bound"
    )
    ax.set_xlabel("step")
    ax.set_title("training: log Z-hat per time step")
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    ax.plot(increments_before, "-o", ms=3, label="before training")
    ax.plot(detail["log_Z_increments"], "-o", ms=3, label="after training")
    ax.axhline(oracle_log_lik_per_step(), color="k", ls=":", lw=1)
    ax.set_xlabel("time step t")
    ax.set_title("held-out log Z-hat increment at t")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def run(
    *,
    steps: int = 3000,
    particles: int = 16,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    config: Config | None = None,
) -> dict[str, float]:
    """Trains the DMM with VSMC, evaluates held-out log Z-hat, saves figure and JSON.

    Args:
      steps: Adam steps.
      particles: SMC particles per sequence during training; evaluation
        uses ``config.test_particles_factor`` times as many.
      seed: seeds data, initialisation and SMC.
      out: output directory for ``dmm.png`` and ``dmm_metrics.json``.
      progress: show a progress bar; if False, training prints nothing.
      config: sizes; the default :class:`Config`, or ``SMOKE_CONFIG``
        when the environment variable ``COMBINATORS_SMOKE=1`` is set.

    Returns:
      Floats: held-out and training ``log Z-hat`` per time step before and
      after training, held-out ESS, first and last training losses
      (averaged over the first and last 5% of steps), skipped steps and
      the noise-entropy reference.

    References:
      Krishnan, Shalit & Sontag (2017), https://arxiv.org/abs/1609.09869;
      Le et al. (2018), https://arxiv.org/abs/1705.10306.
    """
    if steps < 1:
        raise ValueError(f"dmm: steps must be at least 1, got {steps}.")
    if particles < 1:
        raise ValueError(f"dmm: particles must be at least 1, got {particles}.")
    if config is None:
        smoke = os.environ.get("COMBINATORS_SMOKE") == "1"
        config = SMOKE_CONFIG if smoke else Config()
    tic = time.perf_counter()
    # The same evaluation keys before and after training (common random
    # numbers), one for the held-out set and one for the training subset.
    key_init, key_train, key_test, key_train_eval, key_generate = jax.random.split(
        jax.random.key(seed), 5
    )
    x_train, x_test = load_data(seed, config)
    x_train_eval = x_train[: config.num_test]
    test_particles = particles * config.test_particles_factor

    params = init_params(key_init, config)
    test_before, detail_before = evaluate(
        params, key_test, x_test, config, test_particles
    )
    train_before, _ = evaluate(
        params, key_train_eval, x_train_eval, config, test_particles
    )

    silent = (
        contextlib.nullcontext()
        if progress
        else contextlib.redirect_stdout(io.StringIO())
    )
    train_tic = time.perf_counter()
    with silent:
        result = train(
            functools.partial(loss_fn, config=config, num_particles=particles),
            params,
            optax.adam(config.learning_rate),
            steps,
            seed=key_train,
            progress=progress,
            return_result=True,
            data=x_train,
        )
    train_seconds = time.perf_counter() - train_tic

    test_after, detail_after = evaluate(
        result.params, key_test, x_test, config, test_particles
    )
    train_after, _ = evaluate(
        result.params, key_train_eval, x_train_eval, config, test_particles
    )
    generated = generate(bind(result.params, config), key_generate, 4, config.length)
    losses = np.asarray(result.history["loss"])
    head = max(1, len(losses) // 20)

    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, "dmm.png")
    plot(
        png,
        x_test,
        detail_after,
        generated,
        x_train,
        -losses,
        detail_before["log_Z_increments"],
    )

    metrics = {
        "test_log_Z_per_step": test_after["log_Z_per_step"],
        "test_log_Z_per_step_se": test_after["log_Z_per_step_se"],
        "test_ess": test_after["ess"],
        "train_log_Z_per_step": train_after["log_Z_per_step"],
        "initial_test_log_Z_per_step": test_before["log_Z_per_step"],
        "initial_train_log_Z_per_step": train_before["log_Z_per_step"],
        "initial_test_ess": test_before["ess"],
        "first_train_loss": float(np.mean(losses[:head])),
        "last_train_loss": float(np.mean(losses[-head:])),
        "skipped_steps": float(result.skipped),
        "oracle_log_lik_per_step": oracle_log_lik_per_step(),
    }
    elapsed = time.perf_counter() - tic
    record: dict[str, Any] = {
        "program": "dmm",
        "steps": steps,
        "particles": particles,
        "test_particles": test_particles,
        "seed": seed,
        "config": dataclasses.asdict(config),
        "elapsed_seconds": elapsed,
        "train_seconds": train_seconds,
        "compile_seconds": float(result.history["compile_seconds"][0]),
        "backend": jax.default_backend(),
        "metrics": metrics,
        "test_log_Z_increments_before": [
            float(v) for v in detail_before["log_Z_increments"]
        ],
        "test_log_Z_increments_after": [
            float(v) for v in detail_after["log_Z_increments"]
        ],
    }
    path = os.path.join(out, "dmm_metrics.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)

    finite = all(math.isfinite(v) for v in metrics.values())
    print(
        f"dmm: {steps} steps, {particles} particles ({test_particles} at test), "
        f"seed {seed}"
    )
    print(
        f"  test log Z-hat per step:  {test_before['log_Z_per_step']:.4f} -> "
        f"{test_after['log_Z_per_step']:.4f} (+- {test_after['log_Z_per_step_se']:.4f})"
    )
    print(
        f"  train log Z-hat per step: {train_before['log_Z_per_step']:.4f} -> "
        f"{train_after['log_Z_per_step']:.4f}"
    )
    print(f"  noise entropy bound:      {oracle_log_lik_per_step():.4f}")
    print(f"  test ESS:                 {test_after['ess']:.1f} / {test_particles}")
    print(f"  elapsed:                  {elapsed:.1f} s")
    print(f"  wrote {png} and {path}" + ("" if finite else "  (non-finite metrics!)"))
    return metrics


if __name__ == "__main__":
    run()
