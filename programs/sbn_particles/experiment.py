"""VIMCO vs NVIL vs RWS on the digits SBN as K grows: the sweep, the table, ``run``.

Reproduces the comparison of Mnih & Rezende (2016), "Variational Inference
for Monte Carlo Objectives", https://arxiv.org/abs/1602.06725 (their
generative-modelling experiment), on a small scale: every estimator of
:mod:`.model` trains the one-layer SBN of :mod:`programs.sbn` (16 binary
latents, 64 pixels) on binarised 8x8 digits for each K in
:data:`~.model.PARTICLE_GRID`, from ``num_seeds`` initialisations, and the
held-out log-likelihood is computed
*exactly*, by enumerating the ``2^16`` latent states (the paper estimates it
with importance sampling). The question: does VIMCO improve with K while
NVIL does not?

Within a replicate, every configuration starts from the same parameters and
sees the same minibatches (common random numbers), so differences between
configurations are paired by replicate. The replicates of one configuration
train together, vectorised with ``jax.vmap``, in one compiled ``lax.scan``.

Run it with ``python -m programs sbn_particles``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from combinators.train import make_step
from programs import data, sbn
from programs._replicates import scan_replicates
from programs._report import Report, axes, standard_error
from programs.sbn_particles.model import (
    ESTIMATORS,
    MIN_PARTICLES,
    PARTICLE_GRID,
    exact_bounds_replicates,
    make_estimator,
)

DESCRIPTION = (
    "Mnih & Rezende (2016): VIMCO vs multi-sample NVIL vs RWS on the digits SBN "
    "for K in 1..50, exact held-out log p(x), several seeds"
)

STEPS = 6000
NUM_SEEDS = 5
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
#: The training curve is recorded as this many segment means.
NUM_SEGMENTS = 10

#: Tiny sizes for tests (``run(**SMOKE_CONFIG, out=...)``).
SMOKE_CONFIG = {
    "steps": 10,
    "particles": 2,
    "num_seeds": 2,
    "particle_grid": (2,),
    "estimators": ("vimco",),
    "num_test": 16,
    "fast_compile": True,
}


class ConfigResult(NamedTuple):
    """One (estimator, K) configuration trained from ``num_seeds`` replicates.

    Attributes:
      estimator: the estimator's name.
      num_particles: K.
      log_likelihood: exact mean held-out ``log p(x)`` per image, ``(S,)``.
      elbo: exact mean held-out ELBO of ``q`` per image, ``(S,)``.
      train_elbo: the training ELBO estimate (mean ``log w`` over particles
        and minibatch) averaged over each training segment, ``(S, segments)``.
      train_bound: the same for the K-sample bound, ``(S, segments)``.
      skipped: steps skipped for a non-finite gradient, ``(S,)``.
      seconds: wall-clock seconds of compilation and training.
    """

    estimator: str
    num_particles: int
    log_likelihood: np.ndarray
    elbo: np.ndarray
    train_elbo: np.ndarray
    train_bound: np.ndarray
    skipped: np.ndarray
    seconds: float


def initial_params(network: sbn.SBN, key: jax.Array, pixel_mean, baseline: bool):
    """``programs.sbn.init_params`` (and NVIL's baseline) from one replicate key."""
    key_init, key_baseline = jax.random.split(key)
    params = sbn.init_params(network, key_init, pixel_mean)
    if baseline:
        params["baseline"] = sbn.init_baseline(key_baseline, network.num_pixels)
    return params


def train_replicates(
    network: sbn.SBN,
    estimator: sbn.Estimator,
    x_train,
    keys: jax.Array,
    steps: int,
    *,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    fast_compile: bool = False,
):
    """Trains one replicate per key (vmapped), Adam on random minibatches.

    Each key is split into an initialisation key and a training key; the
    training key draws the minibatch indices (without replacement within a
    batch) and the estimator's samples. A step whose gradient is not finite
    leaves the parameters unchanged (:func:`combinators.train.make_step`).

    Args:
      network: the SBN.
      estimator: from :func:`~programs.sbn_particles.model.make_estimator`.
      x_train: training images ``(N, D)``.
      keys: one key per replicate, shape ``(S,)``.
      steps: optimisation steps.
      batch_size: images per minibatch.
      learning_rate: Adam's step size.
      fast_compile: compile with XLA's backend optimisation level 0.

    Returns:
      ``(params, train_elbo, train_bound, skipped)``: the trained parameters
      (leading axis ``S``), the per-segment means ``(S, segments)`` of the
      minibatch ELBO and K-sample bound estimates, and the skipped steps
      ``(S,)``.
    """
    x_train = jnp.asarray(x_train)
    num_train = x_train.shape[0]
    pixel_mean = jnp.mean(x_train, axis=0)
    optimizer = optax.adam(learning_rate)
    step = make_step(estimator.loss_fn, optimizer)

    def init(key):
        params = initial_params(network, key, pixel_mean, estimator.baseline)
        return params, optimizer.init(params), dict(estimator.init_state)

    def body(carry, key):
        params, opt_state, state = carry
        key_batch, key_step = jax.random.split(key)
        index = jax.random.choice(key_batch, num_train, (batch_size,), replace=False)
        params, opt_state, metrics = step(
            params, opt_state, key_step, x_train[index], **state
        )
        state = {name: metrics[name] for name in state}
        history = {name: metrics[name] for name in ("elbo", "iwae", "skipped")}
        return (params, opt_state, state), history

    carry, means, totals = scan_replicates(
        init,
        body,
        keys,
        steps,
        num_segments=NUM_SEGMENTS,
        fast_compile=fast_compile,
    )
    return carry[0], means["elbo"], means["iwae"], totals["skipped"]


def train_configuration(
    network: sbn.SBN,
    name: str,
    num_particles: int,
    dataset: data.Dataset,
    keys: jax.Array,
    steps: int,
    *,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    num_test: int | None = None,
    fast_compile: bool = False,
) -> ConfigResult:
    """Trains ``name`` at K = ``num_particles`` from every key; exact test bounds.

    The bounds are averaged over the first ``num_test`` test images (all if
    ``None``).
    """
    tic = time.perf_counter()
    estimator = make_estimator(name, network, num_particles)
    params, train_elbo, train_bound, skipped = train_replicates(
        network,
        estimator,
        dataset.x_train,
        keys,
        steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        fast_compile=fast_compile,
    )
    jax.block_until_ready(params)
    seconds = time.perf_counter() - tic
    x_test = jnp.asarray(dataset.x_test[:num_test])
    log_likelihood, elbo = exact_bounds_replicates(network, params, x_test)
    return ConfigResult(
        name,
        num_particles,
        np.asarray(jnp.mean(log_likelihood, axis=1)),
        np.asarray(jnp.mean(elbo, axis=1)),
        np.asarray(train_elbo),
        np.asarray(train_bound),
        np.asarray(skipped),
        seconds,
    )


def configurations(
    estimators: Sequence[str], particle_grid: Sequence[int]
) -> list[tuple[str, int]]:
    """Every (estimator, K) with K at least the estimator's minimum."""
    return [
        (name, k)
        for name in estimators
        for k in particle_grid
        if k >= MIN_PARTICLES[name]
    ]


def sweep(
    dataset: data.Dataset,
    key: jax.Array,
    *,
    network: sbn.SBN | None = None,
    estimators: Sequence[str] = ESTIMATORS,
    particle_grid: Sequence[int] = PARTICLE_GRID,
    steps: int = STEPS,
    num_seeds: int = NUM_SEEDS,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    num_test: int | None = None,
    fast_compile: bool = False,
    progress: bool = False,
) -> list[ConfigResult]:
    """Trains every configuration of :func:`configurations` from ``num_seeds`` keys.

    All configurations share the replicate keys (split from ``key``), hence
    each replicate's initial ``p`` and ``q`` and its minibatches.
    ``network`` defaults to ``programs.sbn.make_sbn()``; pass the same object
    to :func:`initial_log_likelihood` so that the compiled evaluation is
    shared.

    Returns:
      One :class:`ConfigResult` per configuration.
    """
    network = sbn.make_sbn() if network is None else network
    keys = jax.random.split(key, num_seeds)
    results = []
    for name, k in configurations(estimators, particle_grid):
        result = train_configuration(
            network,
            name,
            k,
            dataset,
            keys,
            steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            num_test=num_test,
            fast_compile=fast_compile,
        )
        results.append(result)
        if progress:
            ll = result.log_likelihood
            print(
                f"  {name:5s} K={k:3d}: log p(x) = {ll.mean():8.3f} ± "
                f"{standard_error(ll):.3f}  ({result.seconds:5.1f} s)"
            )
    return results


def initial_log_likelihood(
    dataset: data.Dataset,
    key: jax.Array,
    num_seeds: int,
    num_test: int | None = None,
    network: sbn.SBN | None = None,
):
    """Exact held-out ``log p(x)`` of the replicates' initial parameters, ``(S,)``."""
    network = sbn.make_sbn() if network is None else network
    pixel_mean = jnp.mean(jnp.asarray(dataset.x_train), axis=0)
    x_test = jnp.asarray(dataset.x_test[:num_test])

    def init(replicate):
        key_init, _ = jax.random.split(replicate)
        return initial_params(network, key_init, pixel_mean, baseline=False)

    params = jax.jit(jax.vmap(init))(jax.random.split(key, num_seeds))
    log_likelihood, _ = exact_bounds_replicates(network, params, x_test)
    return np.asarray(jnp.mean(log_likelihood, axis=1))


def paired_difference(
    results: Sequence[ConfigResult], name: str, k_from: int, k_to: int
):
    """Mean and se over replicates of ``log p(x)`` at ``k_to`` minus at ``k_from``."""
    table = {(r.estimator, r.num_particles): r for r in results}
    diff = table[(name, k_to)].log_likelihood - table[(name, k_from)].log_likelihood
    return float(np.mean(diff)), standard_error(diff)


def slope_in_log_k(results: Sequence[ConfigResult], name: str) -> tuple[float, float]:
    """Least-squares slope of held-out ``log p(x)`` in ``log K`` (nats per e-fold of K).

    Fitted per replicate; returns the mean and standard error over replicates.
    """
    rows = sorted(
        (r for r in results if r.estimator == name), key=lambda r: r.num_particles
    )
    if len(rows) < 2:
        return math.nan, math.nan
    log_k = np.log([r.num_particles for r in rows])
    values = np.stack([r.log_likelihood for r in rows])  # (K, S)
    slopes = np.polyfit(log_k, values, 1)[0]
    return float(np.mean(slopes)), standard_error(slopes)


# ---------------------------------------------------------------------------
# Figure and entry point
# ---------------------------------------------------------------------------

COLORS = {"nvil": "C1", "vimco": "C0", "rws": "C2"}
LABELS = {"nvil": "NVIL (multi-sample)", "vimco": "VIMCO", "rws": "RWS"}


def plot(results: Sequence[ConfigResult], initial, ax=None):
    """Held-out log p(x) and KL(q || p) against K (±1 se); training ELBO curves.

    Draws on ``ax`` (three axes) if given, else on a new figure; returns the
    axes.
    """
    if ax is None:
        ax = axes((16, 4.6), ncols=3)
    names = [n for n in ESTIMATORS if any(r.estimator == n for r in results)]
    for name in names:
        rows = sorted(
            (r for r in results if r.estimator == name), key=lambda r: r.num_particles
        )
        ks = [r.num_particles for r in rows]
        ll = [r.log_likelihood for r in rows]
        kl = [r.log_likelihood - r.elbo for r in rows]
        style = {"color": COLORS[name], "capsize": 3, "fmt": "o-"}
        ax[0].errorbar(
            ks,
            [v.mean() for v in ll],
            [standard_error(v) for v in ll],
            label=LABELS[name],
            **style,
        )
        ax[1].errorbar(
            ks,
            [v.mean() for v in kl],
            [standard_error(v) for v in kl],
            label=LABELS[name],
            **style,
        )
        last = rows[-1]
        segments = np.arange(1, last.train_elbo.shape[1] + 1)
        ax[2].plot(
            segments,
            last.train_elbo.mean(axis=0),
            "o-",
            color=COLORS[name],
            label=f"{LABELS[name]}, K={last.num_particles}",
        )
    ax[0].set_ylabel("nats per image")
    ax[0].set_title(
        f"exact held-out log p(x), mean ± se over seeds (init. {np.mean(initial):.2f})"
    )
    ax[1].set_title("held-out KL(q(h|x) || p(h|x)) = log p(x) - ELBO")
    ax[2].set_title("training ELBO estimate per segment (largest K)")
    ax[2].set_xlabel("training segment")
    for a in ax[:2]:
        a.set_xscale("log")
        a.set_xlabel("K (training particles)")
    for a in ax:
        a.legend(fontsize=8)
    return ax


def run(
    *,
    steps: int = STEPS,
    particles: int = PARTICLE_GRID[-1],
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    num_seeds: int = NUM_SEEDS,
    estimators: Sequence[str] = ESTIMATORS,
    particle_grid: Sequence[int] = PARTICLE_GRID,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    num_test: int | None = None,
    fast_compile: bool = False,
) -> dict[str, float]:
    """Trains VIMCO, NVIL and RWS at every K, from several seeds; figure and JSON.

    Args:
      steps: optimisation steps per run (Adam, minibatches of ``batch_size``).
      particles: the largest K; the grid is ``particle_grid`` up to it.
      seed: seeds the data split and the replicate keys.
      out: output directory; ``sbn_particles.png`` and
        ``sbn_particles_metrics.json`` are written there.
      progress: print each configuration's result as it finishes.
      num_seeds: replicates per configuration (at least 2 for error bars).
      estimators: a subset of :data:`~programs.sbn_particles.model.ESTIMATORS`.
      particle_grid: the K values (those above ``particles`` are dropped).
      batch_size: images per minibatch.
      learning_rate: Adam's step size.
      num_test: evaluate on the first ``num_test`` test images (all 360 if
        ``None``; fewer for smoke runs).
      fast_compile: compile with XLA's optimisation level 0 (smoke runs).

    Returns:
      Floats: per configuration ``<estimator>_K<k>_log_likelihood`` (mean over
      seeds), ``..._se``, ``..._kl`` (``log p(x) - ELBO``); per estimator the
      slope of ``log p(x)`` in ``log K`` (``<estimator>_slope``, ``_se``) and
      the paired gain from its smallest to its largest K
      (``<estimator>_gain``, ``_se``); the initial ``log p(x)``; skipped steps.
    """
    grid = tuple(sorted(k for k in particle_grid if 1 <= k <= particles))
    if steps < 1:
        raise ValueError(f"sbn_particles: steps must be at least 1, got {steps}.")
    if num_seeds < 2:
        raise ValueError(
            f"sbn_particles: num_seeds must be at least 2 (for error bars), got "
            f"{num_seeds}."
        )
    if not configurations(estimators, grid):
        raise ValueError(
            f"sbn_particles: no configuration of {tuple(estimators)} with K in {grid}."
        )
    report = Report(out, "sbn_particles")
    dataset = data.load_digits(seed=seed)
    key = jax.random.key(seed)
    if progress:
        print(
            f"sbn_particles: {steps} steps, {num_seeds} seeds, K in {grid}, "
            f"estimators {tuple(estimators)}"
        )
    network = sbn.make_sbn()
    results = sweep(
        dataset,
        key,
        network=network,
        estimators=estimators,
        particle_grid=grid,
        steps=steps,
        num_seeds=num_seeds,
        batch_size=batch_size,
        learning_rate=learning_rate,
        num_test=num_test,
        fast_compile=fast_compile,
        progress=progress,
    )
    initial = initial_log_likelihood(dataset, key, num_seeds, num_test, network)

    metrics: dict[str, float] = {
        "initial_log_likelihood": float(np.mean(initial)),
        "skipped_steps": float(sum(np.sum(r.skipped) for r in results)),
    }
    for r in results:
        stem = f"{r.estimator}_K{r.num_particles}"
        metrics[f"{stem}_log_likelihood"] = float(np.mean(r.log_likelihood))
        metrics[f"{stem}_log_likelihood_se"] = standard_error(r.log_likelihood)
        metrics[f"{stem}_kl"] = float(np.mean(r.log_likelihood - r.elbo))
        metrics[f"{stem}_kl_se"] = standard_error(r.log_likelihood - r.elbo)
    rows = []
    for name in estimators:
        ks = [r.num_particles for r in results if r.estimator == name]
        if len(ks) < 2:
            continue
        slope, slope_se = slope_in_log_k(results, name)
        gain, gain_se = paired_difference(results, name, min(ks), max(ks))
        metrics[f"{name}_slope"] = slope
        metrics[f"{name}_slope_se"] = slope_se
        metrics[f"{name}_gain"] = gain
        metrics[f"{name}_gain_se"] = gain_se
        rows.append(
            (
                f"{name} K={min(ks)}->{max(ks)}",
                f"{gain:+.3f} ± {gain_se:.3f} nats (slope {slope:+.3f} ± "
                f"{slope_se:.3f} per log K)",
            )
        )

    report.save_figure(plot(results, initial))
    report.write_metrics(
        metrics,
        settings={
            "steps": steps,
            "particles": particles,
            "particle_grid": list(grid),
            "estimators": list(estimators),
            "num_seeds": num_seeds,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "num_test": len(dataset.x_test[:num_test]),
            "seed": seed,
        },
        timings={"train_seconds": float(sum(r.seconds for r in results))},
        extras={
            "runs": [
                {
                    "estimator": r.estimator,
                    "particles": r.num_particles,
                    "log_likelihood": r.log_likelihood.tolist(),
                    "elbo": r.elbo.tolist(),
                    "train_elbo": r.train_elbo.tolist(),
                    "train_bound": r.train_bound.tolist(),
                    "seconds": r.seconds,
                }
                for r in results
            ],
            "initial_log_likelihood": initial.tolist(),
        },
    )
    report.summary(
        f"sbn_particles: {steps} steps x {num_seeds} seeds, K in {grid}",
        [
            ("initial held-out log p(x)", f"{np.mean(initial):.3f} nats per image"),
            *rows,
        ],
        metrics,
    )
    return metrics
