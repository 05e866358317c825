"""Weighted particles handed to ArviZ keep their values, weights and history.

Importance sampling a conjugate model (``z ~ N(0, 1)``, ``y ~ N(z, 0.5^2)``,
proposal ``N(0, 2^2)``): the weighted posterior mean that xarray computes
from the ``InferenceData`` must equal the library's self-normalised
estimate exactly (same particles, same weights), and the resampled variant
must hold only the particles' own values, with a mean within Monte Carlo
error of the exact posterior mean. The same tests run with ArviZ 0.x (an
``InferenceData``) and 1.x (an ``xarray.DataTree``; ``make test-newest``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix
from combinators import algo, mcmc
from combinators.inference_data import to_inference_data

az = pytest.importorskip("arviz")

N = 4000
Y = 1.2
POST_MEAN, POST_SD = Y / 1.25, np.sqrt(0.25 / 1.25)


def model():
    with numpyro.plate("particles", N):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=Y)


def proposal():
    with numpyro.plate("particles", N):
        numpyro.sample("z", dist.Normal(0.0, 2.0))


def evaluation(seed=0):
    _, trace, metrics = coix.traced_evaluate(
        coix.propose(model, proposal), seed=jax.random.key(seed)
    )()
    return trace, metrics


def test_weighted_posterior_mean_by_arviz_equals_the_librarys():
    trace, metrics = evaluation()
    idata = to_inference_data(trace, metrics)
    z = idata.posterior["z"]
    assert z.shape == (1, N)
    w = np.asarray(jax.nn.softmax(metrics.log_weight))
    ours = float(np.sum(w * np.asarray(trace["z"].value)))
    theirs = float(z.weighted(idata.sample_stats["weight"]).mean())
    np.testing.assert_allclose(theirs, ours, rtol=1e-6)
    np.testing.assert_allclose(
        idata.sample_stats["log_weight"].values[0], metrics.log_weight, rtol=1e-6
    )
    # The weights make sense of the draws: the estimate is near the truth
    # (ESS about half of N here: 5 standard errors of an ESS-sized sample).
    ess = float(metrics.ess)
    assert abs(ours - POST_MEAN) < 5 * POST_SD / np.sqrt(ess)
    assert idata.attrs["log_Z"] == pytest.approx(float(metrics.log_Z))
    assert idata.attrs["pareto_k"] < 0.7  # a good proposal: reliable weights
    np.testing.assert_allclose(idata.observed_data["y"].values, Y)
    summary = az.summary(idata, var_names=["z"], kind="stats")
    assert "mean" in summary.columns


def test_resampled_draws_are_equally_weighted_particles():
    trace, metrics = evaluation(1)
    idata = to_inference_data(trace, metrics, resample_key=jax.random.key(2))
    draws = idata.posterior["z"].values[0]
    assert idata.attrs["resampled"]
    assert set(np.unique(draws)) <= set(np.unique(np.asarray(trace["z"].value)))
    np.testing.assert_allclose(idata.sample_stats["weight"].values, 1.0 / N)
    # Resampled draws are correlated (duplicates): allow for ESS, not N.
    se = POST_SD / np.sqrt(float(metrics.ess))
    assert abs(draws.mean() - POST_MEAN) < 5 * se


def test_a_bad_proposal_gets_a_large_pareto_k():
    def narrow():
        with numpyro.plate("particles", N):
            numpyro.sample("z", dist.Normal(-2.0, 0.3))

    _, trace, metrics = coix.traced_evaluate(
        coix.propose(model, narrow), seed=jax.random.key(3)
    )()
    assert to_inference_data(trace, metrics).attrs["pareto_k"] > 0.7


def test_tempered_smc_history_becomes_a_group():
    n = 200

    def small():
        with numpyro.plate("particles", n):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.5), obs=Y)

    program = algo.tempered_smc(small, mcmc.rwm(), schedule=np.linspace(0, 1, 4))
    _, trace, metrics = coix.traced_evaluate(program, seed=jax.random.key(4))()
    idata = to_inference_data(trace, metrics)
    history = idata["smc_history"]
    np.testing.assert_allclose(history["beta"].values, np.linspace(0, 1, 4), atol=1e-6)
    assert history["ess"].shape == (4,)
    assert idata.posterior["z"].shape == (1, n)
    # The last level resampled and moved: equal weights, no tail.
    np.testing.assert_allclose(idata.sample_stats["weight"].values, 1.0 / n)
    assert idata.attrs["pareto_k"] == -np.inf


def test_errors_name_the_function():
    with pytest.raises(ValueError, match="to_inference_data: no latent site"):

        def shared():
            numpyro.sample("g", dist.Normal(0.0, 1.0))
            with numpyro.plate("particles", 8):
                numpyro.sample("y", dist.Normal(0.0, 1.0), obs=jnp.zeros(8))

        _, trace, metrics = coix.traced_evaluate(
            coix.propose(shared, shared), seed=jax.random.key(0)
        )()
        to_inference_data(trace, metrics)
