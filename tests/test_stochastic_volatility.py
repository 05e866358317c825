"""The stochastic volatility program against its fine-grid forward-backward reference.

The grid reference is checked against quadrature and its own refinement;
the smoke run of the program (one subprocess) is checked against the grid:
``Z-hat / Z`` has mean 1 (the filters' estimate is unbiased, the learned
proposal's too) and the smoothed means of genealogy tracing, FFBS and
particle Gibbs agree with the grid's ``E[x_t | y]``, with tolerances from the
Monte Carlo error of independent runs (chains), so valid for any seed.
The smoke run is started at once in a subprocess (with fast XLA compilation)
and the grid tests run meanwhile.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from program_runs import start_smoke_run, stop

from programs import stochastic_volatility as sv


@pytest.fixture(scope="module", autouse=True)
def smoke_process(tmp_path_factory):
    """Starts ``--smoke`` in a subprocess at once; the grid tests run meanwhile."""
    out = tmp_path_factory.mktemp("stochastic_volatility")
    process = start_smoke_run("stochastic_volatility", 3, out)
    yield process, out
    stop(process)


@pytest.fixture(scope="module")
def smoke(smoke_process):
    """The record, stdout and folder of the smoke run."""
    process, out = smoke_process
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stdout + stderr
    with open(out / "stochastic_volatility_metrics.json") as f:
        record = json.load(f)
    return record, stdout, out


# ---------------------------------------------------------------------------
# The grid reference.
# ---------------------------------------------------------------------------

PARAMS = sv.SVParams(phi=0.9, sigma=0.4, mu=-0.5)


def data(num_steps, seed=0):
    return sv.simulate(jax.random.key(seed), PARAMS, num_steps)[1]


def test_grid_log_likelihood_of_one_observation_matches_quadrature():
    y = 0.7
    s = float(sv.stationary_sd(PARAMS))
    x = np.linspace(PARAMS.mu - 12 * s, PARAMS.mu + 12 * s, 200_001)
    prior = np.exp(-0.5 * ((x - PARAMS.mu) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    emission = np.exp(-0.5 * y**2 / np.exp(x) - x / 2) / math.sqrt(2 * math.pi)
    exact = math.log(np.trapezoid(prior * emission, x))
    first = sv.forward_backward(PARAMS, jnp.asarray([y])).log_likelihood
    assert abs(float(first) - exact) < 1e-4


def test_grid_refinement_and_marginals():
    ys = data(40)
    coarse = sv.forward_backward(PARAMS, ys, num_points=200)
    fine = sv.forward_backward(PARAMS, ys, num_points=400)
    assert abs(float(coarse.log_likelihood - fine.log_likelihood)) < 1e-2
    np.testing.assert_allclose(coarse.smoothed_mean, fine.smoothed_mean, atol=1e-3)
    np.testing.assert_allclose(fine.smoothing.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(fine.filtering.sum(axis=1), 1.0, atol=1e-5)
    # Smoothing at the last step is filtering.
    np.testing.assert_allclose(fine.smoothing[-1], fine.filtering[-1], atol=1e-5)
    assert np.all(fine.smoothed_sd > 0)


def test_grid_log_likelihood_gradient_matches_finite_differences():
    ys = data(40)

    def at(phi):
        return sv.log_likelihood(sv.SVParams(phi, PARAMS.sigma, PARAMS.mu), ys)

    gradient = float(jax.grad(at)(PARAMS.phi))
    h = 2e-3
    difference = float((at(PARAMS.phi + h) - at(PARAMS.phi - h)) / (2 * h))
    assert abs(gradient - difference) < 0.05 * (1 + abs(gradient))


# ---------------------------------------------------------------------------
# The smoke run of the program against the grid.
# ---------------------------------------------------------------------------


def test_smoke_run_writes_its_figure_and_record(smoke):
    record, stdout, out = smoke
    assert (out / "stochastic_volatility.png").stat().st_size > 0
    assert record["program"] == "stochastic_volatility"
    assert record["steps"] == sv.SMOKE_CONFIG["steps"]
    assert all(math.isfinite(v) for v in record["metrics"].values())
    assert "PMMH phi" in stdout and "learned_local log Z-hat" in stdout
    for curve in record["train_losses"].values():
        assert len(curve) == sv.SMOKE_CONFIG["train_steps"]


def test_pmmh_stays_in_the_support_and_moves(smoke):
    metrics = smoke[0]["metrics"]
    assert 0.05 < metrics["pmmh_acceptance_rate"] < 0.99
    assert -1 < metrics["pmmh_mean_phi"] < 1
    assert metrics["pmmh_mean_sigma"] > 0


@pytest.mark.parametrize("proposal", ["bootstrap", "learned_local", "learned_score"])
def test_z_hat_is_unbiased_against_the_grid_likelihood(smoke, proposal):
    """E[Z-hat] = Z: ``log Z-hat`` is about N(log Z - s^2 / 2, s^2) for large N.

    Checked on the log scale (the ratio ``Z-hat / Z`` is skewed, so its
    sample mean is a poor test statistic): the mean of ``log Z-hat`` is
    ``log Z - s^2 / 2`` within 5 standard errors, with a slack of ``s^2 / 2``
    for the non-normality of ``log Z-hat`` at small N.
    """
    record = smoke[0]
    log_z = record["metrics"]["log_Z_grid"]
    log_z_hat = np.asarray(record["log_Z_hats"][proposal])
    variance = log_z_hat.var(ddof=1)
    se = math.sqrt(variance / log_z_hat.size)
    error = log_z_hat.mean() - (log_z - variance / 2)
    assert abs(error) < 5 * se + variance / 2, (log_z_hat.mean(), log_z, variance)


@pytest.mark.parametrize("method", ["genealogy", "ffbs", "particle_gibbs"])
def test_smoothed_means_match_the_grid(smoke, method):
    record = smoke[0]
    exact = np.asarray(record["grid_smoothed_mean"])
    runs = np.asarray(record["smoothed_means"][method])  # (chains, T)
    assert runs.shape == (sv.SMOKE_CONFIG["num_chains"], exact.size)
    se = runs.std(axis=0, ddof=1) / math.sqrt(runs.shape[0])
    # A floor of 2% of the posterior sd for the O(1/N) bias of the estimates.
    floor = 0.02 * np.asarray(record["grid_smoothed_sd"])
    z = (runs.mean(axis=0) - exact) / np.sqrt(se**2 + floor**2)
    # Student t with 15 dof per step: P(|z| > 7) ~ 4e-6, E z^2 ~ 1.15.
    assert np.max(np.abs(z)) < 7, z
    assert np.mean(z**2) < 4, z
