"""Both particle filters of :mod:`programs.lgssm.model` against the Kalman filter.

:func:`run` simulates data, runs each filter many times (vmapped) and
compares ``log Z-hat`` and the filtering means with the exact values of
:mod:`programs.lgssm_exact` (the likelihood estimate is unbiased: Del Moral
2004, "Feynman-Kac Formulae", Springer). Run it with ``python -m programs
lgssm``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

import combinators
from programs._report import Report, axes
from programs.lgssm.model import bootstrap_filter, guided_filter
from programs.lgssm_exact import default_params, kalman_filter, simulate

DESCRIPTION = (
    "Bootstrap and guided particle filters for a linear-Gaussian SSM "
    "(algo.smc, O(N) steps) vs the Kalman filter"
)


class FilterEstimates(NamedTuple):
    """What one run of a filter program estimates.

    Attributes:
      log_Z: estimate of ``log p(y_{0:T-1})``, shape ``()``.
      log_Z_increments: per-step increments, shape ``(T,)``.
      filtering_means: ``sum_i W_t^i x_t^i``, shape ``(T, d)``.
      ess: the effective sample size of each step's weights, shape ``(T,)``.
      resampled: whether step ``t`` resampled before proposing, ``(T,)``.
    """

    log_Z: jax.Array
    log_Z_increments: jax.Array
    filtering_means: jax.Array
    ess: jax.Array
    resampled: jax.Array


def evaluate_filter(program: Callable, key: jax.Array) -> FilterEstimates:
    """Runs a filter program (built with the default record) with ``key``.

    Args:
      program: from :func:`bootstrap_filter` or :func:`guided_filter`.
      key: a PRNG key.

    Returns:
      The :class:`FilterEstimates`; ``jax.jit`` and ``jax.vmap`` over keys
      apply.
    """
    _, _, metrics = combinators.traced_evaluate(program, seed=key)()
    history = metrics["history"]
    return FilterEstimates(
        log_Z=metrics["log_Z"],
        log_Z_increments=history.log_Z_increment,
        filtering_means=history.records["filtering_mean"],
        ess=history.ess,
        resampled=history.resampled,
    )


def _repeated_runs(program, key, num_runs, chunk, progress, label):
    """``evaluate_filter`` over ``num_runs`` keys, vmapped in chunks."""
    from tqdm.auto import tqdm

    one_chunk = jax.jit(jax.vmap(lambda k: evaluate_filter(program, k)))
    keys = jax.random.split(key, num_runs)
    parts = []
    for start in tqdm(
        range(0, num_runs, chunk), desc=label, disable=not progress, leave=False
    ):
        parts.append(jax.device_get(one_chunk(keys[start : start + chunk])))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)


def plot(t_axis, xs, ys, kalman, runs, threshold, num_particles):
    """Filtering means vs Kalman (first coordinate), ESS, and log Z-hat spread.

    Returns:
      The three axes.
    """
    ax = axes((16, 4.2), ncols=3)
    ax_mean, ax_ess, ax_z = ax
    mean = np.asarray(kalman.filtered_means[:, 0])
    sd = np.sqrt(np.asarray(kalman.filtered_covs[:, 0, 0]))
    ax_mean.fill_between(
        t_axis, mean - 2 * sd, mean + 2 * sd, color="0.85", label="Kalman ±2 sd"
    )
    ax_mean.plot(t_axis, mean, color="k", lw=1.2, label="Kalman mean")
    ax_mean.plot(t_axis, np.asarray(xs[:, 0]), "x", color="0.4", ms=4, label="true x")
    ax_mean.plot(t_axis, np.asarray(ys[:, 0]), ".", color="C2", ms=4, label="y")
    for index, name in enumerate(runs):
        ax_mean.plot(
            t_axis,
            runs[name].filtering_means[0, :, 0],
            lw=1,
            ls="--",
            color=f"C{index}",
            label=f"{name} (one run)",
        )
    below = {
        "fontsize": 7,
        "loc": "upper center",
        "bbox_to_anchor": (0.5, -0.15),
        "ncols": 2,
        "frameon": False,
    }
    ax_mean.set_title("filtering mean of x_t[0]")
    ax_mean.set_xlabel("time step t")
    ax_mean.set_ylabel("x_t[0]")
    ax_mean.legend(**below)
    for index, name in enumerate(runs):
        ess = runs[name].ess[0]
        resampled = runs[name].resampled[0]
        ax_ess.plot(t_axis, ess, color=f"C{index}", lw=1, label=name)
        ax_ess.plot(
            t_axis[resampled],
            ess[resampled],
            "v",
            color=f"C{index}",
            ms=5,
            label=f"{name}: resampled before step",
        )
    if threshold is not None:
        ax_ess.axhline(
            threshold * num_particles,
            color="0.5",
            lw=0.8,
            ls=":",
            label=f"resampling threshold ({threshold:g} N)",
        )
    ax_ess.set_title("ESS of each step's weights (one run)")
    ax_ess.set_xlabel("time step t")
    ax_ess.set_ylabel(f"ESS (of N = {num_particles})")
    ax_ess.set_ylim(bottom=0)
    ax_ess.legend(**below)
    log_z = float(kalman.log_likelihood)
    for index, name in enumerate(runs):
        ax_z.hist(
            runs[name].log_Z - log_z, bins=30, alpha=0.5, color=f"C{index}", label=name
        )
    ax_z.axvline(0.0, color="k", lw=1)
    ax_z.set_title("log Z-hat - log Z (Kalman), repeated runs")
    ax_z.set_xlabel("log Z-hat - log Z")
    ax_z.set_ylabel("runs")
    ax_z.legend(**below)
    return ax


def run(
    *,
    steps: int = 50,
    particles: int = 1000,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    dim: int = 1,
    num_runs: int = 200,
    ess_threshold: float | None = 0.5,
) -> dict[str, float]:
    """Runs both filters on simulated data and compares them with the Kalman filter.

    Simulates ``T = steps`` observations from ``default_params(dim)``, runs
    the bootstrap and the guided filter ``num_runs`` times each (vmapped)
    with adaptive resampling, and reports the mean and standard error of
    ``log Z-hat`` against the exact ``log p(y)``, the mean of ``Z-hat / Z``
    (1 in expectation) and the mean absolute error of the filtering means.

    Args:
      steps: the number of time steps T (at least 2).
      particles: N, the number of particles.
      seed: seeds the data and the filters.
      out: output directory for ``lgssm.png`` and ``lgssm_metrics.json``.
      progress: show a progress bar over chunks of runs.
      dim: the state dimension d.
      num_runs: independent runs per filter.
      ess_threshold: adaptive resampling threshold (``None``: every step).

    Returns:
      The metrics as floats.
    """
    if steps < 2:
        raise ValueError(f"lgssm: steps (T) must be at least 2, got {steps}.")
    if particles < 1 or num_runs < 2:
        raise ValueError(
            f"lgssm: need particles >= 1 and num_runs >= 2, got {particles} and "
            f"{num_runs}."
        )
    report = Report(out, "lgssm")
    key_data, key_bootstrap, key_guided = jax.random.split(jax.random.key(seed), 3)
    params = default_params(dim)
    xs, ys = simulate(key_data, params, steps)
    kalman = kalman_filter(params, ys)
    log_z = float(kalman.log_likelihood)

    filters = {
        "bootstrap": (bootstrap_filter, key_bootstrap),
        "guided": (guided_filter, key_guided),
    }
    chunk = max(1, min(num_runs, 2_000_000 // (particles * steps)))
    runs = {
        name: _repeated_runs(
            make(params, ys, particles, ess_threshold),
            key,
            num_runs,
            chunk,
            progress,
            name,
        )
        for name, (make, key) in filters.items()
    }

    metrics: dict[str, float] = {"log_Z_kalman": log_z}
    kalman_means = np.asarray(kalman.filtered_means)
    for name, estimates in runs.items():
        log_z_hat = np.asarray(estimates.log_Z, dtype=np.float64)
        ratio = np.exp(log_z_hat - log_z)
        errors = np.abs(np.asarray(estimates.filtering_means) - kalman_means)
        metrics[f"{name}_log_Z_mean"] = float(log_z_hat.mean())
        metrics[f"{name}_log_Z_se"] = float(log_z_hat.std(ddof=1) / math.sqrt(num_runs))
        metrics[f"{name}_log_Z_sd"] = float(log_z_hat.std(ddof=1))
        metrics[f"{name}_Z_ratio_mean"] = float(ratio.mean())
        metrics[f"{name}_Z_ratio_se"] = float(ratio.std(ddof=1) / math.sqrt(num_runs))
        metrics[f"{name}_filtering_mean_abs_error"] = float(errors.mean())
        metrics[f"{name}_mean_ess"] = float(np.mean(estimates.ess))
        metrics[f"{name}_resampling_rate"] = float(np.mean(estimates.resampled[:, 1:]))

    t_axis = np.arange(steps)
    figure = plot(
        t_axis, np.asarray(xs), np.asarray(ys), kalman, runs, ess_threshold, particles
    )
    report.save_figure(figure)
    report.write_metrics(
        metrics,
        settings={
            "steps": steps,
            "particles": particles,
            "seed": seed,
            "dim": dim,
            "num_runs": num_runs,
            "ess_threshold": ess_threshold,
        },
    )
    report.summary(
        f"lgssm: T={steps} N={particles} d={dim} runs={num_runs}: "
        f"log Z (Kalman) = {log_z:.3f}",
        [
            f"{name:9s} log Z-hat = {metrics[f'{name}_log_Z_mean']:.3f} "
            f"± {metrics[f'{name}_log_Z_se']:.3f} "
            f"(sd {metrics[f'{name}_log_Z_sd']:.3f}), "
            f"mean Z-hat/Z = {metrics[f'{name}_Z_ratio_mean']:.3f} "
            f"± {metrics[f'{name}_Z_ratio_se']:.3f}, "
            f"|filtering mean - Kalman| = "
            f"{metrics[f'{name}_filtering_mean_abs_error']:.4f}, "
            f"resampled {100 * metrics[f'{name}_resampling_rate']:.0f}% of steps"
            for name in runs
        ],
    )
    return metrics
