"""The deep Markov model of :mod:`programs.dmm.model` on noisy rings.

The data, "noisy rings", are points moving around a circle of radius about
one with a per-sequence angular velocity (either direction), starting
phase and radius, observed with Gaussian noise of standard deviation
``OBS_NOISE``. They are drawn with ``jax.random``; nothing is downloaded.
A model that knew every ring exactly would score ``-log(2 pi e
OBS_NOISE^2)`` nats per time step on average (the entropy of the noise);
:func:`run` reports that as a reference. Run it with ``python -m programs
dmm``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import logsumexp

import combinators
from combinators.train import train
from programs._report import Report, Timer
from programs.dmm.figure import plot
from programs.dmm.model import bind, init_params, loss_fn, make_smc

DESCRIPTION = (
    "Deep Markov model (Krishnan et al. 2017) on noisy rings: vsmc (FIVO/AESMC) "
    "with a learned proposal, O(N) per step, batch of sequences"
)

OBS_NOISE = 0.1
NUM_TRAIN = 2048
NUM_TEST = 256


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


DEFAULT_CONFIG = Config()
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


def load_data(
    seed: int, config: Config = DEFAULT_CONFIG
) -> tuple[jax.Array, jax.Array]:
    """Training and held-out sequences, independent draws.

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
# Evaluation
# ---------------------------------------------------------------------------


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
      params: the DMM parameters.
      key: the SMC key.
      xs: sequences, shape ``(B, T, 2)`` (all filtered as one batch).
      config: sizes.
      num_particles: ``N``.

    Returns:
      ``(summary, detail)``: ``summary`` holds floats (``log_Z_per_step``
      averaged over sequences, the standard error of that average, and
      the mean ``ess``); ``detail`` holds arrays (per-step ``log Z``
      increments averaged over sequences, records).
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
    """
    if steps < 1:
        raise ValueError(f"dmm: steps must be at least 1, got {steps}.")
    if particles < 1:
        raise ValueError(f"dmm: particles must be at least 1, got {particles}.")
    if config is None:
        smoke = os.environ.get("COMBINATORS_SMOKE") == "1"
        config = SMOKE_CONFIG if smoke else Config()
    report = Report(out, "dmm")
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
    with Timer() as train_clock:
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
    test_after, detail_after = evaluate(
        result.params, key_test, x_test, config, test_particles
    )
    train_after, _ = evaluate(
        result.params, key_train_eval, x_train_eval, config, test_particles
    )
    generated = generate(bind(result.params, config), key_generate, 4, config.length)
    losses = np.asarray(result.history["loss"])
    head = max(1, len(losses) // 20)
    oracle = oracle_log_lik_per_step()
    figure = plot(
        x_test,
        detail_after,
        generated,
        x_train,
        -losses,
        detail_before["log_Z_increments"],
        oracle,
    )
    report.save_figure(figure)

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
        "oracle_log_lik_per_step": oracle,
    }
    report.write_metrics(
        metrics,
        settings={
            "steps": steps,
            "particles": particles,
            "test_particles": test_particles,
            "seed": seed,
            "config": dataclasses.asdict(config),
        },
        timings={
            "train_seconds": train_clock.seconds,
            "compile_seconds": float(result.history["compile_seconds"][0]),
        },
        extras={
            "test_log_Z_increments_before": [
                float(v) for v in detail_before["log_Z_increments"]
            ],
            "test_log_Z_increments_after": [
                float(v) for v in detail_after["log_Z_increments"]
            ],
        },
    )
    report.summary(
        f"dmm: {steps} steps, {particles} particles ({test_particles} at test), "
        f"seed {seed}",
        [
            (
                "test log Z-hat per step",
                f"{test_before['log_Z_per_step']:.4f} -> "
                f"{test_after['log_Z_per_step']:.4f} "
                f"(+- {test_after['log_Z_per_step_se']:.4f})",
            ),
            (
                "train log Z-hat per step",
                f"{train_before['log_Z_per_step']:.4f} -> "
                f"{train_after['log_Z_per_step']:.4f}",
            ),
            ("noise entropy bound", f"{oracle:.4f}"),
            ("test ESS", f"{test_after['ess']:.1f} / {test_particles}"),
        ],
        metrics,
    )
    return metrics
