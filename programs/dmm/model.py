"""A deep Markov model trained with variational SMC.

The deep Markov model of Krishnan, Shalit & Sontag (2017), "Structured
Inference Networks for Nonlinear State Space Models",
https://arxiv.org/abs/1609.09869, for a batch of ``B`` sequences of 2-D
points ``x_t`` with latents ``z_t`` in ``R^d``::

    z_0 ~ N(0, I)
    z_t | z_{t-1} ~ N(mu(z_{t-1}), diag sigma(z_{t-1})^2)    gated transition
    x_t | z_t     ~ N(f(z_t), diag s^2)                      MLP emission

Inference is ``algo.vsmc(targets, proposals, num_targets=T,
form="incremental")`` with a learned proposal ``q(z_t | z_{t-1}, x_t)``:
``targets(t)(z_prev)`` scores only the new sites, so each step costs O(N)
and the loop over time compiles once (``x_t`` is read at the traced step
with ``lax.dynamic_index_in_dim``). The particle plate is outermost
(``dim=-2``): each sequence is its own particle filter. Model and proposal
are trained jointly by maximising ``log Z-hat`` (Maddison et al. 2017,
https://arxiv.org/abs/1705.09279; Le et al. 2018,
https://arxiv.org/abs/1705.10306; Naesseth et al. 2018,
https://arxiv.org/abs/1705.11140).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

import combinators
from combinators import algo
from combinators.flax_utils import BindModule

OBS_DIM = 2
MIN_SCALE = 1e-3


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
    """Step ``t``'s target ``p(z_t | z_{t-1}) p(x_t | z_t)``, new sites only.

    Args:
      model: a bound :class:`DMM` (or anything with its methods).
      xs: the observed batch, shape ``(B, T, 2)``.
      t: the step (a Python int or a traced integer).
      num_particles: ``N``.

    Returns:
      The program ``(z_prev=None) -> (z,)``, ``z`` of shape ``(N, B, d)``;
      with no argument (step 0) it scores ``z_0 ~ N(0, I)``.
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
    """Step ``t``'s proposal ``z_t ~ q(z_t | z_{t-1}, x_t)``.

    Returns:
      The program ``(z_prev=None) -> (z,)``; with no argument (step 0) it
      draws from ``model.initial_proposal(x_0)``.
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


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


def _scale(x):
    return jax.nn.softplus(x) + MIN_SCALE


def _identity_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(*shape, dtype=dtype)


class GatedTransition(nn.Module):
    """The gated transition ``p(z_t | z_{t-1})`` (Krishnan et al., Section 5).

    A gate ``g = sigmoid(MLP(z))`` mixes a linear map ``Wz`` (initialised to
    the identity) with ``h = MLP(z)``: ``mu = (1 - g) Wz + g h``, ``sigma =
    softplus(Linear(relu(h)))``.
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
    """``p(x_t | z_t) = N(MLP(z_t), diag s^2)`` with a learned ``s``."""

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

    Untrained, its scale can be far smaller than the transition's: heavy-
    tailed weights (``Z-hat`` stays unbiased, but its sample mean over a few
    hundred runs is then usually below ``Z``).
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

    The programs call ``transition(z_prev)``, ``emission(z)``,
    ``proposal(z_prev, x)`` and ``initial_proposal(x)`` (through
    :class:`combinators.flax_utils.BindModule`), each returning ``(loc,
    scale)`` of a diagonal Gaussian.
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


# ---------------------------------------------------------------------------
# The combinator program and its loss
# ---------------------------------------------------------------------------


def make_smc(
    model, xs: jax.Array, num_particles: int, *, record: Callable | None = None
):
    """Variational SMC over a batch of sequences: ``algo.vsmc``, one compiled step.

    Every step resamples; the loss is ``-log Z-hat`` summed over the batch
    and the log weights are ``(N, B)``.

    Args:
      model: a bound :class:`DMM` (or anything with its methods).
      xs: the batch, shape ``(B, T, 2)``.
      num_particles: ``N``.
      record: optional per-step record, kept in ``metrics["history"]``.

    Returns:
      The program, called with no arguments under a seed.
    """
    if jnp.ndim(xs) != 3 or jnp.shape(xs)[-1] != OBS_DIM:
        raise ValueError(
            f"dmm: the data must have shape (batch, T, {OBS_DIM}); got "
            f"{jnp.shape(xs)}. A single sequence is xs[None]."
        )
    if jnp.shape(xs)[1] < 2:
        raise ValueError(f"dmm: sequences need T >= 2 steps; got {jnp.shape(xs)[1]}.")

    def targets(t):
        return target_step(model, xs, t, num_particles)

    def proposals(t):
        return proposal_step(model, xs, t, num_particles)

    return algo.vsmc(
        targets, proposals, num_targets=xs.shape[1], record=record, form="incremental"
    )


def bind(params, config) -> BindModule:
    """The :class:`DMM` of ``config`` (``latent_dim``, ``hidden``) with ``params``."""
    return BindModule(DMM(config.latent_dim, config.hidden), params)


def init_params(key: jax.Array, config):
    """Initial :class:`DMM` parameters for ``config`` (``latent_dim``, ``hidden``)."""
    z = jnp.zeros((1, config.latent_dim))
    x = jnp.zeros((1, OBS_DIM))
    return DMM(config.latent_dim, config.hidden).init(key, z, x)


def loss_fn(params, key: jax.Array, *, data: jax.Array, config, num_particles: int):
    """``-log Z-hat`` per sequence and time step on a random minibatch.

    Args:
      params: the :class:`DMM` parameters.
      key: the step's key; split into a minibatch key and an SMC key.
      data: the training set, shape ``(n, T, 2)``.
      config: sizes (``latent_dim``, ``hidden``, ``batch_size``).
      num_particles: ``N``.

    Returns:
      ``(loss, metrics)`` as :func:`combinators.train.train` expects, with
      ``log_Z`` per step and the final mean ``ess``.
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
