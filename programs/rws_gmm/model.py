"""A 20-component Gaussian mixture with an amortised posterior: the model.

The stochastic-control-flow test bed of Le, Kosiorek, Siddharth, Teh & Wood
(2019), "Revisiting Reweighted Wake-Sleep for Models with Stochastic Control
Flow", UAI, https://arxiv.org/abs/1805.10469 (the Gaussian-mixture
experiment), with the settings of the authors' released code
(github.com/tuananhle7/rrws, ``gmm/``)::

    c ~ Categorical(softmax(0.5 theta))      c in {0, ..., 19}
    x ~ N(10 c, 5^2)

The data come from the same model at ``theta*``, where
``softmax(0.5 theta*)_c = (c + 5) / sum_j (j + 5)``; training starts from
``0.5 theta_0 = (19, 18, ..., 0)``, a prior that puts almost all its mass on
``c = 0``. The inference network is ``q_phi(c | x) = Categorical(softmax(
eta_phi(x)))`` with ``eta_phi`` a 1-16-16-20 tanh MLP fed the raw ``x``.
With 20 components the posterior ``p_theta(c | x)`` is exact by
enumeration (:func:`posterior_probs`), which the q-error needs.

Every distribution appears once, in a numpyro program with the particle
plate outermost (dim -2) and the data plate inside (dim -1), so that
``propose(model_program(...), guide_program(...), loss_fn=...)`` weights
particle ``k`` of data point ``b`` by ``log p(x_b, c_kb) - log q(c_kb |
x_b)``:

* :func:`model_program`: ``p_theta(c) p(x | c)`` at observed ``x``;
* :func:`guide_program`: ``q_phi(c | x)``;
* :func:`defensive_guide_program`: ``(1 - delta) q_phi(c | x) + delta / 20``,
  the defensive proposal of defensive RWS (a mixture of two categoricals is
  one categorical);
* :func:`dream_program`: the model run forwards, for the sleep phase;
* :func:`relaxed_model_program` / :func:`relaxed_guide_program`: the
  Concrete relaxation (Maddison, Mnih & Teh 2017,
  https://arxiv.org/abs/1611.00712) of ``c`` in both, in log space
  (:class:`combinators.relaxed.ExpRelaxedOneHotCategorical`); the likelihood
  sees the relaxed mean ``10 <y, (0, ..., 19)>``.

The categorical sites that are sampled take probabilities, not logits:
numpyro draws ``Categorical(probs=...)`` by inverse CDF (one uniform per
draw) and ``Categorical(logits=...)`` by Gumbel-max (20 per draw), which
made sampling the bulk of a training step. The training objectives built
from these programs are in :mod:`programs.rws_gmm.estimators`.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp

from combinators.relaxed import ExpRelaxedOneHotCategorical

NUM_COMPONENTS = 20
LOC_SPACING = 10.0
SCALE = 5.0
SOFTMAX_MULTIPLIER = 0.5
HIDDEN = (16, 16)
LATENT = "c"
RELAXED_LATENT = "c_relaxed"
OBSERVED = "x"


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------


def true_theta(num_components: int = NUM_COMPONENTS) -> jax.Array:
    """``theta*`` with ``softmax(0.5 theta*)_c = (c + 5) / sum_j (j + 5)``."""
    return jnp.log(true_mixture_probs(num_components)) / SOFTMAX_MULTIPLIER


def true_mixture_probs(num_components: int = NUM_COMPONENTS) -> jax.Array:
    """The true mixture weights ``pi*_c = (c + 5) / sum_j (j + 5)``."""
    counts = jnp.arange(num_components, dtype=jnp.float32) + 5.0
    return counts / jnp.sum(counts)


def initial_theta(num_components: int = NUM_COMPONENTS) -> jax.Array:
    """The authors' starting point ``theta_0 = (38, 36, ..., 0)``.

    ``softmax(0.5 theta_0)`` puts 63% of its mass on ``c = 0`` and decays by
    ``e`` per component, far from the increasing ``pi*``.
    """
    return 2.0 * jnp.arange(num_components - 1, -1, -1, dtype=jnp.float32)


def mixture_probs(theta: jax.Array) -> jax.Array:
    """The model's mixture weights ``softmax(0.5 theta)``."""
    return jax.nn.softmax(SOFTMAX_MULTIPLIER * theta)


def init_phi(key: jax.Array, num_components: int = NUM_COMPONENTS) -> dict:
    """The inference network's weights, initialised as PyTorch's ``nn.Linear``.

    Each layer ``fan_in -> fan_out`` has weights and biases drawn from
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, the default of the authors' code.

    Returns:
      ``{"W1", "b1", "W2", "b2", "W3", "b3"}`` for a 1-16-16-``C`` network.
    """
    sizes = (1, *HIDDEN, num_components)
    keys = jax.random.split(key, 2 * (len(sizes) - 1))
    phi = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        bound = 1.0 / math.sqrt(fan_in)
        phi[f"W{i + 1}"] = jax.random.uniform(
            keys[2 * i], (fan_in, fan_out), minval=-bound, maxval=bound
        )
        phi[f"b{i + 1}"] = jax.random.uniform(
            keys[2 * i + 1], (fan_out,), minval=-bound, maxval=bound
        )
    return phi


def guide_logits(phi: dict, x: jax.Array) -> jax.Array:
    """``eta_phi(x)``: logits of ``q(c | x)``, shape ``x.shape + (C,)``."""
    h = jnp.tanh(x[..., None] @ phi["W1"] + phi["b1"])
    h = jnp.tanh(h @ phi["W2"] + phi["b2"])
    return h @ phi["W3"] + phi["b3"]


def guide_probs(phi: dict, x: jax.Array) -> jax.Array:
    """``q_phi(. | x)``, shape ``x.shape + (C,)``."""
    return jax.nn.softmax(guide_logits(phi, x), axis=-1)


def guide_log_prob(phi: dict, x: jax.Array, c: jax.Array) -> jax.Array:
    """``log q_phi(c | x)`` for ``c`` of shape ``(..., B)`` and ``x`` of shape ``(B,)``.

    Computed from the logits (``log_softmax``), not from clipped probabilities.
    """
    return dist.Categorical(logits=guide_logits(phi, x)).log_prob(c)


# ---------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def plates(num_particles: int, num_data: int):
    """The particle plate (dim -2, outermost) and the data plate (dim -1)."""
    with numpyro.plate("particles", num_particles, dim=-2):
        with numpyro.plate("data", num_data, dim=-1):
            yield


def _locs(num_components: int) -> jax.Array:
    return LOC_SPACING * jnp.arange(num_components, dtype=jnp.float32)


def model_program(theta: jax.Array, num_particles: int):
    """``p_theta(c) p(x | c)`` scored at data ``x`` of shape ``(B,)``.

    Returns:
      The program ``x -> (x,)``; ``c`` has shape ``(K, B)``.
    """

    def program(x):
        with plates(num_particles, x.shape[0]):
            c = numpyro.sample(LATENT, dist.Categorical(probs=mixture_probs(theta)))
            numpyro.sample(OBSERVED, dist.Normal(LOC_SPACING * c, SCALE), obs=x)
        return (x,)

    return program


def guide_program(phi: dict, num_particles: int):
    """``q_phi(c | x)`` for data ``x`` of shape ``(B,)`` (K draws per point)."""

    def program(x):
        probs = guide_probs(phi, x)
        with plates(num_particles, x.shape[0]):
            c = numpyro.sample(LATENT, dist.Categorical(probs=probs))
        return (c,)

    return program


def defensive_guide_program(phi: dict, num_particles: int, delta: float):
    """The defensive proposal ``(1 - delta) q_phi(c | x) + delta Uniform(c)``.

    As in the authors' code, the defensive component is uniform over the
    ``C`` components (not the prior). Both are categorical, so the mixture
    is the categorical with those probabilities.

    References:
      Hesterberg (1995), "Weighted average importance sampling and defensive
      mixture distributions", Technometrics 37(2); Le et al. (2019),
      https://arxiv.org/abs/1805.10469.
    """

    def program(x):
        probs = guide_probs(phi, x)
        mixed = (1.0 - delta) * probs + delta / probs.shape[-1]
        with plates(num_particles, x.shape[0]):
            c = numpyro.sample(LATENT, dist.Categorical(probs=mixed))
        return (c,)

    return program


def dream_program(theta: jax.Array, num_particles: int, num_data: int):
    """The model run forwards, ``K * B`` dreams ``(c, x) ~ p_theta``.

    Returns:
      The program of no arguments returning ``(x,)`` of shape ``(K, B)``, the
      argument of :func:`sleep_guide_program`.
    """

    def program():
        with plates(num_particles, num_data):
            c = numpyro.sample(LATENT, dist.Categorical(probs=mixture_probs(theta)))
            x = numpyro.sample(OBSERVED, dist.Normal(LOC_SPACING * c, SCALE))
        return (x,)

    return program


def sleep_guide_program(phi: dict, num_particles: int, num_data: int):
    """``q_phi(c | x)`` at dreamed ``x`` of shape ``(K, B)``, one draw each."""

    def program(x):
        logits = guide_logits(phi, x)
        with plates(num_particles, num_data):
            numpyro.sample(LATENT, dist.Categorical(logits=logits))
        return ()

    return program


def relaxed_model_program(theta: jax.Array, num_particles: int, temperature):
    """The Concrete-relaxed model at data ``x`` of shape ``(B,)``.

    ``log y ~ ExpConcrete(temperature, 0.5 theta)`` and
    ``x ~ N(10 <y, (0, ..., C-1)>, 5^2)``.
    """

    def program(x):
        locs = _locs(theta.shape[-1])
        with plates(num_particles, x.shape[0]):
            log_y = numpyro.sample(
                RELAXED_LATENT,
                ExpRelaxedOneHotCategorical(
                    temperature, logits=SOFTMAX_MULTIPLIER * theta
                ),
            )
            numpyro.sample(OBSERVED, dist.Normal(jnp.exp(log_y) @ locs, SCALE), obs=x)
        return (x,)

    return program


def relaxed_guide_program(phi: dict, num_particles: int, temperature):
    """``log y ~ ExpConcrete(temperature, eta_phi(x))``, reparameterised."""

    def program(x):
        logits = guide_logits(phi, x)
        with plates(num_particles, x.shape[0]):
            log_y = numpyro.sample(
                RELAXED_LATENT, ExpRelaxedOneHotCategorical(temperature, logits=logits)
            )
        return (log_y,)

    return program


# ---------------------------------------------------------------------------
# Exact quantities
# ---------------------------------------------------------------------------


def sample_data(key: jax.Array, theta: jax.Array, num_data: int) -> jax.Array:
    """``num_data`` draws ``x ~ p_theta(x)`` (component, then Gaussian)."""
    key_c, key_x = jax.random.split(key)
    c = dist.Categorical(probs=mixture_probs(theta)).sample(key_c, (num_data,))
    return LOC_SPACING * c + SCALE * jax.random.normal(key_x, (num_data,))


def log_joint_table(theta: jax.Array, x: jax.Array) -> jax.Array:
    """``log p_theta(c, x_b)`` for every component, shape ``(B, C)``."""
    log_prior = jax.nn.log_softmax(SOFTMAX_MULTIPLIER * theta)
    log_lik = dist.Normal(_locs(theta.shape[-1]), SCALE).log_prob(x[:, None])
    return log_prior + log_lik


def log_evidence(theta: jax.Array, x: jax.Array) -> jax.Array:
    """``log p_theta(x_b) = log sum_c p_theta(c) N(x_b; 10 c, 5^2)``, shape ``(B,)``."""
    return logsumexp(log_joint_table(theta, x), axis=-1)


def posterior_probs(theta: jax.Array, x: jax.Array) -> jax.Array:
    """The exact posterior ``p_theta(c | x_b)`` by enumeration, shape ``(B, C)``."""
    return jax.nn.softmax(log_joint_table(theta, x), axis=-1)


def p_error(theta: jax.Array, theta_star: jax.Array) -> jax.Array:
    """``|| softmax(0.5 theta) - softmax(0.5 theta*) ||_2``."""
    return jnp.linalg.norm(mixture_probs(theta) - mixture_probs(theta_star))


def q_error(phi: dict, theta_star: jax.Array, x: jax.Array) -> jax.Array:
    """``mean_b || q_phi(. | x_b) - p_theta*(. | x_b) ||_2`` (the true posterior)."""
    diff = guide_probs(phi, x) - posterior_probs(theta_star, x)
    return jnp.mean(jnp.linalg.norm(diff, axis=-1))
