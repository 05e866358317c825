"""The training objectives of the sigmoid belief network: six gradient estimators.

The latents of :mod:`programs.sbn.model` are discrete, so the
reparameterisation trick does not apply; :func:`make_estimator` trains the
network with one of

* ``"reinforce"``: the score-function ELBO gradient without baseline
  (Williams 1992, "Simple statistical gradient-following algorithms for
  connectionist reinforcement learning", Machine Learning 8),
  :func:`combinators.estimators.reinforce_loss`;
* ``"nvil"``: the same with NVIL's learned input-dependent baseline, moving
  average and variance normalisation (Mnih & Gregor 2014, "Neural
  Variational Inference and Learning in Belief Networks",
  https://arxiv.org/abs/1402.0030), :func:`combinators.estimators.nvil_loss`;
* ``"vimco"``: the K-sample bound with leave-one-out baselines (Mnih &
  Rezende 2016, "Variational Inference for Monte Carlo Objectives",
  https://arxiv.org/abs/1602.06725), :func:`combinators.estimators.vimco_loss`;
* ``"rws"``: reweighted wake-sleep (Bornschein & Bengio 2015, "Reweighted
  Wake-Sleep", https://arxiv.org/abs/1406.2751),
  :func:`combinators.loss.rws_loss`;
* ``"wake_sleep"``: classic wake-sleep (Hinton, Dayan, Frey & Neal 1995,
  "The 'Wake-Sleep' Algorithm for Unsupervised Neural Networks", Science
  268), :func:`combinators.estimators.wake_theta_loss` plus
  :func:`combinators.estimators.sleep_phi`;
* ``"gumbel"``: the binary Concrete relaxation of the K-sample bound,
  trained by pathwise gradients (:func:`combinators.loss.iwae_loss`).

:func:`proposal_gradient_moments` measures the spread of each estimator's
gradient in the inference network; :func:`signal_to_noise` is the squared
ratio summed over parameters, where Rainforth et al. (2018), "Tighter
Variational Bounds are Not Necessarily Better",
https://arxiv.org/abs/1802.04537, study the per-parameter ratio
``|E g_j| / sd(g_j)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

import combinators as coix
from combinators import estimators as E
from combinators import loss as L
from programs._replicates import FAST_COMPILE
from programs.sbn.model import SBN, dream_program, make_program, sleep_proposal

#: The estimator names (the command line's ``--estimator`` choices).
EstimatorName = Literal["reinforce", "nvil", "vimco", "rws", "wake_sleep", "gumbel"]
ESTIMATORS: tuple[str, ...] = get_args(EstimatorName)

BASELINE_HIDDEN = 32
NVIL_DECAY = 0.9


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
    """NVIL's input-dependent baseline ``b(x) = v^T tanh(A^T x + a) + v0``, ``(B,)``."""
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
    program = make_program(sbn, params, num_particles, loss_fn, relaxed)
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
    """
    if variance <= 0:
        return math.inf
    return (mean_sq - variance / num_draws) / variance
