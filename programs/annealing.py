"""Annealed importance sampling with learned kernels, trained by nested VI.

Annealed importance sampling (Neal, 2001, "Annealed Importance Sampling",
Statistics and Computing 11) reaches a hard target ``gamma_K`` from an easy
initial density ``pi_0`` through intermediate densities. Here they are the
geometric path

    gamma_k(x) = pi_0(x)^(1 - beta_k) gamma_K(x)^beta_k,
    0 = beta_0 < beta_1 < ... < beta_K = 1,

with a normalised, easy ``pi_0`` and the fixed schedule
``beta_k = (k / K)^power`` (``K = 12``).
Particles move from level ``k - 1`` to level ``k`` by a learned Gaussian
*forward kernel* ``f_k(x' | x) = N(x' ; x + mu_k(x), diag sigma_k(x)^2)``;
a learned *reverse kernel* ``r_k(x | x')`` of the same form scores the
position the particle left. Each level's incremental weight is the ratio of
two densities on the extended space ``(x, x')``,

    w_k = gamma_k(x') r_k(x | x') / (gamma_{k-1}(x) f_k(x' | x)),

and the product of the levels' average weights is an unbiased estimate of
``Z = integral gamma_K`` (Zimmermann, Wu, Esmaeili & van de Meent, 2021,
"Nested Variational Inference", https://arxiv.org/abs/2106.11302, and
Stites et al., 2021, https://arxiv.org/abs/2103.00668), whatever the
kernels; training only reduces its variance. The kernels are trained, one
level at a time, with the reverse-KL objective of nested variational
inference (``nvi_rkl``: resample, move, reweight) or, for comparison, the
annealed variational objective (``nvi_avo``, no resampling; Huang, Tan,
Lacoste & Courville, 2018, https://arxiv.org/abs/1809.01818).

Targets:

* ``"ring"``: eight equally weighted Gaussians in 2-D with means
  ``10 (cos(2 pi j / 8), sin(2 pi j / 8))`` and variance 0.5 per
  coordinate, each normalised, so ``Z = 8`` exactly. Initial density
  ``N(0, 5^2 I)``. This is the mixture of the NVI paper's annealing
  experiment as Coix's ``examples/anneal.py`` reproduces it (radius 10,
  variance 0.5, initial scale 5; 36 training particles).
* ``"funnel"``: Neal's funnel (Neal, 2003, "Slice sampling", Annals of
  Statistics 31) in three dimensions: ``v ~ N(0, 3^2)`` and
  ``x_i | v ~ N(0, exp(v))`` for ``i = 1, 2``, with the normalising
  constants of both Gaussians left out, so ``Z = sqrt(2 pi 9) (2 pi)`` is
  known. Initial density: independent Student-t coordinates (5 degrees of
  freedom, scale 3). With a Gaussian ``pi_0`` the weights would have
  infinite variance (for large ``v`` the funnel's ``x_i`` have heavier
  tails than any fixed Gaussian); with Student-t tails ``gamma / pi_0`` is
  bounded. Its bound, reached in the funnel's neck, grows like
  ``exp(9 d^2 / 8)`` with the number ``d`` of ``x_i``, hence ``d = 2``.

Locality: nested VI trains each level's kernels on that level's objective
only. ``propose(..., detach=True)`` (used by ``algo.nvi_rkl`` and
``algo.nvi_avo``) hands the next level particles without gradient, which
gives that locality. With ``local_gradients=True`` this module also holds the
incoming log weights constant (:func:`detach_particles`); the tutorial's
figures were produced that way. (Before the library fixed ``detach=True``,
which used to detach only the trace its loss reads, ``algo.nvi_rkl`` on the
ring, ``K = 8`` and 10,000 steps, left levels 1-6 with an ESS of 0.1-4%,
against 35-99.6% with local objectives.)

Run it with ``python -m programs annealing``.
"""

from __future__ import annotations

import contextlib
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

import combinators
from combinators import algo
from combinators.loss import avo_loss, rkl_loss
from combinators.util import train

__all__ = [
    "ALGORITHMS",
    "DESCRIPTION",
    "GaussianKernel",
    "Target",
    "TrainingRun",
    "annealed_target",
    "annealing_schedule",
    "detach_particles",
    "evaluate",
    "funnel_log_density",
    "gaussian_kernel",
    "get_target",
    "init_params",
    "initial_distribution",
    "initial_log_density",
    "level_diagnostics",
    "loss_fn",
    "make_program",
    "nested_annealing",
    "nested_elbo",
    "quadrature_log_normalizer",
    "ring_log_density",
    "run",
    "sample",
    "train_kernels",
]

DESCRIPTION = (
    "Annealed importance sampling with learned kernels, nested VI "
    "(Zimmermann et al. 2021): 8-mode ring, Neal's funnel"
)

ALGORITHMS = ("nvi_rkl", "nvi_avo")

NUM_TRANSITIONS = 12  # K: densities gamma_0 .. gamma_K, K forward kernels
HIDDEN = 64
KERNEL_INIT_SCALE = 0.25
TRAIN_PARTICLES = 36  # as in the NVI paper's annealing benchmark
EVAL_PARTICLES = 100_000
TRAIN_STEPS = 30_000
LEARNING_RATE = 1e-3
FINAL_LEARNING_RATE_FRACTION = 0.1  # cosine decay to 10% of the initial rate

RING_MODES = 8
RING_RADIUS = 10.0
RING_VARIANCE = 0.5
FUNNEL_DIM = 3  # v, x_1, x_2
FUNNEL_V_SCALE = 3.0
FUNNEL_INIT_DF = 5.0


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def ring_log_density(x: jax.Array) -> jax.Array:
    """Log of the sum of eight unit-mass Gaussians on a circle of radius 10.

    Args:
      x: points, shape ``(..., 2)``.

    Returns:
      ``log sum_j N(x; m_j, 0.5 I)``, shape ``x.shape[:-1]``; its integral
      over the plane is 8.

    References:
      Zimmermann et al. (2021), https://arxiv.org/abs/2106.11302.
    """
    angles = 2.0 * jnp.pi * jnp.arange(RING_MODES) / RING_MODES
    means = RING_RADIUS * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    per_mode = dist.Normal(means, math.sqrt(RING_VARIANCE)).log_prob(x[..., None, :])
    return jax.scipy.special.logsumexp(jnp.sum(per_mode, axis=-1), axis=-1)


def funnel_log_density(x: jax.Array) -> jax.Array:
    """Unnormalised log density of Neal's funnel; ``x[..., 0]`` is ``v``.

    ``log gamma(v, x) = -v^2 / 18 - sum_i (x_i^2 exp(-v) + v) / 2``, the
    density of ``v ~ N(0, 3^2)``, ``x_i | v ~ N(0, exp(v))`` without the
    factors ``sqrt(2 pi 9)`` and ``(2 pi)^(d/2)``.

    Args:
      x: points, shape ``(..., 1 + d)``.

    Returns:
      The log density, shape ``x.shape[:-1]``.

    References:
      Neal (2003), "Slice sampling", Annals of Statistics 31(3).
    """
    v, rest = x[..., 0], x[..., 1:]
    # (x_i exp(-v/2))^2 rather than x_i^2 exp(-v): no inf * 0 far in the neck.
    standardised = rest * jnp.exp(-0.5 * v)[..., None]
    return -0.5 * jnp.square(v / FUNNEL_V_SCALE) - 0.5 * jnp.sum(
        jnp.square(standardised) + v[..., None], axis=-1
    )


class Target(NamedTuple):
    """An annealing problem: the final density and the initial one.

    Attributes:
      name: ``"ring"`` or ``"funnel"``.
      dim: dimension of the single latent ``x``.
      init_scale: the scale ``s`` of the initial density ``pi_0``.
      init_df: ``None`` for ``pi_0 = N(0, s^2 I)``; a number ``nu`` for
        independent Student-t coordinates with ``nu`` degrees of freedom
        and scale ``s``.
      log_density: ``log gamma_K``, unnormalised, on arrays ``(..., dim)``.
      log_Z: the exact ``log Z`` of ``gamma_K``.
      schedule_power: ``beta_k = (k / K)^schedule_power``.
    """

    name: str
    dim: int
    init_scale: float
    init_df: float | None
    log_density: Callable[[jax.Array], jax.Array]
    log_Z: float
    schedule_power: float


def get_target(name: str) -> Target:
    """The annealing problem called ``name`` (``"ring"`` or ``"funnel"``).

    Raises:
      ValueError: for any other name.
    """
    if name == "ring":
        return Target("ring", 2, 5.0, None, ring_log_density, math.log(RING_MODES), 3.0)
    if name == "funnel":
        d = FUNNEL_DIM - 1
        log_Z = 0.5 * math.log(2 * math.pi * FUNNEL_V_SCALE**2) + 0.5 * d * math.log(
            2 * math.pi
        )
        return Target(
            "funnel", FUNNEL_DIM, 3.0, FUNNEL_INIT_DF, funnel_log_density, log_Z, 2.0
        )
    raise ValueError(f"annealing: unknown target {name!r}; use 'ring' or 'funnel'.")


def annealing_schedule(num_transitions: int, power: float) -> jax.Array:
    """The inverse temperatures ``beta_k = (k / K)^power``, ``k = 0..K``.

    A power above one puts small steps near ``pi_0``, where
    ``log gamma_K - log pi_0`` is large in magnitude.
    """
    return (jnp.arange(num_transitions + 1) / num_transitions) ** power


def initial_distribution(target: Target) -> dist.Distribution:
    """The initial density ``pi_0`` over ``x`` (event shape ``(dim,)``)."""
    if target.init_df is None:
        coordinate = dist.Normal(0.0, target.init_scale)
    else:
        coordinate = dist.StudentT(target.init_df, 0.0, target.init_scale)
    return coordinate.expand([target.dim]).to_event(1)


def initial_log_density(target: Target, x: jax.Array) -> jax.Array:
    """``log pi_0(x)``."""
    return initial_distribution(target).log_prob(x)


def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(values, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(values - top), axis=axis))


def _initial_coordinate_log_density(target: Target, x: np.ndarray) -> np.ndarray:
    """``log pi_0`` of one coordinate, in float64 numpy."""
    s = target.init_scale
    if target.init_df is None:
        return -0.5 * np.square(x / s) - np.log(s * math.sqrt(2 * math.pi))
    nu = target.init_df
    log_norm = (
        math.lgamma((nu + 1) / 2)
        - math.lgamma(nu / 2)
        - 0.5 * math.log(nu * math.pi)
        - math.log(s)
    )
    return log_norm - 0.5 * (nu + 1) * np.log1p(np.square(x / s) / nu)


def quadrature_log_normalizer(target: Target, beta: float = 1.0) -> float:
    """``log Z_beta = log integral pi_0^(1 - beta) gamma_K^beta``, by quadrature.

    Riemann sums on uniform grids, which for smooth, fast-decaying
    integrands converge faster than any power of the spacing (float64):

    * ring: a square grid ``[-25, 25]^2`` with spacing 0.025;
    * funnel: the integrand factorises given ``v``,
      ``Z_beta = int dv a(v) b(v)^d`` with ``a(v) = pi_0(v)^(1 - beta)
      exp(-beta v^2 / 18)`` and ``b(v) = int dx pi_0(x)^(1 - beta)
      exp(-beta (x^2 exp(-v) + v) / 2)``; the inner grid is scaled to the
      width of the integrand at each ``v`` (so it resolves the funnel's
      neck).

    Args:
      target: the annealing problem.
      beta: the inverse temperature in ``[0, 1]``.

    Returns:
      The log normaliser, a Python float.
    """
    beta = float(beta)
    if target.name == "ring":
        axis = np.linspace(-25.0, 25.0, 2001)
        xx, yy = np.meshgrid(axis, axis, sparse=True)
        log_pi0 = _initial_coordinate_log_density(
            target, xx
        ) + _initial_coordinate_log_density(target, yy)
        angles = 2.0 * np.pi * np.arange(RING_MODES) / RING_MODES
        per_mode = [
            -0.5
            * (
                np.square(xx - RING_RADIUS * np.cos(a))
                + np.square(yy - RING_RADIUS * np.sin(a))
            )
            / RING_VARIANCE
            for a in angles
        ]
        log_ring = _logsumexp(np.stack(per_mode), axis=0) - np.log(
            2 * np.pi * RING_VARIANCE
        )
        log_gamma = (1.0 - beta) * log_pi0 + beta * log_ring
        return float(
            _logsumexp(log_gamma.ravel(), axis=0) + 2 * np.log(axis[1] - axis[0])
        )
    if target.name == "funnel":
        v = np.linspace(-150.0, 150.0, 3001)[:, None]
        # The inner integrand's width, scale N(0, 3^2) and exp(v / 2) combined.
        width = 1.0 / np.sqrt((1.0 - beta) / target.init_scale**2 + beta * np.exp(-v))
        width = np.maximum(width, 1e-3 * target.init_scale * (1.0 - beta) + 1e-30)
        u = np.linspace(-60.0, 60.0, 2001)[None, :]
        x = width * u
        log_inner = (1.0 - beta) * _initial_coordinate_log_density(
            target, x
        ) - 0.5 * beta * (np.square(x) * np.exp(-v) + v)
        log_b = _logsumexp(log_inner, axis=1) + np.log(
            width[:, 0] * (u[0, 1] - u[0, 0])
        )
        v = v[:, 0]
        log_a = (1.0 - beta) * _initial_coordinate_log_density(
            target, v
        ) - beta * np.square(v / FUNNEL_V_SCALE) / 2
        d = target.dim - 1
        return float(_logsumexp(log_a + d * log_b, axis=0) + np.log(v[1] - v[0]))
    raise ValueError(f"annealing: no quadrature for target {target.name!r}.")


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


class GaussianKernel(nn.Module):
    """A Gaussian kernel ``N(x + shift(x), diag scale(x)^2)`` from an MLP.

    ``Dense(hidden) - relu - Dense(hidden) - relu`` on ``x / input_scale``,
    then two zero-initialised linear heads: the mean shift, and the raw
    scale, whose bias starts at ``softplus^-1(init_scale)``. Untrained, the
    kernel is a random walk ``N(x, init_scale^2 I)``.

    Attributes:
      dim: dimension of ``x``.
      hidden: hidden width.
      input_scale: typical magnitude of ``x`` (inputs are divided by it).
      init_scale: the initial kernel scale.
    """

    dim: int
    hidden: int = HIDDEN
    input_scale: float = 1.0
    init_scale: float = KERNEL_INIT_SCALE

    @nn.compact
    def __call__(self, x):
        """Returns ``(loc, scale)``, both shaped like ``x``."""
        h = nn.relu(nn.Dense(self.hidden)(x / self.input_scale))
        h = nn.relu(nn.Dense(self.hidden)(h))
        zeros = nn.initializers.zeros
        shift = nn.Dense(self.dim, kernel_init=zeros, bias_init=zeros)(h)
        raw_bias = float(np.log(np.expm1(self.init_scale)))
        raw = nn.Dense(
            self.dim, kernel_init=zeros, bias_init=nn.initializers.constant(raw_bias)
        )(h)
        return x + shift, nn.softplus(raw) + 1e-4


def _kernel_module(target: Target, kernel_params) -> GaussianKernel:
    hidden = kernel_params["params"]["Dense_0"]["kernel"].shape[-1]
    return GaussianKernel(dim=target.dim, hidden=hidden, input_scale=target.init_scale)


def init_params(
    key: jax.Array,
    target: str = "ring",
    num_transitions: int = NUM_TRANSITIONS,
    hidden: int = HIDDEN,
    kernel_scale: float = KERNEL_INIT_SCALE,
) -> dict:
    """Parameters of the ``K`` forward and ``K`` reverse kernels.

    Every level has its own network; the parameters of all levels are
    stacked on a leading axis of length ``K``, so a loop indexes them with
    the level number.

    Args:
      key: PRNG key for the initial weights.
      target: the target's name (sets the dimension).
      num_transitions: ``K``, the number of annealing steps.
      hidden: the kernels' hidden width.
      kernel_scale: the untrained kernels' scale (they start as random
        walks ``N(x, kernel_scale^2 I)``).

    Returns:
      ``{"forward": params, "reverse": params}`` with leaves of shape
      ``(K, ...)``.
    """
    if num_transitions < 1:
        raise ValueError(
            f"annealing: num_transitions must be at least 1, got {num_transitions}."
        )
    spec = get_target(target)
    module = GaussianKernel(
        dim=spec.dim,
        hidden=hidden,
        input_scale=spec.init_scale,
        init_scale=kernel_scale,
    )
    key_forward, key_reverse = jax.random.split(key)

    def stacked(k):
        keys = jax.random.split(k, num_transitions)
        return jax.vmap(lambda kk: module.init(kk, jnp.zeros(spec.dim)))(keys)

    return {"forward": stacked(key_forward), "reverse": stacked(key_reverse)}


def _num_transitions(params) -> int:
    return int(jax.tree_util.tree_leaves(params["forward"])[0].shape[0])


# ---------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------


def _in_particle_plate(program, num_particles: int):
    return numpyro.plate("particles", num_particles, dim=-1)(program)


def annealed_target(target: Target, beta, num_particles: int):
    """The program of ``gamma_beta(x) = pi_0(x)^(1 - beta) gamma_K(x)^beta``.

    Written as ``x ~ pi_0`` (a normalised density, so the program can also
    *sample* level 0) times the factor ``(gamma_K(x) / pi_0(x))^beta``,
    which is ``1`` at ``beta = 0``. Every level has the same two sites, so
    the levels run in one compiled loop.

    Args:
      target: the annealing problem.
      beta: the inverse temperature (may be traced).
      num_particles: the size of the particle plate.

    Returns:
      A program of no arguments returning ``(x,)``.
    """

    def program():
        x = numpyro.sample("x", initial_distribution(target))
        log_ratio = target.log_density(x) - initial_log_density(target, x)
        # At beta = 0 the factor is 1 even where gamma_K underflows to 0.
        numpyro.factor("tempering", jnp.where(beta == 0, 0.0, beta * log_ratio))
        return (x,)

    return _in_particle_plate(program, num_particles)


def gaussian_kernel(target: Target, kernel_params, num_particles: int):
    """The kernel program ``x' ~ N(x + shift(x), diag scale(x)^2)``.

    Used both as forward kernel (it re-samples ``x``) and as reverse kernel
    (inside ``extend`` it scores the previous ``x`` given the new one).

    Args:
      target: the annealing problem (sets the dimension and input scale).
      kernel_params: one level's :class:`GaussianKernel` parameters.
      num_particles: the size of the particle plate.

    Returns:
      A program ``(x,) -> (x',)``.
    """
    module = _kernel_module(target, kernel_params)

    def program(x):
        loc, scale = module.apply(kernel_params, x)
        return (numpyro.sample("x", dist.Normal(loc, scale).to_event(1)),)

    return _in_particle_plate(program, num_particles)


def detach_particles(q: Callable) -> Callable:
    """``q`` with its particles, their log densities and weights held constant.

    The values, log densities and output of ``q`` carry no gradient, nor do
    its log weights; its accumulated loss keeps its gradient. Placed between
    the levels of a nested sampler it makes each level's objective depend
    only on that level's kernels, as nested variational inference
    prescribes (and as Coix's ``propose(..., detach=True)`` does).

    Args:
      q: a (weighted) program.

    Returns:
      The program with stopped gradients.
    """

    def detached(*args, **kwargs):
        out, trace, metrics = combinators.traced_evaluate(q)(*args, **kwargs)
        stop = jax.lax.stop_gradient
        trace = trace.map_sites(
            lambda name, generation, site: site.replace(
                value=stop(site.value), log_prob=stop(site.log_prob)
            )
        )
        metrics = metrics.replace(log_weight=stop(metrics.log_weight))
        out = jax.tree_util.tree_map(stop, out)
        return combinators.empirical(out, trace, metrics)(*args, **kwargs)

    return detached


def nested_annealing(
    targets: Callable,
    forwards: Callable,
    reverses: Callable,
    *,
    num_targets: int,
    algorithm: str = "nvi_rkl",
) -> Callable:
    """``algo.nvi_rkl`` / ``algo.nvi_avo`` with each level's input detached.

    The same steps as the library's algorithms -- level ``k`` proposes
    ``compose(stick_the_landing(forward_k), resample(q))`` (``nvi_rkl``) or
    ``compose(forward_k, q)`` (``nvi_avo``) to ``extend(target_k,
    reverse_k)`` -- with :func:`detach_particles` applied to the incoming
    program ``q``, and run by ``combinators.scan``, so that
    ``metrics["history"]`` holds every level's ESS and ``log Z`` estimate,
    and (in ``records["mean_log_weight"]``) the mean log weight after every
    level, from which :func:`nested_elbo` is computed.

    Args:
      targets: ``targets(k)``, the program of ``gamma_k``.
      forwards: ``forwards(k)``, the kernel from level ``k`` to ``k + 1``.
      reverses: ``reverses(k)``, its reverse kernel.
      num_targets: ``K + 1``.
      algorithm: ``"nvi_rkl"`` or ``"nvi_avo"``.

    Returns:
      The inference program.

    References:
      Zimmermann et al. (2021), https://arxiv.org/abs/2106.11302; Huang et
      al. (2018), https://arxiv.org/abs/1809.01818.
    """
    _check_algorithm(algorithm)

    def level(k, q):
        p = combinators.extend(targets(k + 1), reverses(k))
        q = detach_particles(q)
        if algorithm == "nvi_rkl":
            move = combinators.compose(
                combinators.stick_the_landing(forwards(k)), combinators.resample(q)
            )
            return combinators.propose(p, move, loss_fn=rkl_loss, detach=True)
        move = combinators.compose(forwards(k), q)
        return combinators.propose(p, move, loss_fn=avo_loss, detach=True)

    return combinators.scan(0, num_targets - 1, level, targets(0), record=_record)


def _record(out, trace, metrics) -> dict:
    del out, trace
    return {"mean_log_weight": jnp.mean(metrics.log_weight)}


def nested_elbo(metrics, algorithm: str = "nvi_rkl") -> jax.Array:
    """``sum_k E[log w_k]``: the levels' ELBOs, estimated from one run.

    Level ``k``'s ELBO is the mean incremental log weight,
    ``E[log w_k] = log(Z_k / Z_{k-1}) - KL(gamma_{k-1} f_k || gamma_k r_k)``
    (normalised densities), so ``log Z - nested_elbo`` estimates the sum of
    the levels' reverse KL divergences, which nested VI with ``nvi_rkl``
    minimises level by level (its surrogate loss has this gradient but not
    this value). For ``nvi_rkl`` the incoming particles are resampled, so
    their log weights all equal the previous ``log Z`` estimate; for
    ``nvi_avo`` the incoming log weights are averaged.

    Args:
      metrics: the metrics of a program from :func:`make_program` (with
        ``local_gradients=True``, which records the history).
      algorithm: the algorithm that produced them.

    Returns:
      A scalar.

    References:
      Zimmermann et al. (2021), https://arxiv.org/abs/2106.11302.
    """
    history = metrics["history"]
    mean_log_weight = history.records["mean_log_weight"]
    incoming = history.log_Z[:-1] if algorithm == "nvi_rkl" else mean_log_weight[:-1]
    return jnp.sum(mean_log_weight[1:] - incoming)


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"annealing: algorithm must be one of {ALGORITHMS}, got {algorithm!r}."
        )


def make_program(
    params,
    num_particles: int,
    target: str = "ring",
    *,
    algorithm: str = "nvi_rkl",
    local_gradients: bool = True,
) -> Callable:
    """The annealed importance sampler with learned kernels.

    Args:
      params: kernel parameters from :func:`init_params` (``K`` levels).
      num_particles: the number of particles.
      target: ``"ring"`` or ``"funnel"``.
      algorithm: ``"nvi_rkl"`` (resample at every level, reverse-KL loss) or
        ``"nvi_avo"`` (no resampling, annealed variational objective).
      local_gradients: detach each level's incoming particles
        (:func:`nested_annealing`; see the module docstring). ``False`` uses
        ``algo.nvi_rkl`` / ``algo.nvi_avo`` as they are (then there is no
        per-level history).

    Returns:
      A program of no arguments whose trace holds the particles ``x`` and
      whose metrics hold the log weights, ``log_Z``, ``ess``, ``loss`` and
      (with ``local_gradients``) the per-level ``history``.

    References:
      Zimmermann et al. (2021), https://arxiv.org/abs/2106.11302.
    """
    _check_algorithm(algorithm)
    spec = get_target(target)
    num_transitions = _num_transitions(params)
    betas = annealing_schedule(num_transitions, spec.schedule_power)

    def targets(k):
        return annealed_target(spec, betas[k], num_particles)

    def kernels(which):
        def kernel(k):
            level = jax.tree_util.tree_map(lambda a: a[k], params[which])
            return gaussian_kernel(spec, level, num_particles)

        return kernel

    forwards, reverses = kernels("forward"), kernels("reverse")
    num_targets = num_transitions + 1
    if local_gradients:
        return nested_annealing(
            targets, forwards, reverses, num_targets=num_targets, algorithm=algorithm
        )
    make = algo.nvi_rkl if algorithm == "nvi_rkl" else algo.nvi_avo
    return make(targets, forwards, reverses, num_targets=num_targets)


def loss_fn(
    params,
    key: jax.Array,
    *,
    num_particles: int,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
    local_gradients: bool = True,
):
    """The summed per-level loss of one run (the training objective).

    Returns:
      ``(loss, metrics)`` as :func:`combinators.util.train` expects.
    """
    program = make_program(
        params,
        num_particles,
        target,
        algorithm=algorithm,
        local_gradients=local_gradients,
    )
    _, _, metrics = combinators.traced_evaluate(program, seed=key)()
    return metrics["loss"], metrics


@functools.partial(
    jax.jit, static_argnames=("num_particles", "target", "algorithm", "num_shown")
)
def sample(
    params,
    key: jax.Array,
    num_particles: int,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
    num_shown: int | None = None,
):
    """Runs the sampler; returns particles, log weights and metrics.

    Args:
      params: kernel parameters.
      key: PRNG key.
      num_particles: the number of particles.
      target: the target's name.
      algorithm: ``"nvi_rkl"`` or ``"nvi_avo"``.
      num_shown: if given, the particles are resampled by their weights
        (``combinators.resample``, systematic) to this many equally
        weighted ones.

    Returns:
      ``(x, log_weight, metrics)``; ``metrics`` are the weighted program's
      (before any final resampling), with the per-level ``history``.
    """
    program = make_program(params, num_particles, target, algorithm=algorithm)
    key_run, key_resample = jax.random.split(key)
    _, trace, metrics = combinators.traced_evaluate(program, seed=key_run)()
    x, log_weight = trace["x"].value, metrics["log_weight"]
    if num_shown is not None:
        equal = combinators.resample(
            combinators.empirical((x,), trace, metrics), num_samples=num_shown
        )
        _, resampled, _ = combinators.traced_evaluate(equal, seed=key_resample)()
        x = resampled["x"].value
        log_weight = jnp.zeros(num_shown)
    return x, log_weight, metrics


def evaluate(
    params,
    key: jax.Array,
    num_particles: int = EVAL_PARTICLES,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
) -> dict[str, float]:
    """The log Z estimate and effective sample size of one run.

    Args:
      params: kernel parameters.
      key: PRNG key.
      num_particles: the number of particles.
      target: the target's name.
      algorithm: ``"nvi_rkl"`` or ``"nvi_avo"``.

    Returns:
      ``{"log_Z", "true_log_Z", "log_Z_error", "ess", "ess_fraction",
      "nested_elbo", "nested_kl", "num_particles"}`` as floats. For
      ``nvi_rkl`` (which resamples before every move) the ESS is that of
      the last level's weights; for ``nvi_avo`` it is that of the whole
      annealing path's weights. ``nested_kl = true_log_Z - nested_elbo``
      estimates the sum of the levels' KL divergences (see
      :func:`nested_elbo`).
    """
    _, _, metrics = sample(params, key, num_particles, target, algorithm)
    spec = get_target(target)
    log_Z, ess = float(metrics["log_Z"]), float(metrics["ess"])
    elbo = float(nested_elbo(metrics, algorithm))
    return {
        "log_Z": log_Z,
        "true_log_Z": spec.log_Z,
        "log_Z_error": log_Z - spec.log_Z,
        "ess": ess,
        "ess_fraction": ess / num_particles,
        "nested_elbo": elbo,
        "nested_kl": spec.log_Z - elbo,
        "num_particles": float(num_particles),
    }


def level_diagnostics(
    params,
    key: jax.Array,
    num_particles: int,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
) -> list[dict[str, float]]:
    """Each level's ``log Z_k`` estimate and ESS, from one run's history.

    ``log_Z`` after level ``k`` estimates ``log integral gamma_k``;
    ``true_log_Z`` is its quadrature (:func:`quadrature_log_normalizer`).

    Returns:
      One dict per level ``k = 1..K``: ``level``, ``beta``, ``log_Z``,
      ``true_log_Z``, ``ess_fraction`` (that level's weights, or the
      path's for ``nvi_avo``).
    """
    spec = get_target(target)
    num_transitions = _num_transitions(params)
    betas = np.asarray(annealing_schedule(num_transitions, spec.schedule_power))
    _, _, metrics = sample(params, key, num_particles, target, algorithm)
    history = metrics["history"]
    log_Z, ess = np.asarray(history.log_Z), np.asarray(history.ess)
    rows = []
    for level in range(1, num_transitions + 1):
        beta = float(betas[level])
        truth = quadrature_log_normalizer(spec, beta)
        rows.append(
            {
                "level": float(level),
                "beta": beta,
                "log_Z": float(log_Z[level]),
                "true_log_Z": truth,
                "ess_fraction": float(ess[level]) / num_particles,
            }
        )
    return rows


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


class TrainingRun(NamedTuple):
    """What :func:`train_kernels` learnt and saw.

    Attributes:
      params: the trained kernel parameters.
      history: per training step, as numpy arrays: ``loss``, ``log_Z`` and
        ``ess`` of the training run's own particles.
      evaluations: periodic evaluations with more particles: arrays
        ``step``, ``log_Z``, ``ess_fraction``, ``nested_elbo``.
      train_seconds: wall-clock time of the training loop (compilation
        included).
      compile_seconds: time of the first step (compilation).
      skipped: steps skipped for a non-finite loss or gradient.
    """

    params: Any
    history: dict
    evaluations: dict
    train_seconds: float
    compile_seconds: float
    skipped: int


def train_kernels(
    key: jax.Array,
    *,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
    num_steps: int = TRAIN_STEPS,
    num_particles: int = TRAIN_PARTICLES,
    learning_rate: float = LEARNING_RATE,
    num_transitions: int = NUM_TRANSITIONS,
    hidden: int = HIDDEN,
    eval_particles: int = 10_000,
    num_evaluations: int = 20,
    local_gradients: bool = True,
    init: Any = None,
    progress: bool = True,
) -> TrainingRun:
    """Trains the forward and reverse kernels with Adam.

    The learning rate decays from ``learning_rate`` to a tenth of it along
    a cosine (optax ``cosine_decay_schedule``); the loop is
    :func:`combinators.util.train` (jit-compiled, progress bar).

    Args:
      key: PRNG key; split into initialisation, training and evaluation keys.
      target: ``"ring"`` or ``"funnel"``.
      algorithm: ``"nvi_rkl"`` or ``"nvi_avo"``.
      num_steps: optimisation steps.
      num_particles: particles per training step.
      learning_rate: Adam's initial learning rate.
      num_transitions: ``K``.
      hidden: the kernels' hidden width.
      eval_particles: particles of the periodic evaluations.
      num_evaluations: how many periodic evaluations (plus one before
        training), all with the same key; 0 for none.
      local_gradients: see :func:`make_program`.
      init: initial parameters (default: :func:`init_params`).
      progress: show a progress bar; if False, nothing is printed.

    Returns:
      A :class:`TrainingRun`.

    References:
      Zimmermann et al. (2021), https://arxiv.org/abs/2106.11302.
    """
    if num_steps < 1:
        raise ValueError(f"annealing: num_steps must be at least 1, got {num_steps}.")
    key_init, key_train, key_eval = jax.random.split(key, 3)
    params = (
        init_params(key_init, target, num_transitions, hidden) if init is None else init
    )
    schedule = optax.cosine_decay_schedule(
        learning_rate, num_steps, alpha=FINAL_LEARNING_RATE_FRACTION
    )
    evaluations: dict[str, list] = {
        "step": [],
        "log_Z": [],
        "ess_fraction": [],
        "nested_elbo": [],
    }

    def record(step, current, opt_state, metrics):
        del opt_state, metrics
        # The same key every time (common random numbers): the curve shows
        # changes in the kernels, not Monte Carlo noise.
        _, _, m = sample(current, key_eval, eval_particles, target, algorithm)
        evaluations["step"].append(step)
        evaluations["log_Z"].append(float(m["log_Z"]))
        evaluations["ess_fraction"].append(float(m["ess"]) / eval_particles)
        evaluations["nested_elbo"].append(float(nested_elbo(m, algorithm)))

    # train() prints step lines when its bar is off; progress=False is silent.
    silent = (
        contextlib.nullcontext()
        if progress
        else contextlib.redirect_stdout(io.StringIO())
    )
    tic = time.perf_counter()
    with silent:
        result = train(
            functools.partial(
                loss_fn,
                num_particles=num_particles,
                target=target,
                algorithm=algorithm,
                local_gradients=local_gradients,
            ),
            params,
            optax.adam(schedule),
            num_steps,
            seed=key_train,
            eval_fn=record if num_evaluations > 0 else None,
            log_every=max(num_steps // max(num_evaluations, 1), 1),
            progress=progress,
            return_result=True,
        )
    train_seconds = time.perf_counter() - tic
    history = {k: np.asarray(result.history[k]) for k in ("loss", "log_Z", "ess")}
    return TrainingRun(
        params=result.params,
        history=history,
        evaluations={k: np.asarray(v) for k, v in evaluations.items()},
        train_seconds=train_seconds,
        compile_seconds=float(result.history["compile_seconds"][0]),
        skipped=int(result.skipped),
    )


# ---------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(values)))
    return np.convolve(values, np.ones(width) / width, mode="valid")


def plot(
    path: str,
    target: str,
    initial: np.ndarray,
    final: np.ndarray,
    run: TrainingRun,
    num_particles: int,
) -> None:
    """Saves the four-panel figure.

    Panels: samples of ``pi_0``; the final particles resampled by weight;
    the log Z estimate during training; the ESS fraction during training.
    Uses matplotlib's object-oriented API with the Agg canvas.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = get_target(target)
    fig = Figure(figsize=(18, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    columns = (0, 1) if spec.dim == 2 else (1, 0)
    labels = ("x1", "x2") if spec.dim == 2 else ("x_1", "v")
    limit = 16.0 if spec.dim == 2 else 12.0
    if spec.dim == 2:
        axis = np.linspace(-limit, limit, 300)
        xx, yy = np.meshgrid(axis, axis)
        grid = jnp.asarray(np.stack([xx, yy], axis=-1), jnp.float32)
        density = np.exp(np.asarray(spec.log_density(grid)))
    for ax, points, title, color in [
        (axes[0], initial, "samples of the initial density $\\pi_0$", "C0"),
        (axes[1], final, "final particles (resampled by weight)", "C2"),
    ]:
        if spec.dim == 2:
            levels = density.max() * np.array([0.05, 0.3, 0.7])
            ax.contour(xx, yy, density, levels=levels, colors="0.5", linewidths=0.6)
        ax.scatter(
            points[:, columns[0]], points[:, columns[1]], s=1.5, alpha=0.3, color=color
        )
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.set_title(title)

    steps = np.arange(1, len(run.history["loss"]) + 1)
    width = max(len(steps) // 100, 1)
    smooth_steps = steps[width - 1 :]
    ev = run.evaluations
    axes[2].plot(
        smooth_steps,
        _smooth(run.history["log_Z"], width),
        lw=0.8,
        color="C1",
        label=f"training runs ({num_particles} particles, moving average)",
    )
    axes[2].plot(
        ev["step"], ev["log_Z"], "o-", ms=3, color="C3", label="evaluation runs"
    )
    axes[2].axhline(spec.log_Z, color="k", ls="--", lw=0.8, label="true log Z")
    axes[2].set_title("log Z estimate during training")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=8)
    axes[3].plot(
        smooth_steps,
        _smooth(run.history["ess"] / num_particles, width),
        lw=0.8,
        color="C1",
        label="training runs (moving average)",
    )
    axes[3].plot(
        ev["step"], ev["ess_fraction"], "o-", ms=3, color="C3", label="evaluation runs"
    )
    axes[3].set_ylim(0, 1.02)
    axes[3].set_title("ESS / N of the last level during training")
    axes[3].set_xlabel("step")
    axes[3].legend(fontsize=8)
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def run(
    *,
    steps: int = TRAIN_STEPS,
    particles: int = TRAIN_PARTICLES,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    eval_particles: int = EVAL_PARTICLES,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
) -> dict[str, float]:
    """Trains the kernels, evaluates with many particles, saves figure and metrics.

    Args:
      steps: optimisation steps.
      particles: particles per training step (36 in the NVI paper).
      seed: seeds the typed PRNG key.
      out: output directory; ``annealing_<target>.png`` and
        ``annealing_<target>_metrics.json`` are written there.
      progress: show a progress bar; if False, training prints nothing.
      eval_particles: particles of the final evaluation.
      target: ``"ring"`` or ``"funnel"``.
      algorithm: ``"nvi_rkl"`` or ``"nvi_avo"``.

    Returns:
      Final metrics as floats: ``log_Z``, ``true_log_Z``, ``log_Z_error``,
      ``ess_fraction`` and ``nested_kl`` (see :func:`evaluate`) with
      ``eval_particles`` particles, the same before training
      (``initial_*``), first and last training loss, and ``train_seconds``.

    References:
      Zimmermann et al. (2021), https://arxiv.org/abs/2106.11302.
    """
    if steps < 1:
        raise ValueError(f"annealing: steps must be at least 1, got {steps}.")
    if particles < 2:
        raise ValueError(f"annealing: particles must be at least 2, got {particles}.")
    spec = get_target(target)
    tic = time.perf_counter()
    key = jax.random.key(seed)
    key_init, key_train, key_before, key_after, key_show = jax.random.split(key, 5)
    init = init_params(key_init, target)
    before = evaluate(init, key_before, eval_particles, target, algorithm)
    training = train_kernels(
        key_train,
        target=target,
        algorithm=algorithm,
        num_steps=steps,
        num_particles=particles,
        init=init,
        progress=progress,
    )
    after = evaluate(training.params, key_after, eval_particles, target, algorithm)

    num_shown = 5_000
    initial = np.asarray(initial_distribution(spec).sample(key_show, (num_shown,)))
    final, _, _ = sample(
        training.params,
        key_show,
        eval_particles,
        target,
        algorithm,
        num_shown=num_shown,
    )
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, f"annealing_{target}.png")
    plot(png, target, initial, np.asarray(final), training, particles)

    losses = training.history["loss"]
    metrics = {
        "log_Z": after["log_Z"],
        "true_log_Z": after["true_log_Z"],
        "log_Z_error": after["log_Z_error"],
        "ess_fraction": after["ess_fraction"],
        "nested_kl": after["nested_kl"],
        "initial_log_Z": before["log_Z"],
        "initial_log_Z_error": before["log_Z_error"],
        "initial_ess_fraction": before["ess_fraction"],
        "first_train_loss": float(losses[0]),
        "last_train_loss": float(losses[-1]),
        "train_seconds": training.train_seconds,
        "skipped_steps": float(training.skipped),
    }
    elapsed = time.perf_counter() - tic
    record: dict[str, Any] = {
        "program": "annealing",
        "target": target,
        "algorithm": algorithm,
        "steps": steps,
        "particles": particles,
        "eval_particles": eval_particles,
        "num_transitions": NUM_TRANSITIONS,
        "seed": seed,
        "elapsed_seconds": elapsed,
        "compile_seconds": training.compile_seconds,
        "backend": jax.default_backend(),
        "metrics": metrics,
    }
    path = os.path.join(out, f"annealing_{target}_metrics.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)

    finite = all(math.isfinite(v) for v in metrics.values())
    print(
        f"annealing ({target}, {algorithm}): {steps} steps, "
        f"{particles} particles, seed {seed}"
    )
    print(
        f"  before training: log Z {before['log_Z']:.4f} (true {spec.log_Z:.4f}), "
        f"ESS {100 * before['ess_fraction']:.1f}% of {eval_particles}"
    )
    print(
        f"  after training:  log Z {after['log_Z']:.4f} "
        f"(error {after['log_Z_error']:+.4f}), "
        f"ESS {100 * after['ess_fraction']:.1f}% of {eval_particles}"
    )
    print(f"  training:        {training.train_seconds:.1f} s; elapsed {elapsed:.1f} s")
    print(f"  wrote {png} and {path}" + ("" if finite else "  (non-finite metrics!)"))
    return metrics


if __name__ == "__main__":
    run()
