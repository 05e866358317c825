"""The nested-VI annealing training step on the 8-mode ring (36 particles).

The problem, schedule and kernels are those of :mod:`programs.annealing`:
the ring of eight unit-mass Gaussians (``Z = 8``), ``pi_0 = N(0, 5^2 I)``,
the geometric path with ``beta_k = (k / 12)^3`` (``K = 12`` transitions),
and one learned forward and one learned reverse Gaussian kernel per level
(``GaussianKernel``: two hidden layers of 64). A training step runs the
nested sampler with 36 particles and takes one Adam step (learning rate
1e-3) on the summed reverse-KL nested-VI loss (Zimmermann, Wu, Esmaeili &
van de Meent, 2021, https://arxiv.org/abs/2106.11302): every level
resamples (systematic), moves the particles by the forward kernel (with the
sticking-the-landing gradient), weights by ``gamma_{k+1}(x') r_k(x | x') /
(gamma_k(x) f_k(x' | x))`` and adds its ``rkl_loss``; each level's
objective is local (its incoming particles carry no gradient), as in the
paper and in Coix's ``nvi_rkl`` (whose ``propose(..., detach=True)``
detaches the particles it passes on).

* ``hand``: plain JAX, one ``lax.scan`` over the levels; the incoming
  particles' target log densities are carried, not recomputed;
* ``ours``: :func:`programs.annealing.loss_fn` (``local_gradients=True``:
  ``combinators.scan`` over the levels with per-level history, particles
  detached between levels) in the library's training step;
* ``ours (plain step)``: the same loss in :func:`steps.plain_step`, to
  separate the program from the training step's extras;
* ``ours (algo.nvi_rkl)``: ``combinators.algo.nvi_rkl`` with the same
  targets and kernels (``fori_loop``, no history); ``propose(...,
  detach=True)`` now detaches the particles it passes on, so its loss and
  gradient equal ``ours``'s for the same key;
* ``coix``: ``coix.algo.nvi_rkl`` with the same numpyro targets and
  kernels, in Coix's ``util.train`` step.

Quality: after all steps, one shared evaluator (the hand-written sampler,
10,000 particles, a fixed key) gives ``log Z - log 8`` and the ESS of the
final weights as a fraction of the particles; and the mean training loss
of the last tenth of the steps.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import Case, Schedule, floats, installed, measure
from benchmarks.steps import coix_style_step, library_step, plain_step
from programs import annealing as an

__all__ = ["run"]

PARTICLES = an.TRAIN_PARTICLES  # 36
EVAL_PARTICLES = 10_000
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _normal_log_prob(x, loc, scale):
    z = (x - loc) / scale
    return jnp.sum(-0.5 * z**2 - jnp.log(scale) - _HALF_LOG_2PI, axis=-1)


# ---------------------------------------------------------------------------
# Hand-written nested VI (reverse KL)
# ---------------------------------------------------------------------------


def _systematic(key, log_weights):
    n = log_weights.shape[0]
    cumulative = jnp.cumsum(jax.nn.softmax(log_weights))
    positions = (jnp.arange(n) + jax.random.uniform(key)) / n
    return jnp.minimum(jnp.searchsorted(cumulative, positions, side="right"), n - 1)


def hand_nested_rkl(params, key, num_particles: int):
    """The nested sampler and its summed rkl loss, in plain JAX.

    Returns:
      ``(loss, (log_Z, ess, x, log_weight))``.
    """
    spec = an.get_target("ring")
    num_transitions = jax.tree_util.tree_leaves(params["forward"])[0].shape[0]
    betas = an.annealing_schedule(num_transitions, spec.schedule_power)
    module = an.GaussianKernel(dim=spec.dim, input_scale=spec.init_scale)
    scale0 = spec.init_scale

    def log_pi0(x):
        return _normal_log_prob(x, 0.0, scale0)

    def log_gamma(x, beta):
        log_init = log_pi0(x)
        ratio = an.ring_log_density(x) - log_init
        return log_init + jnp.where(beta == 0, 0.0, beta * ratio)

    key_init, key_levels = jax.random.split(key)
    x = scale0 * jax.random.normal(key_init, (num_particles, spec.dim))
    carry = (x, log_gamma(x, betas[0]), jnp.zeros(num_particles), jnp.zeros(()))
    level_keys = jax.random.split(key_levels, num_transitions)
    inv_n = 1.0 / num_particles

    def level(carry, inputs):
        x, log_target, log_weight, loss = carry
        k, level_key, forward, reverse = inputs
        key_resample, key_move = jax.random.split(level_key)
        log_z = jax.scipy.special.logsumexp(log_weight) - math.log(num_particles)
        ancestors = _systematic(key_resample, log_weight)
        x, proposal_lp = x[ancestors], log_target[ancestors]
        loc, scale = module.apply(forward, x)
        x_new = loc + scale * jax.random.normal(key_move, x.shape)
        log_forward = _normal_log_prob(  # sticking the landing
            x_new, jax.lax.stop_gradient(loc), jax.lax.stop_gradient(scale)
        )
        loc_r, scale_r = module.apply(reverse, x_new)
        log_reverse = _normal_log_prob(x, loc_r, scale_r)
        target_lp = log_gamma(x_new, betas[k + 1])
        incremental = target_lp + log_reverse - proposal_lp - log_forward
        new_log_weight = log_z + incremental
        v = jax.lax.stop_gradient(incremental)
        surrogate = incremental + (1.0 + v - inv_n * jnp.sum(v)) * proposal_lp
        w = jax.lax.stop_gradient(jax.nn.softmax(new_log_weight))
        loss = loss - jnp.sum(inv_n * surrogate - w * jax.lax.stop_gradient(target_lp))
        stop = jax.lax.stop_gradient
        return (stop(x_new), stop(target_lp), new_log_weight, loss), None

    (x, _, log_weight, loss), _ = jax.lax.scan(
        level,
        carry,
        (jnp.arange(num_transitions), level_keys, params["forward"], params["reverse"]),
    )
    log_Z = jax.scipy.special.logsumexp(log_weight) - math.log(num_particles)
    ess = 1.0 / jnp.sum(jax.nn.softmax(log_weight) ** 2)
    return loss, (log_Z, ess, x, log_weight)


def hand_loss(params, key):
    """The summed rkl loss of one run with 36 particles (plain JAX)."""
    loss, (log_Z, ess, _, _) = hand_nested_rkl(params, key, PARTICLES)
    return loss, (loss, log_Z, ess)


# ---------------------------------------------------------------------------
# The library and Coix
# ---------------------------------------------------------------------------


def ours_loss(params, key):
    """:func:`programs.annealing.loss_fn` (local gradients, scan with history)."""
    return an.loss_fn(params, key, num_particles=PARTICLES, target="ring")


def ours_algo_loss(params, key):
    """``combinators.algo.nvi_rkl`` with the ring's targets and kernels."""
    return an.loss_fn(
        params, key, num_particles=PARTICLES, target="ring", local_gradients=False
    )


def coix_program(params, num_particles: int):
    """``coix.algo.nvi_rkl`` with the numpyro programs of :mod:`programs.annealing`."""
    import coix

    spec = an.get_target("ring")
    num_transitions = jax.tree_util.tree_leaves(params["forward"])[0].shape[0]
    betas = an.annealing_schedule(num_transitions, spec.schedule_power)

    def targets(k):
        return an.annealed_target(spec, betas[k], num_particles)

    def kernels(which):
        def kernel(k):
            level = jax.tree_util.tree_map(lambda a: a[k], params[which])
            return an.gaussian_kernel(spec, level, num_particles)

        return kernel

    return coix.algo.nvi_rkl(
        targets, kernels("forward"), kernels("reverse"), num_targets=num_transitions + 1
    )


def coix_loss(params, key):
    """The summed rkl loss of Coix's ``nvi_rkl`` (36 particles)."""
    import coix

    program = coix_program(params, PARTICLES)
    _, _, metrics = coix.traced_evaluate(program, seed=key)()
    return metrics["loss"], metrics


# ---------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------


def _quality(evaluate, params_of, loss_of):
    key_eval = jax.random.key(7)

    def quality(state, auxes):
        _, (log_Z, ess, _, _) = evaluate(params_of(state), key_eval)
        losses = [loss_of(a) for a in auxes]
        tail = losses[-max(len(losses) // 10, 1) :]
        return {
            "log_Z_error": float(log_Z) - math.log(an.RING_MODES),
            "ess_fraction": float(ess) / EVAL_PARTICLES,
            "train_loss_last_10pct": float(np.mean(floats(tail))),
        }

    return quality


DESCRIPTION = (
    "nested VI (reverse KL) on the 8-mode ring, K = 12 levels, 36 particles, "
    "learned forward/reverse kernels (programs/annealing.py), Adam 1e-3; "
    f"quality: log Z - log 8 and ESS/N with {EVAL_PARTICLES:,} particles after "
    "all steps (one shared evaluator)"
)


def run(quick: bool, log=print, key=None) -> dict:
    """Times the annealing training step of every implementation."""
    schedule = (
        Schedule(warmup=5, rounds=3, steps_per_round=20)
        if quick
        else Schedule(warmup=20, rounds=10, steps_per_round=50)
    )
    params = an.init_params(jax.random.key(0), "ring")
    optimizer = optax.adam(an.LEARNING_RATE)
    state = (params, optimizer.init(params))
    no_inputs = lambda i: ()  # noqa: E731
    first = lambda s: s[0]  # noqa: E731
    sources = ("/combinators/", "/programs/annealing.py", "/benchmarks/")
    # One evaluator (compiled once) for every case.
    evaluate = jax.jit(functools.partial(hand_nested_rkl, num_particles=EVAL_PARTICLES))
    cases = [
        Case(
            "hand",
            plain_step(hand_loss, optimizer),
            state,
            no_inputs,
            quality=_quality(evaluate, first, lambda aux: aux),
            sources=sources,
        ),
        Case(
            "ours",
            library_step(ours_loss, optimizer),
            state,
            no_inputs,
            quality=_quality(evaluate, first, lambda aux: aux["loss"]),
            sources=sources,
            note="programs.annealing.loss_fn (scan + history, local gradients)",
        ),
        Case(
            "ours (plain step)",
            plain_step(ours_loss, optimizer),
            state,
            no_inputs,
            quality=_quality(evaluate, first, lambda aux: aux),
            sources=sources,
            note="the same program in a plain value_and_grad + Adam step",
        ),
        Case(
            "ours (algo.nvi_rkl)",
            library_step(ours_algo_loss, optimizer),
            state,
            no_inputs,
            quality=_quality(evaluate, first, lambda aux: aux["loss"]),
            sources=sources,
            note="combinators.algo.nvi_rkl (fori_loop, no history)",
        ),
    ]
    if installed("coix"):
        cases.append(
            Case(
                "coix",
                coix_style_step(coix_loss, optimizer),
                state,
                no_inputs,
                quality=_quality(evaluate, first, lambda aux: aux["loss"]),
                sources=sources + ("/coix/",),
            )
        )
    results = measure(cases, schedule, jax.random.key(4) if key is None else key, log)
    return {
        "title": "Nested-VI annealing step (8-mode ring, 36 particles)",
        "description": DESCRIPTION,
        "schedule": schedule.__dict__,
        "groups": [{"label": "", "results": results}],
    }
