"""Particle MCMC and a learned proposal on the SV model, against the grid reference.

:func:`run` simulates a series from :mod:`programs.stochastic_volatility.model`
and

(a) runs particle marginal Metropolis-Hastings over ``(phi, sigma)``
    (Andrieu, Doucet & Holenstein 2010) and compares its posterior with the
    posterior on a ``(phi, sigma)`` grid built from the grid log-likelihood;
(b) smooths ``x`` given the data with particle Gibbs with ancestor sampling
    (Lindsten, Jordan & Schön 2014), FFBS and genealogy tracing, against the
    grid forward-backward smoothing means;
(c) trains the learned proposal by maximising ``log Z-hat``, with the local
    gradient and with the score-gradient resampling of Ścibior & Wood (2021),
    and compares the spread of ``log Z-hat`` and the ESS with the bootstrap
    filter's.

Run it with ``python -m programs stochastic_volatility``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.stats import norm

import combinators
from combinators import pmcmc, smoothing
from programs._report import Report, Timer, axes
from programs.stochastic_volatility import grid
from programs.stochastic_volatility.model import (
    Model,
    SVParams,
    init_proposal_params,
    particle_filter,
    simulate,
    train_proposal,
)

DESCRIPTION = (
    "Stochastic volatility (Kim, Shephard & Chib 1998): PMMH, particle Gibbs, "
    "FFBS and a learned proposal vs a fine-grid forward-backward reference"
)

#: The parameters the data are simulated from.
TRUE_PARAMS = SVParams(phi=0.95, sigma=0.3, mu=0.0)

#: Tiny sizes for tests (``run(**SMOKE_CONFIG, out=...)``).
SMOKE_CONFIG = {
    "steps": 30,
    "particles": 64,
    "pmmh_iterations": 100,
    "gibbs_iterations": 25,
    "train_steps": 10,
    "num_runs": 64,
    "num_chains": 16,
    "parameter_grid": 12,
}


def prior():
    """The prior: ``phi ~ U(-1, 1)``, ``sigma ~ HalfNormal(1)``."""
    numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    numpyro.sample("sigma", dist.HalfNormal(1.0))


def log_prior(phi, sigma):
    """The prior's log density in ``(phi, sigma)`` (for the parameter grid)."""
    return jnp.log(0.5) + jnp.log(2.0) + norm.logpdf(sigma, 0.0, 1.0)


def run_pmmh(key, ys, num_particles, num_iterations, num_chains, mu=0.0):
    """``num_chains`` PMMH chains over ``{"phi", "sigma"}`` (vmapped).

    Returns:
      :class:`combinators.pmcmc.PMMHResult` with a leading chain axis.
    """

    def make_filter(theta):
        params = SVParams(theta["phi"], theta["sigma"], mu)
        return particle_filter(params, ys, num_particles)

    def chain(key):
        start = {"phi": jnp.asarray(0.8), "sigma": jnp.asarray(0.5)}
        return pmcmc.pmmh(
            key, make_filter, start, num_iterations, scale=0.15, prior=prior
        )

    return jax.jit(jax.vmap(chain))(jax.random.split(key, num_chains))


def smoothed_paths(key, params, ys, num_particles, gibbs_iterations, num_chains):
    """Smoothed means of ``x`` by genealogy, FFBS and particle Gibbs.

    Returns:
      A dict of ``(R, T)`` arrays of per-run (per-chain) smoothed means,
      ``"genealogy"``, ``"ffbs"`` and ``"particle_gibbs"``, and the particle
      Gibbs draws after burn-in, ``"gibbs_draws"``, shape ``(R, K', T)``.
    """
    model = Model(params, ys, num_particles)
    burn_in = gibbs_iterations // 5

    def one(key):
        key_filter, key_ffbs, key_gibbs = jax.random.split(key, 3)
        program = particle_filter(
            params, ys, num_particles, record=smoothing.record_particles("x")
        )
        _, _, metrics = combinators.traced_evaluate(program, seed=key_filter)()
        history = smoothing.particle_history(metrics)
        weights = jax.nn.softmax(history.log_weights[-1])
        genealogy = smoothing.trace_genealogy(history).values @ weights
        ffbs = smoothing.ffbs(key_ffbs, model.target, history).values.mean(axis=1)
        chain = pmcmc.particle_gibbs(
            key_gibbs,
            model.target,
            model.bootstrap_proposal,
            genealogy,  # a reasonable start; any trajectory would do
            gibbs_iterations,
            site="x",
            draw="backward",
        )
        draws = chain.trajectories[burn_in:]
        return {
            "genealogy": genealogy,
            "ffbs": ffbs,
            "particle_gibbs": draws.mean(axis=0),
            "gibbs_draws": draws,
            "update_rate": chain.update_rate,
        }

    return jax.device_get(jax.jit(jax.vmap(one))(jax.random.split(key, num_chains)))


def filter_runs(key, params, ys, num_particles, num_runs, thetas):
    """``log Z-hat`` and the mean per-step ESS of ``num_runs`` filters per proposal.

    One compiled function serves every proposal: the bootstrap filter is the
    learned proposal at ``theta = 0`` (the same draws and weights).

    Args:
      key: a PRNG key.
      params: the model.
      ys: observations, shape ``(T,)``.
      num_particles: N.
      num_runs: filters per proposal.
      thetas: ``{name: theta}``, e.g. ``{"bootstrap": init_proposal_params(),
        "learned": theta}``.

    Returns:
      ``{name: (log_Z_hats, mean_ess)}``, arrays of shape ``(num_runs,)``.
    """

    def one(theta, key):
        program = particle_filter(params, ys, num_particles, theta=theta)
        _, _, metrics = combinators.traced_evaluate(program, seed=key)()
        return metrics["log_Z"], jnp.mean(metrics["history"].ess)

    runs = jax.jit(jax.vmap(one, in_axes=(None, 0)))
    keys = jax.random.split(key, num_runs)
    out = {}
    for name, theta in thetas.items():
        log_z, ess = runs(theta, keys)
        out[name] = (np.asarray(log_z, np.float64), np.asarray(ess, np.float64))
    return out


def plot(xs, ys, reference, paths, chains, posterior, phis, sigmas, runs, losses):
    """Smoothed paths, PMMH traces and posterior, log Z-hat spread, training."""
    ax = axes((22, 4.2), ncols=5)
    t_axis = np.arange(len(ys))
    mean, sd = np.asarray(reference.smoothed_mean), np.asarray(reference.smoothed_sd)
    ax[0].fill_between(
        t_axis, mean - 2 * sd, mean + 2 * sd, color="0.85", label="grid ±2 sd"
    )
    ax[0].plot(t_axis, mean, "k", lw=1.2, label="grid smoothed mean")
    ax[0].plot(t_axis, np.asarray(xs), "x", color="0.4", ms=4, label="true x")
    for index, name in enumerate(("genealogy", "ffbs", "particle_gibbs")):
        ax[0].plot(
            t_axis, paths[name].mean(axis=0), "--", lw=1, color=f"C{index}", label=name
        )
    ax[0].set_title("smoothed log-volatility E[x_t | y]")
    ax[0].set_xlabel("t")
    ax[0].legend(fontsize=7)
    for c in range(chains.thetas["phi"].shape[0]):
        ax[1].plot(chains.thetas["phi"][c], lw=0.6, color="C0", alpha=0.7)
        ax[1].plot(chains.thetas["sigma"][c], lw=0.6, color="C1", alpha=0.7)
    ax[1].set_title("PMMH traces: phi (blue), sigma (orange)")
    ax[1].set_xlabel("iteration")
    ax[2].contour(np.asarray(phis), np.asarray(sigmas), np.asarray(posterior).T, 6)
    burn = chains.thetas["phi"].shape[1] // 5
    ax[2].plot(
        np.ravel(chains.thetas["phi"][:, burn:]),
        np.ravel(chains.thetas["sigma"][:, burn:]),
        ".",
        ms=1,
        alpha=0.3,
        color="C3",
    )
    ax[2].set_xlabel("phi")
    ax[2].set_ylabel("sigma")
    ax[2].set_title("PMMH draws vs grid posterior (contours)")
    log_z = float(reference.log_likelihood)
    for index, (name, (log_z_hat, _)) in enumerate(runs.items()):
        ax[3].hist(log_z_hat - log_z, bins=20, alpha=0.5, color=f"C{index}", label=name)
    ax[3].axvline(0.0, color="k", lw=1)
    ax[3].set_title("log Z-hat - log Z (grid)")
    ax[3].legend(fontsize=7)
    for gradient, curve in losses.items():
        ax[4].plot(np.asarray(curve), lw=0.8, label=f"{gradient} gradient")
    ax[4].legend(fontsize=7)
    ax[4].set_title("training: -log Z-hat")
    ax[4].set_xlabel("step")
    return ax


def run(
    *,
    steps: int = 100,
    particles: int = 200,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    pmmh_iterations: int = 2000,
    gibbs_iterations: int = 200,
    train_steps: int = 300,
    num_runs: int = 200,
    num_chains: int = 4,
    parameter_grid: int = 40,
) -> dict[str, float]:
    """Runs PMMH, particle Gibbs / FFBS and the learned proposal on simulated data.

    Args:
      steps: the series length T (at least 2).
      particles: N, particles of every filter and conditional SMC.
      seed: seeds the data and every algorithm.
      out: output folder for ``stochastic_volatility.png`` and ``..._metrics.json``.
      progress: unused (the stages are single compiled calls); kept for the
        program interface.
      pmmh_iterations: iterations per PMMH chain.
      gibbs_iterations: iterations per particle Gibbs chain.
      train_steps: Adam steps of the learned proposal (N / 4 particles).
      num_runs: independent filters per proposal for the log Z-hat spread.
      num_chains: independent PMMH and particle Gibbs chains (and FFBS runs).
      parameter_grid: points of the ``(phi, sigma)`` grid posterior along
        ``sigma`` (1.5 times as many along ``phi``).

    Returns:
      The metrics as floats.
    """
    del progress
    if steps < 2 or particles < 4 or num_runs < 2 or num_chains < 2:
        raise ValueError(
            "stochastic_volatility: need steps >= 2, particles >= 4, num_runs >= 2 "
            f"and num_chains >= 2, got {steps}, {particles}, {num_runs}, {num_chains}."
        )
    report = Report(out, "stochastic_volatility")
    keys = jax.random.split(jax.random.key(seed), 5)
    params = TRUE_PARAMS
    xs, ys = simulate(keys[0], params, steps)
    reference = grid.forward_backward(params, ys)
    log_z = float(reference.log_likelihood)

    with Timer() as pmmh_clock:
        chains = jax.device_get(
            run_pmmh(keys[1], ys, particles, pmmh_iterations, num_chains)
        )
        phis = jnp.linspace(-0.9, 0.995, 3 * parameter_grid // 2)
        sigmas = jnp.linspace(0.02, 1.2, parameter_grid)
        posterior, _ = grid.parameter_posterior(ys, phis, sigmas, log_prior, 150)
    with Timer() as smoothing_clock:
        paths = smoothed_paths(
            keys[2], params, ys, particles, gibbs_iterations, num_chains
        )
    with Timer() as train_clock:
        thetas, losses = {"bootstrap": init_proposal_params()}, {}
        for gradient in ("local", "score"):
            thetas[f"learned_{gradient}"], losses[gradient] = train_proposal(
                keys[3], params, ys, particles // 4, train_steps, gradient=gradient
            )
        runs = filter_runs(keys[4], params, ys, particles, num_runs, thetas)

    burn = pmmh_iterations // 5
    metrics: dict[str, float] = {"log_Z_grid": log_z}
    grid_phi = float(jnp.sum(posterior.sum(axis=1) * phis))
    grid_sigma = float(jnp.sum(posterior.sum(axis=0) * sigmas))
    metrics["grid_posterior_mean_phi"] = grid_phi
    metrics["grid_posterior_mean_sigma"] = grid_sigma
    for name in ("phi", "sigma"):
        draws = np.asarray(chains.thetas[name][:, burn:], np.float64)
        metrics[f"pmmh_mean_{name}"] = float(draws.mean())
        metrics[f"pmmh_between_chain_se_{name}"] = float(
            draws.mean(axis=1).std(ddof=1) / math.sqrt(num_chains)
        )
    metrics["pmmh_acceptance_rate"] = float(np.mean(chains.accepted))
    grid_mean = np.asarray(reference.smoothed_mean)
    for name in ("genealogy", "ffbs", "particle_gibbs"):
        error = np.abs(paths[name].mean(axis=0) - grid_mean)
        metrics[f"{name}_smoothed_mean_abs_error"] = float(error.mean())
    metrics["particle_gibbs_update_rate"] = float(np.mean(paths["update_rate"]))
    for name, (log_z_hat, ess) in runs.items():
        metrics[f"{name}_log_Z_mean"] = float(log_z_hat.mean())
        metrics[f"{name}_log_Z_sd"] = float(log_z_hat.std(ddof=1))
        metrics[f"{name}_Z_ratio_mean"] = float(np.mean(np.exp(log_z_hat - log_z)))
        metrics[f"{name}_mean_ess"] = float(ess.mean())
    for name, theta in thetas.items():
        for parameter, value in theta.items():
            metrics[f"{name}_{parameter}"] = float(value)

    figure = plot(
        xs, ys, reference, paths, chains, posterior, phis, sigmas, runs, losses
    )
    report.save_figure(figure)
    report.write_metrics(
        metrics,
        settings={
            "steps": steps,
            "particles": particles,
            "seed": seed,
            "pmmh_iterations": pmmh_iterations,
            "gibbs_iterations": gibbs_iterations,
            "train_steps": train_steps,
            "num_runs": num_runs,
            "num_chains": num_chains,
            "parameter_grid": parameter_grid,
            "true_params": dict(params._asdict()),
        },
        timings={
            "pmmh_seconds": pmmh_clock.seconds,
            "smoothing_seconds": smoothing_clock.seconds,
            "train_seconds": train_clock.seconds,
        },
        extras={
            "train_losses": {
                name: np.asarray(curve, np.float64).tolist()
                for name, curve in losses.items()
            },
            "grid_smoothed_mean": grid_mean.tolist(),
            "grid_smoothed_sd": np.asarray(reference.smoothed_sd).tolist(),
            "smoothed_means": {
                name: np.asarray(paths[name], np.float64).tolist()
                for name in ("genealogy", "ffbs", "particle_gibbs")
            },
            "log_Z_hats": {name: runs[name][0].tolist() for name in runs},
        },
    )
    report.summary(
        f"stochastic_volatility: T={steps} N={particles} seed={seed}: "
        f"log Z (grid) = {log_z:.3f}",
        [
            (
                "PMMH phi",
                f"{metrics['pmmh_mean_phi']:.3f} ± "
                f"{metrics['pmmh_between_chain_se_phi']:.3f} (grid {grid_phi:.3f})",
            ),
            (
                "PMMH sigma",
                f"{metrics['pmmh_mean_sigma']:.3f} ± "
                f"{metrics['pmmh_between_chain_se_sigma']:.3f} (grid "
                f"{grid_sigma:.3f}), acceptance "
                f"{metrics['pmmh_acceptance_rate']:.2f}",
            ),
            *[
                (
                    f"{name} |E[x|y] - grid|",
                    f"{metrics[f'{name}_smoothed_mean_abs_error']:.4f}",
                )
                for name in ("genealogy", "ffbs", "particle_gibbs")
            ],
            *[
                (
                    f"{name} log Z-hat",
                    f"{metrics[f'{name}_log_Z_mean']:.3f} "
                    f"(sd {metrics[f'{name}_log_Z_sd']:.3f}), mean ESS "
                    f"{metrics[f'{name}_mean_ess']:.1f}",
                )
                for name in runs
            ],
        ],
        metrics,
    )
    return metrics
