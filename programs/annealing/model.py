"""Annealed importance sampling with learned kernels, trained by nested VI.

Annealed importance sampling (Neal, 2001, "Annealed Importance Sampling",
Statistics and Computing 11) moves particles from an easy normalised
density ``pi_0`` to a hard target ``gamma_K`` through the geometric path
``gamma_k = pi_0^(1 - beta_k) gamma_K^beta_k`` (the problems are in
:mod:`programs.annealing.targets`). A learned Gaussian forward kernel
``f_k(x' | x)`` moves the particles from level ``k - 1`` to ``k``; a learned
reverse kernel ``r_k(x | x')`` scores the position left, and the weight is

    w_k = gamma_k(x') r_k(x | x') / (gamma_{k-1}(x) f_k(x' | x)).

The product of the levels' average weights estimates ``Z`` without bias
whatever the kernels; training reduces its variance, level by level, with
nested variational inference (``algo.nvi_rkl``: resample, move, reweight;
Zimmermann, Wu, Esmaeili & van de Meent, 2021, "Nested Variational
Inference", https://arxiv.org/abs/2106.11302) or the annealed variational
objective (``algo.nvi_avo``, no resampling; Huang, Tan, Lacoste & Courville,
2018, https://arxiv.org/abs/1809.01818). Their ``propose(..., detach=True)``
hands each level particles without gradient, so each level's loss trains
that level's kernels only.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import combinators
from combinators import algo
from programs.annealing.targets import (
    Target,
    annealing_schedule,
    get_target,
    initial_distribution,
    initial_log_density,
)

ALGORITHMS = ("nvi_rkl", "nvi_avo")
NUM_TRANSITIONS = 12  # K: densities gamma_0 .. gamma_K, K forward kernels
HIDDEN = 64
KERNEL_INIT_SCALE = 0.25


def annealed_target(target: Target, beta, num_particles: int):
    """The program of ``gamma_beta(x) = pi_0(x)^(1 - beta) gamma_K(x)^beta``.

    Written as ``x ~ pi_0`` (normalised, so the program can also *sample*
    level 0) times the factor ``(gamma_K(x) / pi_0(x))^beta``. Every level
    has the same two sites, so the levels run in one compiled loop; ``beta``
    may be traced.

    Returns:
      A program of no arguments returning ``(x,)``.
    """

    def program():
        x = numpyro.sample("x", initial_distribution(target))
        log_ratio = target.log_density(x) - initial_log_density(target, x)
        # At beta = 0 the factor is 1 even where gamma_K underflows to 0.
        numpyro.factor("tempering", jnp.where(beta == 0, 0.0, beta * log_ratio))
        return (x,)

    return numpyro.plate("particles", num_particles, dim=-1)(program)


def gaussian_kernel(target: Target, kernel_params, num_particles: int):
    """The kernel program ``x' ~ N(x + shift(x), diag scale(x)^2)``.

    Used both as forward kernel (it re-samples ``x``) and as reverse kernel
    (inside ``extend`` it scores the previous ``x`` given the new one).

    Returns:
      A program ``(x,) -> (x',)`` for one level's :class:`GaussianKernel`
      parameters.
    """
    hidden = kernel_params["params"]["Dense_0"]["kernel"].shape[-1]
    module = GaussianKernel(
        dim=target.dim, hidden=hidden, input_scale=target.init_scale
    )

    def program(x):
        loc, scale = module.apply(kernel_params, x)
        return (numpyro.sample("x", dist.Normal(loc, scale).to_event(1)),)

    return numpyro.plate("particles", num_particles, dim=-1)(program)


class GaussianKernel(nn.Module):
    """A Gaussian kernel ``N(x + shift(x), diag scale(x)^2)`` from an MLP.

    ``Dense(hidden) - relu - Dense(hidden) - relu`` on ``x / input_scale``,
    then two zero-initialised linear heads: the mean shift, and the raw
    scale, whose bias starts at ``softplus^-1(init_scale)``. Untrained, the
    kernel is a random walk ``N(x, init_scale^2 I)``.
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


def init_params(
    key: jax.Array,
    target: str = "ring",
    num_transitions: int = NUM_TRANSITIONS,
    hidden: int = HIDDEN,
    kernel_scale: float = KERNEL_INIT_SCALE,
) -> dict:
    """Parameters of the ``K`` forward and ``K`` reverse kernels.

    Every level has its own network; the levels' parameters are stacked on
    a leading axis of length ``K``, so the loop indexes them by level.

    Returns:
      ``{"forward": params, "reverse": params}`` with leaves ``(K, ...)``.
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


def _record(out, trace, metrics) -> dict:
    del out, trace
    return {"mean_log_weight": jnp.mean(metrics.log_weight)}


def nested_annealing(
    targets: Callable,
    forwards: Callable,
    reverses: Callable,
    *,
    num_targets: int,
    algorithm: str = "nvi_rkl",
    history: bool = True,
) -> Callable:
    """``algo.nvi_rkl`` / ``algo.nvi_avo`` over ``num_targets = K + 1`` levels.

    ``targets(k)``, ``forwards(k)`` and ``reverses(k)`` give level ``k``'s
    programs. With ``history`` the levels run under ``combinators.scan`` and
    ``metrics["history"]`` holds every level's ESS, ``log_Z`` and, in
    ``records["mean_log_weight"]``, the mean log weight (for ``nested_elbo``).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"annealing: algorithm must be one of {ALGORITHMS}, got {algorithm!r}."
        )
    make = algo.nvi_rkl if algorithm == "nvi_rkl" else algo.nvi_avo
    record = _record if history else None
    return make(targets, forwards, reverses, num_targets=num_targets, record=record)


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
      algorithm: ``"nvi_rkl"`` or ``"nvi_avo"``.
      local_gradients: record the per-level history (``False``: a plain
        loop without history). The name is kept for existing callers: the
        gradients are local either way.

    Returns:
      A program of no arguments whose trace holds the particles ``x`` and
      whose metrics hold ``log_weight``, ``log_Z``, ``ess``, ``loss`` and
      (with ``local_gradients``) the per-level ``history``.
    """
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

    return nested_annealing(
        targets,
        kernels("forward"),
        kernels("reverse"),
        num_targets=num_transitions + 1,
        algorithm=algorithm,
        history=local_gradients,
    )


def loss_fn(
    params,
    key: jax.Array,
    *,
    num_particles: int,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
    local_gradients: bool = True,
):
    """The summed per-level loss of one run: ``(loss, metrics)`` for ``train``."""
    program = make_program(
        params,
        num_particles,
        target,
        algorithm=algorithm,
        local_gradients=local_gradients,
    )
    _, _, metrics = combinators.traced_evaluate(program, seed=key)()
    return metrics["loss"], metrics
