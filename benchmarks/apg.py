"""The APG training step for 2-D Gaussian mixtures.

Model, networks and sizes are those of :mod:`programs.gmm_apg` (Wu,
Zimmermann, Sennesh, Le & van de Meent, 2020, "Amortized Population Gibbs
Samplers with Neural Sufficient Statistics",
https://arxiv.org/abs/1911.01382): ``K = 3`` clusters, 60 points per
instance, a minibatch of 20 instances, 10 particles per instance, 5 sweeps
of the two learned Gibbs kernels ``q(mu | x, c)`` and ``q(c | x, mu)``
after the learned initial proposal, Adam with learning rate 3e-3. The
loss is the RWS loss of the initial proposal plus the APG loss of every
kernel in every sweep, divided by the number of instances; resampling is
systematic and per instance. Every implementation gets the same
minibatches (drawn once) and the same initial parameters.

* ``hand``: plain JAX with the same Flax networks: the conjugate-form
  kernel ``q(mu | x, c)`` is evaluated once per block update and serves as
  forward and reverse kernel (a Gibbs kernel is its own reverse);
* ``ours``: :func:`programs.gmm_apg.make_program` (``algo.apgs``) divided
  by the batch size, in the library's training step;
* ``coix``: ``coix.algo.apgs`` with the same numpyro target and kernels
  (:func:`programs.gmm_apg.target`, ``kernel_mu``, ``kernel_c``), in Coix's
  ``util.train`` step.

Quality: one shared evaluator (the hand sampler, 20 particles, 5 sweeps,
200 test instances, a fixed key) gives the weighted mean log joint and
clustering accuracy after all steps; and the mean training loss of the
last tenth of the steps.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import Case, Schedule, floats, installed, measure
from benchmarks.steps import MethodBinder, coix_style_step, library_step, plain_step
from programs import gmm_apg as gm

__all__ = ["run"]

PARTICLES = 10
SWEEPS = gm.NUM_SWEEPS  # 5
BATCH = gm.BATCH  # 20
NUM_TEST = 200
EVAL_PARTICLES = 20
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------
# Hand-written APG
# ---------------------------------------------------------------------------


def _normal_log_prob(x, loc, scale, axes):
    z = (x - loc) / scale
    return jnp.sum(-0.5 * z**2 - jnp.log(scale) - _HALF_LOG_2PI, axis=axes)


def _log_joint(x, mu, c):
    """``log p(x, mu, c)`` per particle and instance: shape ``(P, B)``."""
    loc = jnp.take_along_axis(mu, c[..., None], axis=-2)
    return (
        _normal_log_prob(mu, 0.0, gm.PRIOR_SCALE, (-2, -1))
        - c.shape[-1] * math.log(gm.NUM_CLUSTERS)
        + _normal_log_prob(x, loc, gm.NOISE_SCALE, (-2, -1))
    )


def _categorical_log_prob(logits, c):
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.take_along_axis(log_probs, c[..., None], axis=-1)[..., 0], -1)


def _systematic_columns(key, log_weights):
    """Systematic ancestors for each column of ``(P, B)`` log weights."""
    p, b = log_weights.shape
    cumulative = jnp.cumsum(jax.nn.softmax(log_weights, axis=0), axis=0)
    positions = (jnp.arange(p)[:, None] + jax.random.uniform(key, (1, b))) / p
    ancestors = jax.vmap(
        lambda cw, pos: jnp.searchsorted(cw, pos, side="right"), in_axes=1, out_axes=1
    )(cumulative, positions)
    return jnp.minimum(ancestors, p - 1)


def _gather(a, ancestors):
    index = ancestors.reshape(ancestors.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, index, axis=0)


def hand_apg(params, key, x, num_particles: int, num_sweeps: int):
    """APG with the learned kernels; returns ``(loss, (mu, c, log_weight))``.

    ``loss`` is the summed RWS and APG losses (not divided by the batch).
    """
    net = MethodBinder(gm.GMMKernels(), params)
    stop = jax.lax.stop_gradient
    key_mu, key_c, key_sweeps = jax.random.split(key, 3)

    # The initial proposal q(mu | x) q(c | x, mu), trained by RWS.
    loc, scale = net.initial_means(x)
    mu = stop(loc + scale * jax.random.normal(key_mu, (num_particles,) + loc.shape))
    log_q = _normal_log_prob(mu, loc, scale, (-2, -1))
    logits = net.assignments(x, mu)
    c = jax.random.categorical(key_c, stop(logits))
    log_q = log_q + _categorical_log_prob(logits, c)
    log_p = _log_joint(x, mu, c)
    log_weight = log_p - stop(log_q)
    w = stop(jax.nn.softmax(log_weight, axis=0))
    loss = -jnp.sum(w * (log_p + log_q))

    def block(carry, key, update):
        mu, c, log_p, log_weight, loss = carry
        key_resample, key_move = jax.random.split(key)
        log_z = jax.scipy.special.logsumexp(log_weight, axis=0) - math.log(
            num_particles
        )
        ancestors = _systematic_columns(key_resample, log_weight)
        mu, c, log_p = (_gather(a, ancestors) for a in (mu, c, log_p))
        mu_new, c_new, log_forward, log_reverse = update(key_move, mu, c)
        log_p_new = _log_joint(x, mu_new, c_new)
        incremental = log_p_new + stop(log_reverse) - log_p - stop(log_forward)
        w = stop(jax.nn.softmax(incremental, axis=0))
        loss = loss - jnp.sum(w * (log_p_new + log_forward))
        return (mu_new, c_new, log_p_new, log_z + incremental, loss)

    def update_mu(key, mu, c):
        loc, scale = net.means(x, c)
        mu_new = stop(loc + scale * jax.random.normal(key, loc.shape))
        forward = _normal_log_prob(mu_new, loc, scale, (-2, -1))
        return mu_new, c, forward, _normal_log_prob(mu, loc, scale, (-2, -1))

    def update_c(key, mu, c):
        logits = net.assignments(x, mu)
        c_new = jax.random.categorical(key, stop(logits))
        return (
            mu,
            c_new,
            _categorical_log_prob(logits, c_new),
            _categorical_log_prob(logits, c),
        )

    def sweep(carry, key):
        key_mu, key_c = jax.random.split(key)
        carry = block(carry, key_mu, update_mu)
        return block(carry, key_c, update_c), None

    carry = (mu, c, log_p, log_weight, loss)
    if num_sweeps:
        carry, _ = jax.lax.scan(sweep, carry, jax.random.split(key_sweeps, num_sweeps))
    mu, c, _, log_weight, loss = carry
    return loss, (mu, c, log_weight)


def hand_loss(params, key, x):
    """The APG training loss per instance (plain JAX)."""
    loss, _ = hand_apg(params, key, x, PARTICLES, SWEEPS)
    loss = loss / x.shape[0]
    return loss, loss


# ---------------------------------------------------------------------------
# The library and Coix
# ---------------------------------------------------------------------------


def ours_loss(params, key, x):
    """:func:`programs.gmm_apg.make_program` (``algo.apgs``), per instance."""
    import combinators

    program = gm.make_program(params, PARTICLES, SWEEPS)
    _, _, metrics = combinators.traced_evaluate(program, seed=key)(x)
    metrics = metrics.replace(loss=metrics.loss / x.shape[0])
    return metrics["loss"], metrics


def coix_loss(params, key, x):
    """``coix.algo.apgs`` with the numpyro programs of :mod:`programs.gmm_apg`."""
    import coix

    network = MethodBinder(gm.GMMKernels(), params)
    kernels = [
        functools.partial(gm.kernel_mu, network, PARTICLES),
        functools.partial(gm.kernel_c, network, PARTICLES),
    ]
    program = coix.algo.apgs(
        functools.partial(gm.target, PARTICLES), kernels, num_sweeps=SWEEPS
    )
    _, _, metrics = coix.traced_evaluate(program, seed=key)(x)
    metrics = dict(metrics)
    metrics["loss"] = metrics["loss"] / x.shape[0]
    return metrics["loss"], metrics


# ---------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------


def _evaluator():
    test = gm.simulate(jax.random.key(11), NUM_TEST)
    key = jax.random.key(12)

    @jax.jit
    def evaluate(params):
        _, (mu, c, log_weight) = hand_apg(params, key, test.x, EVAL_PARTICLES, SWEEPS)
        w = jax.nn.softmax(log_weight, axis=0)
        accuracy = gm.clustering_accuracy(c, test.c)
        return (
            jnp.mean(jnp.sum(w * _log_joint(test.x, mu, c), axis=0)),
            jnp.mean(jnp.sum(w * accuracy, axis=0)),
        )

    return evaluate


def _quality(evaluate, loss_of):
    def quality(state, auxes):
        log_joint, accuracy = evaluate(state[0])
        losses = [loss_of(a) for a in auxes]
        tail = losses[-max(len(losses) // 10, 1) :]
        return {
            "test_log_joint": float(log_joint),
            "test_accuracy": float(accuracy),
            "train_loss_last_10pct": float(np.mean(floats(tail))),
        }

    return quality


DESCRIPTION = (
    f"APG (programs/gmm_apg/), K = 3, 60 points, {BATCH} instances x "
    f"{PARTICLES} particles, {SWEEPS} sweeps, Adam 3e-3; quality: weighted log "
    f"joint and accuracy on {NUM_TEST} test instances ({EVAL_PARTICLES} "
    "particles) after all steps (one shared evaluator)"
)


def run(quick: bool, log=print, key=None) -> dict:
    """Times the APG training step of every implementation."""
    schedule = (
        Schedule(warmup=2, rounds=2, steps_per_round=4)
        if quick
        else Schedule(warmup=3, rounds=4, steps_per_round=10)
    )
    train = gm.simulate(jax.random.key(10), 2_000)
    rng = np.random.default_rng(0)
    index = np.stack(
        [
            rng.choice(train.x.shape[0], BATCH, replace=False)
            for _ in range(schedule.total_steps)
        ]
    )
    batches = list(jnp.asarray(np.asarray(train.x)[index]))
    params = gm.init_params(jax.random.key(0))
    optimizer = optax.adam(gm.LEARNING_RATE)
    state = (params, optimizer.init(params))
    inputs = lambda i: (batches[i],)  # noqa: E731
    evaluate = _evaluator()
    sources = ("/combinators/", "/programs/gmm_apg/", "/benchmarks/")
    cases = [
        Case(
            "hand",
            plain_step(hand_loss, optimizer),
            state,
            inputs,
            quality=_quality(evaluate, lambda aux: aux),
            sources=sources,
        ),
        Case(
            "ours",
            library_step(ours_loss, optimizer),
            state,
            inputs,
            quality=_quality(evaluate, lambda aux: aux["loss"]),
            sources=sources,
        ),
    ]
    if installed("coix"):
        cases.append(
            Case(
                "coix",
                coix_style_step(coix_loss, optimizer),
                state,
                inputs,
                quality=_quality(evaluate, lambda aux: aux["loss"]),
                sources=sources + ("/coix/",),
            )
        )
    results = measure(cases, schedule, jax.random.key(6) if key is None else key, log)
    return {
        "title": "APG training step (2-D Gaussian mixtures)",
        "description": DESCRIPTION,
        "schedule": schedule.__dict__,
        "groups": [{"label": "", "results": results}],
    }
