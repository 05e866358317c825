"""Signal-to-noise ratios of IWAE and DReG gradients as K grows, on the Gaussian toy.

Reproduces the central measurement of Rainforth et al. (2018), "Tighter
Variational Bounds are Not Necessarily Better",
https://arxiv.org/abs/1802.04537 (their Gaussian experiment), and its DReG
sequel, Tucker, Lawson, Gu & Maddison (2019), "Doubly Reparameterized
Gradient Estimators for Monte Carlo Objectives",
https://arxiv.org/abs/1810.04152 (the same toy problem):

* data: 1024 points simulated from the model of :mod:`.model` (``D = 20``);
* parameters: the closed-form optimum (``mu`` = data mean, ``A = I/2``,
  ``b = mu/2``) plus one fixed draw of ``N(0, 0.01^2)`` noise per entry;
* for each K in :data:`PARTICLE_GRID`, ``R`` independent gradient
  estimates of the K-sample bound at the first data point, with the
  library's ``iwae_loss`` and ``iwae_dreg_loss`` programs (``jax.vmap``
  over keys, in chunks), give per coordinate ``E g_j`` and ``sd(g_j)``;
* the signal-to-noise ratio ``SNR_j = |E g_j| / sd(g_j)`` and its
  root-mean-square over the coordinates of each parameter, whose slope in
  ``log K`` the papers predict: ``+1/2`` for ``mu``, ``-1/2`` for IWAE's
  ``(A, b)``, ``+1/2`` for DReG's ``(A, b)``.

Because ``A`` enters only through ``q``'s mean ``A x + b``, every draw
satisfies ``g_A = g_b x^T``: ``SNR(A_ij) = SNR(b_i)``, so ``b`` stands for
the whole inference network. The mean gradients are checked against the
closed forms of :mod:`.model` (exact at K = 1, ``O(K^-2)`` at large K).

Run it with ``python -m programs tighter_bounds``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from programs._replicates import FAST_COMPILE
from programs._report import Report, axes
from programs.tighter_bounds.model import (
    ESTIMATORS,
    PERTURBATION,
    asymptotic_gradient,
    bound_gradient,
    chi_square,
    elbo,
    elbo_gradient,
    log_marginal,
    optimal_params,
    perturb,
    simulate,
)

DESCRIPTION = (
    "Rainforth et al. (2018) / DReG: SNR of IWAE and DReG gradients vs K on the "
    "20-D Gaussian toy, against closed-form gradients"
)

#: The numbers of particles K (up to ``particles``).
PARTICLE_GRID = (1, 3, 10, 30, 100, 300, 1000)
#: Gradient draws per K (``steps``) in a full run.
NUM_DRAWS = 50_000
#: Particles per vmapped chunk of draws (bounds the memory).
CHUNK_PARTICLES = 2**17
#: A coordinate group is "resolved" at K when its mean squared SNR exceeds
#: this many standard errors; slopes are fitted to resolved points only.
RESOLVED = 3.0

#: Slopes are fitted to the K at or above this (the theory is asymptotic in K).
FIT_FROM = 10

#: Tiny sizes for tests (``run(**SMOKE_CONFIG, out=...)``).
SMOKE_CONFIG = {
    "steps": 2000,
    "particles": 100,
    "particle_grid": (1, 3, 100),
    "fit_from": 1,
    "fast_compile": True,
}


class GradientMoments(NamedTuple):
    """Per-coordinate moments of ``num_draws`` gradient estimates.

    Attributes:
      mean: sample means, a dict shaped like the parameters.
      variance: sample variances (``ddof=1``), shaped alike.
      num_draws: the number of draws ``R``.
    """

    mean: dict
    variance: dict
    num_draws: int


# ---------------------------------------------------------------------------
# Gradient moments
# ---------------------------------------------------------------------------


def _combine(a, b):
    """Chan et al.'s pairwise update of ``(count, mean, M2)`` for two samples."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b

    def mean_fn(ma, mb):
        return ma + (mb - ma) * (n_b / n)

    def m2_fn(sa, sb, ma, mb):
        return sa + sb + jnp.square(mb - ma) * (n_a * n_b / n)

    return (
        n,
        jax.tree.map(mean_fn, mean_a, mean_b),
        jax.tree.map(m2_fn, m2_a, m2_b, mean_a, mean_b),
    )


def _moments_fn(params, key, x, num_particles, estimators, num_chunks, chunk):
    keys = jax.random.split(key, (num_chunks, chunk))

    def draws(keys, estimator):
        def one(k):
            return bound_gradient(params, k, x, num_particles, estimator)

        g = jax.vmap(one)(keys)
        mean = jax.tree.map(lambda v: jnp.mean(v, axis=0), g)
        m2 = jax.tree.map(lambda v, m: jnp.sum(jnp.square(v - m), axis=0), g, mean)
        return mean, m2

    def body(carry, keys):
        chunk_stats = {}
        for name in estimators:
            mean, m2 = draws(keys, name)
            chunk_stats[name] = (jnp.float32(chunk), mean, m2)
        new = {name: _combine(carry[name], chunk_stats[name]) for name in estimators}
        return new, None

    zeros = jax.tree.map(jnp.zeros_like, dict(params))
    init = {name: (jnp.float32(0.0), zeros, zeros) for name in estimators}
    final, _ = jax.lax.scan(body, init, keys)
    return {name: (final[name][1], final[name][2]) for name in estimators}


_STATIC = ("num_particles", "estimators", "num_chunks", "chunk")
_moments = jax.jit(_moments_fn, static_argnames=_STATIC)
_fast_moments = jax.jit(
    _moments_fn, static_argnames=_STATIC, compiler_options=FAST_COMPILE
)


def gradient_moments(
    params: Mapping,
    key: jax.Array,
    x,
    num_particles: int,
    num_draws: int,
    estimators: Sequence[str] = ESTIMATORS,
    *,
    fast_compile: bool = False,
) -> dict[str, GradientMoments]:
    """Means and variances of ``num_draws`` gradient estimates per estimator.

    The draws are made ``chunk`` at a time (``jax.vmap`` over keys), in as
    few chunks as keep ``chunk * K`` near :data:`CHUNK_PARTICLES`, and their
    moments merged
    exactly (Chan, Golub & LeVeque's pairwise update), so memory does not
    grow with ``num_draws``. Every estimator sees the same keys, hence the
    same samples ``z`` (common random numbers).

    Args:
      params: ``{"mu", "A", "b"}``, held fixed.
      key: a PRNG key.
      x: one data point, shape ``(D,)``.
      num_particles: K.
      num_draws: gradient draws ``R``; rounded up to a whole number of chunks.
      estimators: names from :data:`~programs.tighter_bounds.model.ESTIMATORS`.
      fast_compile: compile with XLA's backend optimisation level 0.

    Returns:
      ``{estimator: GradientMoments}``.

    Raises:
      ValueError: for fewer than 2 draws or an unknown estimator.
    """
    if num_draws < 2:
        raise ValueError(f"gradient_moments: num_draws must be >= 2, got {num_draws}.")
    for name in estimators:
        if name not in ESTIMATORS:
            raise ValueError(
                f"gradient_moments: unknown estimator {name!r}; "
                f"choose from {ESTIMATORS}."
            )
    num_chunks = -(-num_draws * num_particles // CHUNK_PARTICLES)
    chunk = -(-num_draws // num_chunks)
    fn = _fast_moments if fast_compile else _moments
    stats = fn(
        dict(params),
        key,
        jnp.asarray(x),
        num_particles=num_particles,
        estimators=tuple(estimators),
        num_chunks=num_chunks,
        chunk=chunk,
    )
    total = num_chunks * chunk
    return {
        name: GradientMoments(
            mean=jax.tree.map(np.asarray, mean),
            variance=jax.tree.map(lambda m2: np.asarray(m2) / (total - 1), m2),
            num_draws=total,
        )
        for name, (mean, m2) in stats.items()
    }


# ---------------------------------------------------------------------------
# Signal-to-noise ratios and slopes
# ---------------------------------------------------------------------------


def coordinate_snr(moments: GradientMoments, name: str) -> np.ndarray:
    """``|mean_j| / sd_j`` per coordinate of parameter ``name`` (flattened)."""
    mean = np.ravel(moments.mean[name]).astype(np.float64)
    sd = np.sqrt(np.ravel(moments.variance[name]).astype(np.float64))
    return np.abs(mean) / sd


class AggregateSNR(NamedTuple):
    """The root-mean-square SNR over a parameter's coordinates.

    Attributes:
      snr: ``sqrt(max(mean_sq, 0))``.
      mean_sq: ``(1/J) sum_j (mean_j^2 - var_j / R) / var_j``, the mean
        squared SNR with the sampling bias of ``mean_j^2`` (``var_j / R``)
        removed; can be slightly negative when the signal is unresolved.
      se: its standard error, ``sqrt(sum_j (2 / R^2 + 4 SNR_j^2 / R)) / J``.
      resolved: whether ``mean_sq > RESOLVED * se``.
    """

    snr: float
    mean_sq: float
    se: float
    resolved: bool


def aggregate_snr(moments: GradientMoments, name: str) -> AggregateSNR:
    """The root-mean-square over coordinates of ``SNR_j^2``, debiased.

    The plain estimate ``|mean_j| / sd_j`` cannot fall below about
    ``sqrt(2 / (pi R))`` even when ``E g_j = 0``; subtracting ``var_j / R``
    from ``mean_j^2`` removes that floor on average, and averaging over the
    ``J`` coordinates shrinks what is left.
    """
    mean = np.ravel(moments.mean[name]).astype(np.float64)
    var = np.ravel(moments.variance[name]).astype(np.float64)
    r = moments.num_draws
    per = (mean**2 - var / r) / var
    j = per.size
    mean_sq = float(np.mean(per))
    se = float(np.sqrt(np.sum(2.0 / r**2 + 4.0 * np.maximum(per, 0.0) / r)) / j)
    return AggregateSNR(
        math.sqrt(max(mean_sq, 0.0)), mean_sq, se, mean_sq > RESOLVED * se
    )


def fit_slope(
    particles: Sequence[int], snrs: Sequence[AggregateSNR], fit_from: int = 1
) -> float:
    """Least-squares slope of ``log SNR`` against ``log K`` over resolved points.

    Only the points with ``K >= fit_from`` are used. Returns ``nan`` when
    fewer than two of them are resolved.
    """
    pairs = [
        (k, s.snr)
        for k, s in zip(particles, snrs, strict=True)
        if s.resolved and k >= fit_from
    ]
    if len(pairs) < 2:
        return math.nan
    log_k, log_snr = np.log(np.array(pairs, dtype=np.float64)).T
    return float(np.polyfit(log_k, log_snr, 1)[0])


# ---------------------------------------------------------------------------
# The sweep over K
# ---------------------------------------------------------------------------


class Problem(NamedTuple):
    """One instance of the toy: data, the perturbed parameters, the data point.

    Attributes:
      x: the simulated data ``(N, D)``.
      mu_true: the ``mu`` they were simulated from.
      optimum: :func:`~programs.tighter_bounds.model.optimal_params` of ``x``.
      params: ``optimum`` perturbed by ``N(0, PERTURBATION^2)`` per entry.
      point: the data point whose bound is differentiated, ``x[0]``.
    """

    x: jax.Array
    mu_true: jax.Array
    optimum: dict
    params: dict
    point: jax.Array


def make_problem(key: jax.Array, perturbation: float = PERTURBATION) -> Problem:
    """Simulates the data and perturbs the optimum (one key for both)."""
    return _make_problem(key, perturbation)


@jax.jit
def _make_problem(key, perturbation):
    key_data, key_perturb = jax.random.split(key)
    x, mu_true = simulate(key_data)
    optimum = optimal_params(x)
    params = perturb(key_perturb, optimum, perturbation)
    return Problem(x, mu_true, optimum, params, x[0])


def sweep(
    problem: Problem,
    key: jax.Array,
    particle_grid: Sequence[int],
    num_draws: int,
    *,
    fast_compile: bool = False,
    progress: bool = False,
) -> list[dict[str, GradientMoments]]:
    """:func:`gradient_moments` of both estimators at every K of the grid.

    Each K gets its own key (folded in from ``key``).
    """
    results = []
    for k in particle_grid:
        tic = time.perf_counter()
        results.append(
            gradient_moments(
                problem.params,
                jax.random.fold_in(key, k),
                problem.point,
                k,
                num_draws,
                fast_compile=fast_compile,
            )
        )
        if progress:
            print(f"  K={k:5d}: {time.perf_counter() - tic:6.1f} s")
    return results


def mean_gradient_check(moments: GradientMoments, reference: Mapping, name: str):
    """``(relative error, largest |z|)`` of the estimated mean gradient of ``name``.

    The relative error is ``||mean - ref|| / ||ref||``; ``z_j = (mean_j -
    ref_j) / (sd_j / sqrt(R))``.
    """
    mean = np.ravel(moments.mean[name]).astype(np.float64)
    ref = np.ravel(np.asarray(reference[name])).astype(np.float64)
    se = np.sqrt(np.ravel(moments.variance[name]) / moments.num_draws)
    relative = float(np.linalg.norm(mean - ref) / np.linalg.norm(ref))
    return relative, float(np.max(np.abs(mean - ref) / se))


# ---------------------------------------------------------------------------
# Figure and entry point
# ---------------------------------------------------------------------------


def _reference_line(ax, ks, anchor, slope, label, style):
    ks = np.asarray(ks, dtype=np.float64)
    ax.plot(ks, anchor * (ks / ks[0]) ** slope, style, color="k", lw=1, label=label)


def plot(particle_grid, results, problem, num_draws, ax=None):
    """Three panels: SNR of ``mu``, SNR of ``b`` (= ``A``), mean gradient vs truth.

    Draws on ``ax`` (three axes) if given, else on a new figure; returns the
    axes.
    """
    if ax is None:
        ax = axes((16, 4.6), ncols=3)
    ks = np.asarray(particle_grid, dtype=np.float64)
    colors = {"iwae": "C0", "dreg": "C3"}
    labels = {"iwae": "IWAE", "dreg": "DReG"}

    per = np.array([coordinate_snr(r["iwae"], "mu") for r in results])
    ax[0].loglog(ks, per, color="0.75", lw=0.6)
    agg = [aggregate_snr(r["iwae"], "mu") for r in results]
    ax[0].loglog(ks, [a.snr for a in agg], "o-", color="C2", label="mu (RMS)")
    _reference_line(ax[0], ks, agg[0].snr, 0.5, "slope +1/2", "--")
    ax[0].set_title("generative network: SNR of d/d mu")

    for name in ESTIMATORS:
        per = np.array([coordinate_snr(r[name], "b") for r in results])
        ax[1].loglog(ks, per, color=colors[name], lw=0.4, alpha=0.25)
        agg = [aggregate_snr(r[name], "b") for r in results]
        snr = np.array([a.snr for a in agg])
        lower = np.array([math.sqrt(max(a.mean_sq - 2 * a.se, 0.0)) for a in agg])
        upper = np.array([math.sqrt(max(a.mean_sq + 2 * a.se, 0.0)) for a in agg])
        ok = snr > 0
        ax[1].errorbar(
            ks[ok],
            snr[ok],
            yerr=[snr[ok] - np.maximum(lower[ok], 1e-12), upper[ok] - snr[ok]],
            fmt="o-",
            color=colors[name],
            capsize=3,
            label=f"{labels[name]} (RMS, ±2 se)",
        )
        slope = 0.5 if name == "dreg" else -0.5
        _reference_line(ax[1], ks, snr[0], slope, None, ":" if name == "dreg" else "--")
    dim = int(np.size(results[0]["iwae"].mean["b"]))
    r = results[0]["iwae"].num_draws
    floor = math.sqrt(RESOLVED * math.sqrt(2.0 * dim) / (r * dim))
    ax[1].axhline(floor, color="0.4", lw=0.8, ls="-.", label="resolution limit")
    ax[1].set_ylim(bottom=floor / 10)
    ax[1].set_title("inference network: SNR of d/d b (= d/d A)")

    for name in ESTIMATORS:
        norms = [np.linalg.norm(r[name].mean["b"]) for r in results]
        ses = [
            math.sqrt(np.sum(r[name].variance["b"]) / r[name].num_draws)
            for r in results
        ]
        ax[2].errorbar(
            ks,
            norms,
            yerr=2 * np.asarray(ses),
            fmt="o",
            color=colors[name],
            capsize=3,
            label=f"{labels[name]} estimate (±2 se)",
        )
    exact = np.linalg.norm(elbo_gradient(problem.params, problem.point)["b"])
    asymptote = [
        np.linalg.norm(asymptotic_gradient(problem.params, problem.point, k)["b"])
        for k in ks
    ]
    ax[2].loglog(ks, asymptote, "k--", lw=1, label="|grad chi2| / 2K (closed form)")
    ax[2].loglog([1.0], [exact], "k*", ms=12, label="K=1 exact (ELBO)")
    ax[2].set_title(f"|E g_b| vs K (R = {num_draws} draws per K)")
    for a in ax:
        a.set_xlabel("K (particles)")
        a.legend(fontsize=8)
    ax[0].set_ylabel("signal-to-noise ratio")
    return ax


def run(
    *,
    steps: int = NUM_DRAWS,
    particles: int = PARTICLE_GRID[-1],
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    particle_grid: Sequence[int] = PARTICLE_GRID,
    perturbation: float = PERTURBATION,
    fit_from: int = FIT_FROM,
    fast_compile: bool = False,
) -> dict[str, float]:
    """Measures the SNR of IWAE and DReG gradients against K; saves figure and JSON.

    Args:
      steps: gradient draws ``R`` per K (rounded up to whole chunks).
      particles: the largest K; the grid is ``particle_grid`` up to it.
      seed: seeds the data, the perturbation and the gradient draws.
      out: output directory; ``tighter_bounds.png`` and
        ``tighter_bounds_metrics.json`` are written there.
      progress: print the time of each K.
      particle_grid: the K values (those above ``particles`` are dropped).
      perturbation: standard deviation of the noise added to the optimum.
      fit_from: the slopes are fitted to the resolved K at or above this.
      fast_compile: compile with XLA's optimisation level 0 (smoke runs).

    Returns:
      Final metrics as floats: the fitted slopes of ``log SNR`` in ``log K``
      (``slope_mu``, ``slope_phi_iwae``, ``slope_phi_dreg``), the RMS SNRs at
      the smallest and largest K, and the mean-gradient checks against the
      closed forms (relative errors and largest |z|).
    """
    grid = tuple(sorted(k for k in particle_grid if 1 <= k <= particles))
    if steps < 2:
        raise ValueError(f"tighter_bounds: steps (draws) must be >= 2, got {steps}.")
    if len(grid) < 2:
        raise ValueError(
            f"tighter_bounds: need at least two K values up to particles={particles}, "
            f"got {grid} from {tuple(particle_grid)}."
        )
    report = Report(out, "tighter_bounds")
    key_problem, key_draws = jax.random.split(jax.random.key(seed))
    problem = make_problem(key_problem, perturbation)
    if progress:
        print(f"tighter_bounds: {steps} gradient draws per K for K in {grid}")
    results = sweep(
        problem,
        key_draws,
        grid,
        steps,
        fast_compile=fast_compile,
        progress=progress,
    )
    num_draws = results[0]["iwae"].num_draws

    snr = {
        "mu": [aggregate_snr(r["iwae"], "mu") for r in results],
        "phi_iwae": [aggregate_snr(r["iwae"], "b") for r in results],
        "phi_dreg": [aggregate_snr(r["dreg"], "b") for r in results],
    }
    metrics: dict[str, float] = {}
    for name, values in snr.items():
        metrics[f"slope_{name}"] = fit_slope(grid, values, fit_from)
        metrics[f"resolved_{name}"] = float(sum(v.resolved for v in values))
        metrics[f"snr_{name}_K{grid[0]}"] = values[0].snr
        metrics[f"snr_{name}_K{grid[-1]}"] = values[-1].snr

    params, point = problem.params, problem.point
    exact = elbo_gradient(params, point)
    asymptote = asymptotic_gradient(params, point, grid[-1])
    first, last = results[0], results[-1]
    for name in ESTIMATORS:
        if grid[0] == 1:
            for group in ("mu", "b"):
                rel, z = mean_gradient_check(first[name], exact, group)
                metrics[f"{name}_K1_{group}_relative_error"] = rel
                metrics[f"{name}_K1_{group}_max_abs_z"] = z
        for group in ("mu", "b"):
            rel, z = mean_gradient_check(last[name], asymptote, group)
            metrics[f"{name}_Kmax_{group}_relative_error"] = rel
            metrics[f"{name}_Kmax_{group}_max_abs_z"] = z
    a_snr = coordinate_snr(last["iwae"], "A").reshape(point.shape[0], -1)
    b_snr = coordinate_snr(last["iwae"], "b")
    metrics["snr_A_minus_b_max_relative"] = float(
        np.max(np.abs(a_snr - b_snr[:, None]) / b_snr[:, None])
    )
    metrics["chi_square"] = float(chi_square(params, point))
    metrics["log_marginal"] = float(log_marginal(params["mu"], point))
    metrics["elbo"] = float(elbo(params, point))

    report.save_figure(plot(grid, results, problem, num_draws))
    report.write_metrics(
        metrics,
        settings={
            "steps": steps,
            "num_draws": num_draws,
            "particles": particles,
            "particle_grid": list(grid),
            "perturbation": perturbation,
            "fit_from": fit_from,
            "seed": seed,
        },
        extras={
            "snr": {
                name: {
                    "snr": [v.snr for v in values],
                    "mean_sq": [v.mean_sq for v in values],
                    "se": [v.se for v in values],
                    "resolved": [bool(v.resolved) for v in values],
                }
                for name, values in snr.items()
            },
        },
    )
    report.summary(
        f"tighter_bounds: K in {grid}, R={num_draws} draws, seed {seed}",
        [
            ("slope of SNR(mu) [paper: +1/2]", f"{metrics['slope_mu']:+.3f}"),
            ("slope of SNR(phi), IWAE [-1/2]", f"{metrics['slope_phi_iwae']:+.3f}"),
            ("slope of SNR(phi), DReG [+1/2]", f"{metrics['slope_phi_dreg']:+.3f}"),
            ("chi2(p(z|x) || q)", f"{metrics['chi_square']:.3f}"),
        ],
        metrics,
    )
    return metrics
