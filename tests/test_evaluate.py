"""combinators.core.evaluate: traced_evaluate and empirical, program <-> triple.

Round trips are exact: replaying an evaluation with ``empirical`` must give
back the same sites, generations, roles and metrics, eagerly and under jit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix
from combinators import loss

N = 4
D = 3
Y = 1.0


@pytest.fixture(params=["eager", "jit"])
def mode(request):
    return request.param


def run(program, *args, seed=0, mode="eager", latents=None):
    """``traced_evaluate(program, ...)(*args)``, called directly or under jit."""

    def evaluate(key):
        return coix.traced_evaluate(program, latents=latents, seed=key)(*args)

    if mode == "jit":
        evaluate = jax.jit(evaluate)
    return evaluate(jax.random.key(seed))


def target():
    with numpyro.plate("particles", N):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=Y)
    return (z,)


def proposal():
    with numpyro.plate("particles", N):
        return (numpyro.sample("z", dist.Normal(0.2, 1.1)),)


def kernel(z):
    with numpyro.plate("particles", N):
        return (numpyro.sample("z", dist.Normal(0.9 * z, 0.4)),)


def reverse(z):
    with numpyro.plate("particles", N):
        numpyro.sample("z", dist.Normal(z, 0.5))
    return ()


PROGRAMS = {
    "unweighted": target,
    "propose": coix.propose(target, proposal, loss_fn=loss.elbo_loss),
    "compose-resample": coix.compose(
        kernel, coix.resample(coix.propose(target, proposal))
    ),
    "extend": coix.extend(target, reverse),
}


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# empirical replays an evaluation exactly.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROGRAMS)
def test_replaying_an_evaluation_gives_the_same_triple(name, mode):
    out, trace, metrics = run(PROGRAMS[name], mode=mode)
    replay = coix.empirical(out, trace, metrics)
    out2, trace2, metrics2 = run(replay, seed=1, mode=mode)
    # Same names, generations, roles, values and log densities; a replay
    # records each generation at its own depth (trace.rebased()).
    assert list(trace2) == list(trace)
    assert [(n, g) for n, g, _ in trace2.generations()] == [
        (n, g) for n, g, _ in trace.generations()
    ]
    assert_trees_equal(trace2, trace.rebased())
    assert_trees_equal(out2, out)
    assert_trees_equal(metrics2, metrics)
    # Replaying the replay changes nothing.
    _, trace3, metrics3 = run(coix.empirical(out2, trace2, metrics2), mode=mode)
    assert_trees_equal(trace3, trace2)
    assert_trees_equal(metrics3, metrics2)


def test_round_trip_keeps_generations_and_auxiliary_roles():
    _, composed, _ = run(PROGRAMS["compose-resample"])
    newest, older = composed.history("z")
    assert (newest.depth, older.depth) == (0, 1)
    _, extended, _ = run(PROGRAMS["extend"])
    current, auxiliary = extended.history("z")
    assert not current.auxiliary and auxiliary.auxiliary
    assert extended["y"].observed and not extended["z"].observed


def test_replaying_an_unweighted_program_recomputes_its_default_metrics(mode):
    out, trace, metrics = run(target, mode=mode)
    _, trace2, metrics2 = run(coix.empirical(out, trace, None), mode=mode)
    assert_trees_equal(trace2, trace)
    # Recomputed, not replayed: equal up to float rounding (jit may fuse).
    assert jax.tree_util.tree_structure(metrics2) == jax.tree_util.tree_structure(
        metrics
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(metrics2),
        jax.tree_util.tree_leaves(metrics),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_empirical_called_directly_returns_its_output_and_needs_no_key():
    out, trace, metrics = run(PROGRAMS["propose"])
    replay = coix.empirical(out, trace, metrics)
    assert replay(1, 2, x=3) is out
    # Replaying draws nothing, so no seed is needed.
    _, trace2, _ = coix.traced_evaluate(replay)()
    np.testing.assert_array_equal(trace2["z"].value, trace["z"].value)


def test_empirical_accepts_coix_style_site_dicts():
    z = jnp.arange(N, dtype=jnp.float32)
    sites = {
        "z": {"value": z, "log_prob": -z},
        "y": {"value": jnp.float32(Y), "log_prob": jnp.ones(N), "is_observed": True},
    }
    _, trace, metrics = coix.traced_evaluate(coix.empirical((z,), sites, None))()
    assert trace["y"].observed and not trace["z"].observed
    np.testing.assert_array_equal(trace["z"].log_prob, -z)
    # Coix dicts declare no plates, so no dim indexes particles: the default
    # weight is the observed site's log density summed to one number.
    assert trace["z"].plates == ()
    np.testing.assert_array_equal(metrics.log_weight, jnp.float32(N))
    with pytest.raises(TypeError, match="empirical: expected a Trace, got list"):
        coix.empirical((), [1, 2], None)


# ---------------------------------------------------------------------------
# latents.
# ---------------------------------------------------------------------------


def test_latents_substitute_values_and_are_scored(mode):
    value = jnp.linspace(-1.0, 1.0, N)
    out, trace, metrics = run(target, mode=mode, latents={"z": value})
    np.testing.assert_array_equal(trace["z"].value, value)
    np.testing.assert_array_equal(out[0], value)
    np.testing.assert_allclose(
        trace["z"].log_prob, dist.Normal(0.0, 1.0).log_prob(value), rtol=1e-6
    )
    np.testing.assert_allclose(
        trace["y"].log_prob, dist.Normal(value, 0.5).log_prob(Y), rtol=1e-6
    )
    np.testing.assert_allclose(metrics.log_weight, trace["y"].log_prob, rtol=1e-6)


def test_fully_substituted_program_needs_no_key():
    value = jnp.zeros(N)
    _, trace, _ = coix.traced_evaluate(target, latents={"z": value})()
    np.testing.assert_array_equal(trace["z"].value, value)
    with pytest.raises(ValueError, match="site 'z' needs a PRNG key"):
        coix.traced_evaluate(target)()


def test_latents_that_name_no_latent_site_raise():
    with pytest.raises(
        ValueError,
        match=r"latents=\['w'\] name no latent site of the program "
        r"\(its latent sites: \['z'\]\)",
    ):
        run(target, latents={"w": jnp.zeros(N)})
    with pytest.raises(ValueError, match="latent site 'y' that the target observes"):
        run(target, latents={"y": jnp.zeros(N)})
    with pytest.raises(ValueError, match=r"site 'z': the proposal's value has shape"):
        run(target, latents={"z": jnp.zeros(N + 1)})


# ---------------------------------------------------------------------------
# Default metrics of an unweighted program.
# ---------------------------------------------------------------------------


def test_default_metrics_weigh_each_particle_by_its_observed_sites(mode):
    _, trace, metrics = run(target, mode=mode)
    z = np.asarray(trace["z"].value, np.float64)
    log_lik = np.asarray(dist.Normal(z, 0.5).log_prob(Y), np.float64)
    log_prior = np.asarray(dist.Normal(0.0, 1.0).log_prob(z), np.float64)
    np.testing.assert_allclose(metrics.log_weight, log_lik, rtol=1e-6)
    np.testing.assert_allclose(
        metrics.log_Z, np.logaddexp.reduce(log_lik) - np.log(N), rtol=1e-6
    )
    w = np.exp(log_lik - log_lik.max())
    np.testing.assert_allclose(metrics.ess, w.sum() ** 2 / np.sum(w**2), rtol=1e-5)
    np.testing.assert_allclose(
        metrics.log_density, np.mean(log_prior + log_lik), rtol=1e-6
    )
    assert float(metrics.loss) == 0.0 and not bool(metrics.resampled)


def test_default_metrics_keep_a_data_plate_that_every_site_spans(mode):
    x = jnp.array([0.5, -1.0, 2.0])

    def local_latents():
        with numpyro.plate("particles", N, dim=-2):
            with numpyro.plate("data", D, dim=-1):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0))
                numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        return (z,)

    _, trace, metrics = run(local_latents, mode=mode)
    z = np.asarray(trace["z"].value, np.float64)
    assert z.shape == (N, D)
    log_lik = np.asarray(dist.Normal(z, 1.0).log_prob(np.asarray(x)), np.float64)
    log_prior = np.asarray(dist.Normal(0.0, 1.0).log_prob(z), np.float64)
    np.testing.assert_allclose(metrics.log_weight, log_lik, rtol=1e-6)
    log_z = np.logaddexp.reduce(log_lik, axis=0) - np.log(N)
    np.testing.assert_allclose(metrics.log_Z, np.sum(log_z), rtol=1e-6)
    w = np.exp(log_lik - log_lik.max(0))
    ess = w.sum(0) ** 2 / np.sum(w**2, axis=0)
    np.testing.assert_allclose(metrics.ess, np.mean(ess), rtol=1e-5)
    np.testing.assert_allclose(
        metrics.log_density, np.sum(np.mean(log_prior + log_lik, axis=0)), rtol=1e-6
    )


def test_unweighted_program_without_observations_has_zero_weights():
    _, _, metrics = run(proposal)
    np.testing.assert_array_equal(metrics.log_weight, np.zeros(N))
    assert float(metrics.ess) == pytest.approx(N)
    assert float(metrics.log_Z) == pytest.approx(0.0, abs=1e-6)


def test_metrics_is_a_fixed_record_that_reads_like_a_dict():
    # Moved from test_core.py.
    _, _, metrics = run(coix.propose(target, proposal, loss_fn=loss.elbo_loss))
    assert list(metrics)[:5] == ["log_weight", "ess", "log_Z", "loss", "log_density"]
    assert metrics["loss"] is metrics.loss
    metrics["log_Z"] = metrics["log_Z"] / 2  # Coix scripts rescale in place
    metrics["extra"] = jnp.ones(())
    assert "extra" in metrics and set(dict(metrics)) >= {"ess", "extra"}
    unweighted = run(proposal)[2]
    assert set(unweighted) == {
        "log_weight",
        "ess",
        "log_Z",
        "loss",
        "log_density",
        "resampled",
    }
    np.testing.assert_allclose(unweighted.log_weight, jnp.zeros(N))
    assert float(unweighted.ess) == pytest.approx(N)
