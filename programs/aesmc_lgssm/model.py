"""AESMC / VSMC / FIVO against IWAE for learning a linear-Gaussian state-space model.

The linear-Gaussian experiment of Le, Igl, Rainforth, Jin & Wood (2018),
"Auto-Encoding Sequential Monte Carlo", ICLR, https://arxiv.org/abs/1705.10306,
with generative parameters ``theta = (a, b)``::

    x_0 ~ N(0, 1),   x_t | x_{t-1} ~ N(a x_{t-1}, 1),   y_t | x_t ~ N(b x_t, 0.01^2),

for ``t = 0, ..., T-1`` and true ``(a, b) = (0.9, 1)``. The law of ``y`` is
the same under ``(a, b)`` and ``(a, -b)`` (flip the sign of every ``x_t``),
so ``b`` is identified up to its sign.

The proposal is the authors' linear one, ``phi = (v0, c0, u, v, c)``::

    q_0(x_0 | y_0) = N(v0 y_0 + c0, s^2),
    q_t(x_t | x_{t-1}, y_t) = N(u x_{t-1} + v y_t + c, s^2),

with ``s`` fixed at the sd of the locally optimal proposal ``p(x_t |
x_{t-1}, y_t)`` of the true model (about 0.01), learned jointly with
``theta``; or the bootstrap proposal ``p(x_t | x_{t-1})`` (``bootstrap=True``).
Each time step is one small program in the incremental form of
:func:`combinators.algo.smc`: ``target(t)`` takes the previous state and
scores the transition and ``y_t``; ``proposal(t)`` draws ``x_t`` (site
``"x"``).

Three objectives, each ``-log Z-hat`` with ``K`` particles, differ in how
``Z-hat`` is built and differentiated (:func:`program_for`):

* ``"iwae"``: sequential importance sampling without resampling, so
  ``Z-hat`` is the IWAE estimator over whole trajectories (Burda, Grosse &
  Salakhutdinov 2016, https://arxiv.org/abs/1509.00519);
* ``"aesmc"``: SMC resampling at every step (``algo.vsmc``), which is AESMC,
  VSMC (Naesseth, Linderman, Ranganath & Blei 2018,
  https://arxiv.org/abs/1705.11140) and FIVO (Maddison et al. 2017,
  https://arxiv.org/abs/1705.09279); its gradient ignores the ancestor
  draws (the standard, biased estimator);
* ``"aesmc_score"``: the same SMC plus the stop-gradient score of every
  ancestor draw (``score_gradient=True``; Ścibior & Wood 2021,
  "Differentiable particle filtering without modifying the forward pass",
  https://arxiv.org/abs/2106.10314): ``grad Z-hat`` is unbiased for
  ``grad Z``.

The exact ``log p(y | a, b)`` and the smoothing means come from the Kalman
filter and RTS smoother of :mod:`programs.lgssm_exact`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

import combinators
from combinators import algo
from programs import lgssm_exact

PARTICLES = "particles"

#: The observation noise sd (fixed, as in the paper).
EMISSION_SD = 0.01

#: The parameters the data are simulated from.
TRUE_THETA = {"a": 0.9, "b": 1.0}

#: Where learning starts.
INIT_THETA = {"a": 0.0, "b": 0.0}

#: The objectives :func:`program_for` builds.
METHODS = ("iwae", "aesmc", "aesmc_score")

#: The learned proposal's sd: that of ``p(x_t | x_{t-1}, y_t)`` in the true
#: model (whose prior variance is 1 at every step, ``P0 = Q = 1``).
PROPOSAL_SD = math.sqrt(EMISSION_SD**2 / (TRUE_THETA["b"] ** 2 + EMISSION_SD**2))


class Model(NamedTuple):
    """The model ``theta`` and proposal ``phi`` on one sequence ``ys``, shape ``(T,)``.

    Its methods give the step programs of :func:`combinators.algo.smc`'s
    incremental form: step 0 takes no argument, step ``t`` takes ``x_{t-1}``.

    Attributes:
      theta: ``{"a", "b"}``.
      phi: ``{"v0", "c0", "u", "v", "c"}`` (unused by the bootstrap proposal).
      ys: the observations.
      num_particles: ``K``.
      bootstrap: propose from the transition instead of ``q_phi``; a bool, or
        a traced boolean array, so one compiled function serves both.
    """

    theta: dict
    phi: dict
    ys: jax.Array
    num_particles: int
    bootstrap: bool | jax.Array = False

    def _y(self, t):
        return jax.lax.dynamic_index_in_dim(self.ys, t, axis=0, keepdims=False)

    def _prior_loc(self, x_prev):
        if x_prev:
            return self.theta["a"] * x_prev[0]
        return jnp.zeros(self.num_particles)

    def target(self, t) -> Callable:
        """Step ``t``: ``p(x_t | x_{t-1}) p(y_t | x_t)``, as ``(*x_prev) -> (x,)``."""

        def program(*x_prev):
            with numpyro.plate(PARTICLES, self.num_particles):
                x = numpyro.sample("x", dist.Normal(self._prior_loc(x_prev), 1.0))
                b, y_t = self.theta["b"], self._y(t)
                numpyro.sample("y", dist.Normal(b * x, EMISSION_SD), obs=y_t)
            return (x,)

        return program

    def proposal(self, t) -> Callable:
        """Step ``t``'s proposal: ``q_t(x_t | x_{t-1}, y_t)`` or the transition."""

        def program(*x_prev):
            phi, y_t = self.phi, self._y(t)
            if x_prev:
                learned = phi["u"] * x_prev[0] + phi["v"] * y_t + phi["c"]
            else:
                learned = jnp.full(self.num_particles, phi["v0"] * y_t + phi["c0"])
            loc = jnp.where(self.bootstrap, self._prior_loc(x_prev), learned)
            scale = jnp.where(self.bootstrap, 1.0, PROPOSAL_SD)
            with numpyro.plate(PARTICLES, self.num_particles):
                return (numpyro.sample("x", dist.Normal(loc, scale)),)

        return program


def importance_sampler(model: Model, record: Callable | None = None) -> Callable:
    """Sequential importance sampling (no resampling): the IWAE estimator.

    ``scan`` over ``compose(propose(target(t), proposal(t)), q)``: each step's
    weight multiplies the previous one, so the final ``metrics["log_Z"]`` is
    ``log (1/K) sum_k p(x^k, y) / q(x^k | y)`` over whole trajectories.

    Args:
      model: the model, proposal and data.
      record: per-step values to keep (see :func:`combinators.scan`).

    Returns:
      A program of no arguments.
    """

    def step(t, q):
        return combinators.compose(
            combinators.propose(model.target(t), model.proposal(t)), q
        )

    first = combinators.propose(model.target(0), model.proposal(0))
    return combinators.scan(1, model.ys.shape[0], step, first, record=record)


def program_for(method: str, model: Model) -> Callable:
    """The program whose final ``metrics["log_Z"]`` is ``method``'s ``log Z-hat``.

    Args:
      method: one of :data:`METHODS`.
      model: the model, proposal and data.

    Returns:
      A program of no arguments.

    Raises:
      ValueError: for an unknown method.
    """
    if method == "iwae":
        return importance_sampler(model)
    if method in ("aesmc", "aesmc_score"):
        return algo.vsmc(
            model.target,
            model.proposal,
            num_targets=model.ys.shape[0],
            form="incremental",
            score_gradient=method == "aesmc_score",
        )
    raise ValueError(f"aesmc_lgssm: method must be one of {METHODS}, got {method!r}.")


def estimate(
    params: dict, key, ys, num_particles: int, method: str, bootstrap=False
) -> tuple[jax.Array, jax.Array]:
    """``log Z-hat`` of ``method`` on one sequence, and the final ESS fraction.

    ``jit``, ``vmap`` and ``grad`` apply; the gradient of ``log Z-hat`` is the
    method's gradient estimator.

    Args:
      params: ``{"theta": ..., "phi": ...}``.
      key: a PRNG key.
      ys: observations, shape ``(T,)``.
      num_particles: ``K``.
      method: one of :data:`METHODS`.
      bootstrap: use the bootstrap proposal.

    Returns:
      ``(log_Z_hat, ess / K)``: the ESS of the final weights, which for
      ``"iwae"`` are whole-trajectory weights and for SMC the last step's.
    """
    model = Model(params["theta"], params["phi"], ys, int(num_particles), bootstrap)
    _, _, metrics = combinators.traced_evaluate(program_for(method, model), seed=key)()
    return metrics["log_Z"], metrics["ess"] / num_particles


def loss(params, key, ys_batch, num_particles: int, method: str, bootstrap=False):
    """``-mean_b log Z-hat(y^b)`` over a batch of sequences ``ys_batch``, ``(B, T)``."""
    keys = jax.random.split(key, ys_batch.shape[0])
    log_z, _ = jax.vmap(
        lambda k, ys: estimate(params, k, ys, num_particles, method, bootstrap)
    )(keys, ys_batch)
    return -jnp.mean(log_z)


# ---------------------------------------------------------------------------
# Parameters, data and the exact reference
# ---------------------------------------------------------------------------


def init_proposal_params(key: jax.Array) -> dict:
    """The proposal at PyTorch's default ``nn.Linear`` initialisation, as the authors.

    ``(v0, c0) ~ U(-1, 1)`` (one input) and ``(u, v, c) ~ U(-1/sqrt(2),
    1/sqrt(2))`` (two inputs).
    """
    key_0, key_t = jax.random.split(key)
    first = jax.random.uniform(key_0, (2,), minval=-1.0, maxval=1.0)
    bound = 1.0 / math.sqrt(2.0)
    later = jax.random.uniform(key_t, (3,), minval=-bound, maxval=bound)
    return {"v0": first[0], "c0": first[1], "u": later[0], "v": later[1], "c": later[2]}


def init_params(key: jax.Array) -> dict:
    """``{"theta": INIT_THETA, "phi": init_proposal_params(key)}`` as arrays.

    The leaves are float arrays of a fixed (not weak) dtype, so a compiled
    training step sees the same types before and after an update.
    """
    dtype = jnp.result_type(float)
    theta = {name: jnp.asarray(value, dtype) for name, value in INIT_THETA.items()}
    return {"theta": theta, "phi": init_proposal_params(key)}


def exact_params(theta: dict) -> lgssm_exact.LGSSMParams:
    """The model ``theta = {"a", "b"}`` as ``lgssm_exact.LGSSMParams`` (``d = 1``)."""
    one = jnp.ones((1, 1))
    return lgssm_exact.LGSSMParams(
        m0=jnp.zeros(1),
        P0=one,
        A=theta["a"] * one,
        Q=one,
        C=theta["b"] * one,
        R=EMISSION_SD**2 * one,
    )


def simulate(
    key: jax.Array, num_steps: int, theta: dict = TRUE_THETA, shape: tuple = ()
):
    """Draws ``(xs, ys)`` from the model ``theta``, each of shape ``shape + (T,)``.

    Args:
      key: a PRNG key.
      num_steps: ``T``.
      theta: ``{"a", "b"}``.
      shape: independent sequences (one ``lax.scan`` over time for all).

    Returns:
      The states ``xs`` and observations ``ys``.
    """
    key_x, key_y = jax.random.split(key)
    noise = jax.random.normal(key_x, (num_steps, *shape))

    def step(x_prev, eps):
        x = theta["a"] * x_prev + eps
        return x, x

    _, rest = jax.lax.scan(step, noise[0], noise[1:])
    xs = jnp.moveaxis(jnp.concatenate([noise[:1], rest]), 0, -1)
    ys = theta["b"] * xs + EMISSION_SD * jax.random.normal(key_y, xs.shape)
    return xs, ys


def exact_log_likelihood(theta: dict, ys: jax.Array) -> jax.Array:
    """``log p(y_{0:T-1} | a, b)`` by the Kalman filter; ``ys`` of shape ``(T,)``."""
    return lgssm_exact.kalman_filter(exact_params(theta), ys[:, None]).log_likelihood


def smoothing_means(theta: dict, ys: jax.Array) -> jax.Array:
    """``E[x_t | y_{0:T-1}]`` under ``theta`` by the RTS smoother, shape ``(T,)``."""
    params = exact_params(theta)
    filtered = lgssm_exact.kalman_filter(params, ys[:, None])
    return lgssm_exact.rts_smoother(params, filtered).smoothed_means[:, 0]


def proposal_smoothing_means(
    theta: dict, phi: dict, key: jax.Array, ys: jax.Array, num_particles: int
) -> jax.Array:
    """``E[x_t | y]`` estimated by importance sampling from ``q_phi`` under ``theta``.

    The authors' measure of the proposal: ``num_particles`` whole
    trajectories from ``q_phi``, weighted by ``p_theta(x, y) / q_phi(x | y)``
    (no resampling), give the smoothing means, shape ``(T,)``.
    """
    model = Model(theta, phi, ys, int(num_particles))
    program = importance_sampler(model, record=lambda out, trace, metrics: out[0])
    _, _, metrics = combinators.traced_evaluate(program, seed=key)()
    paths = metrics["history"].records  # (T, K): no resampling, no ancestry
    return paths @ jax.nn.softmax(metrics["log_weight"])
