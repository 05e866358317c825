"""Tempered SMC on the issue's harder targets, against exact answers.

* A constrained prior: ``x ~ Uniform(-5, 5)^2`` (an event of two) under an
  isotropic Gaussian likelihood centred near the boundary. The evidence and
  the posterior means are products of truncated-normal integrals.
* The eight-mode ring (``programs.annealing.targets``): the unnormalised
  density integrates to 8, and each mode holds an eighth of the mass.
* A 20-dimensional Gaussian whose posterior is strongly correlated:
  ``x ~ N(0, I)``, ``y ~ N(x, S)`` with ``S`` of correlation 0.9 and scale
  0.5 (posterior variances from 0.05 to 0.9). Importance sampling from the
  prior collapses; the evidence is
  ``N(y; 0, I + S)`` and the posterior mean ``(I + S^-1)^-1 S^-1 y``.

Evidence estimates are tested as ``E[Z-hat / Z] = 1`` (exact for a fixed
schedule, with a bias of order 1/N for an adaptive one that is far below
the tolerances here) at 4 standard errors of the mean over independent
runs, which holds for any seed with probability 6e-5 per assertion.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import scipy.stats

import combinators as coix
from combinators import algo, mcmc
from programs.annealing.targets import ring_log_density

NUM_SE = 4.0


def compile_once(fn):
    return jax.jit(
        fn,
        compiler_options={
            "xla_backend_optimization_level": 0,
            "xla_llvm_disable_expensive_passes": True,
        },
    )


def run_many(program, num_runs, seed):
    """Traces and metrics of ``num_runs`` independent runs."""
    return compile_once(
        jax.vmap(lambda key: coix.traced_evaluate(program, seed=key)()[1:])
    )(jax.random.split(jax.random.key(seed), num_runs))


def assert_evidence(log_z_hat, log_z, max_se=0.05):
    ratio = np.exp(np.asarray(log_z_hat, np.float64) - log_z)
    se = ratio.std() / np.sqrt(ratio.size)
    assert abs(ratio.mean() - 1.0) < NUM_SE * se, (ratio.mean(), se)
    assert se < max_se, se


def assert_posterior_mean(draws, exact, name):
    """``draws``: (runs, particles, ...). Runs are independent, so the spread
    of their per-run means gives the standard error."""
    per_run = np.asarray(draws, np.float64).mean(axis=1)
    se = per_run.std(axis=0) / np.sqrt(per_run.shape[0])
    error = np.abs(per_run.mean(axis=0) - exact)
    assert np.all(error < NUM_SE * se + 1e-3), (name, error, se)


def test_uniform_box_prior_with_a_gaussian_likelihood():
    """The latent lives in (-5, 5)^2; one coordinate's likelihood sits at
    the boundary, so a move that ignored the support (or its log-Jacobian)
    would put mass outside the box or bias the mean of that coordinate."""
    y, sigma = np.array([1.0, -4.6]), 1.0
    lo, hi = (-5 - y) / sigma, (5 - y) / sigma
    mass = scipy.stats.norm.cdf(hi) - scipy.stats.norm.cdf(lo)
    log_z = float(np.sum(np.log(mass / 10.0)))
    mean = y + sigma * (scipy.stats.norm.pdf(lo) - scipy.stats.norm.pdf(hi)) / mass
    n = 256

    def box():
        with numpyro.plate("particles", n):
            x = numpyro.sample("x", dist.Uniform(-5.0, 5.0).expand([2]).to_event(1))
            numpyro.sample(
                "y", dist.Normal(x, sigma).to_event(1), obs=jnp.asarray(y, jnp.float32)
            )

    program = algo.tempered_smc(box, mcmc.mala(), num_mcmc_steps=3, criterion="cess")
    traces, metrics = run_many(program, num_runs=200, seed=11)
    x = np.asarray(traces["x"].value)
    assert x.shape == (200, n, 2)
    assert np.all(np.abs(x) < 5.0)
    assert_evidence(metrics.log_Z, log_z)
    assert_posterior_mean(x, mean, "x")


def test_eight_mode_ring_evidence_and_mode_shares():
    """log Z = log 8; every mode keeps its eighth of the particles. Moves
    are not preconditioned by the population's spread (which spans the
    whole ring), and HMC's step is tuned towards 65% acceptance."""
    n = 512
    prior = dist.Normal(0.0, 6.0).expand([2]).to_event(1)

    def ring():
        with numpyro.plate("particles", n):
            x = numpyro.sample("x", prior)
            numpyro.factor("ring", ring_log_density(x) - prior.log_prob(x))

    program = algo.tempered_smc(
        ring,
        mcmc.hmc(step_size=0.5, num_leapfrog=5),
        num_mcmc_steps=3,
        criterion="cess",
        target_accept=0.65,
        adapt_scale=False,
    )
    traces, metrics = run_many(program, num_runs=40, seed=12)
    assert_evidence(metrics.log_Z, np.log(8.0), max_se=0.1)
    x = np.asarray(traces["x"].value)
    angles = 2 * np.pi * np.arange(8) / 8
    modes = 10 * np.stack([np.cos(angles), np.sin(angles)], -1)
    nearest = np.argmin(((x[..., None, :] - modes) ** 2).sum(-1), -1)
    share = np.stack([(nearest == j).mean(axis=1) for j in range(8)], -1)
    # Per-run shares are independent across runs: test their mean against
    # 1/8 at 4 standard errors, and that no run loses a mode entirely.
    se = share.std(axis=0) / np.sqrt(share.shape[0])
    assert np.all(np.abs(share.mean(axis=0) - 0.125) < NUM_SE * se + 1e-3), (
        share.mean(axis=0),
        se,
    )
    assert share.min() > 0.0


def test_correlated_gaussian_in_twenty_dimensions():
    """Prior N(0, I_20), likelihood N(y; x, S) with S = 0.5 (0.9 11' + 0.1
    I): the posterior is narrow and elongated, so only moves that follow it
    keep the particles diverse."""
    dim = 20
    cov = 0.5 * (0.9 * np.ones((dim, dim)) + 0.1 * np.eye(dim))
    y = np.linspace(-1.0, 1.0, dim)
    log_z = scipy.stats.multivariate_normal(np.zeros(dim), np.eye(dim) + cov).logpdf(y)
    precision = np.linalg.inv(cov)
    mean = np.linalg.solve(np.eye(dim) + precision, precision @ y)
    n = 512
    scale_tril = jnp.asarray(np.linalg.cholesky(cov), jnp.float32)

    def gaussian():
        with numpyro.plate("particles", n):
            x = numpyro.sample("x", dist.Normal(0.0, 1.0).expand([dim]).to_event(1))
            numpyro.sample(
                "y",
                dist.MultivariateNormal(x, scale_tril=scale_tril),
                obs=jnp.asarray(y, jnp.float32),
            )

    program = algo.tempered_smc(
        gaussian,
        mcmc.hmc(num_leapfrog=5),
        num_mcmc_steps=5,
        criterion="cess",
        target_accept=0.65,
    )
    traces, metrics = run_many(program, num_runs=40, seed=13)
    assert_evidence(metrics.log_Z, log_z, max_se=0.1)
    assert_posterior_mean(traces["x"].value, mean, "x")
    # Bounded number of levels, and the particles stay diverse.
    assert np.all(np.asarray(metrics["num_levels"]) < 100)
    x = np.asarray(traces["x"].value)
    assert min(len(np.unique(run[:, 0])) for run in x) > n // 4
