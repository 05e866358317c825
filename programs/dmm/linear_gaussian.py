"""A linear-Gaussian stand-in for the DMM, whose exact log-likelihood is known."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LinearGaussianDMM(NamedTuple):
    """A DMM whose networks are linear maps: a linear-Gaussian state space.

    ``z_0 ~ N(0, I)``, ``z_t ~ N(A z_{t-1}, diag q^2)``, ``x_t ~ N(C z_t,
    diag r^2)``, with the proposals ``q(z_0 | x_0) = N(K_0 x_0, diag
    s_0^2)`` and ``q(z_t | z_{t-1}, x_t) = N(A z + K (x - C A z), diag
    s^2)``. It has the methods of :class:`~programs.dmm.model.DMM`, so the
    same SMC program runs on it, and its exact ``log p(x_{0:T-1})`` is a
    Kalman filter's (the tests compare the two).

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
