"""Sharding particles (and data) across devices gives the single-device results.

``tests/sharding_cases.py`` runs each program twice in a fresh interpreter
with four simulated CPU devices (the device count is fixed when JAX starts,
and this process has already started it): once unmodified on one device,
once with the particle plate (and a data plate) split over a device mesh by
:func:`combinators.sharding.shard_plates`, with the same key and the same
``jax_threefry_partitionable`` setting. Here we check that the two runs
agree and that the second one really ran sharded.

Tolerances. Draws, particle values and ancestor indices are computed
element by element from the same random bits, so they agree exactly (up to
``ELEMENTWISE`` for safety). Reductions over particles (log-sum-exp, ESS,
losses, gradients) are summed per device and then across devices: the same
terms added in a different order, which in float32 changes the result by a
few units in the last place of the largest term. ``REDUCED_RTOL`` allows 1e-5
relative to the largest magnitude in the array (measured: at most 5e-7;
log Z and the losses came out bit-identical).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.sharding import AxisType

import combinators as coix
from combinators.loss import iwae_loss
from combinators.sharding import shard_plates

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "sharding_cases.py"
NUM_DEVICES = 4
ELEMENTWISE = dict(rtol=1e-6, atol=1e-6)
REDUCED_RTOL = 1e-5


def run_cases(*names: str) -> dict:
    """Runs cases of ``sharding_cases.py`` on four simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, str(CASES), *names],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"sharding_cases.py {' '.join(names)} exited with {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_reduced_close(sharded, single, name=""):
    """Equal up to float32 reassociation of sums over particles."""
    single = np.asarray(single, np.float64)
    scale = max(np.max(np.abs(single)), 1e-30)
    np.testing.assert_allclose(
        sharded, single, rtol=REDUCED_RTOL, atol=REDUCED_RTOL * scale, err_msg=name
    )


def assert_grads_close(sharded, single):
    assert len(sharded) == len(single)
    for index, (a, b) in enumerate(zip(sharded, single, strict=True)):
        assert_reduced_close(a, b, f"gradient leaf {index}")


def assert_sharded(info, spec, shard_shape):
    assert info["spec"] == spec
    assert info["num_shards"] == NUM_DEVICES
    assert info["shard_shape"] == shard_shape


# ---------------------------------------------------------------------------
# (1) importance sampling, particles over a 1-D mesh
# ---------------------------------------------------------------------------


def test_importance_sampling_iwae_log_Z_loss_and_gradients():
    result = run_cases("importance", "errors")
    single, sharded = result["importance"]["single"], result["importance"]["sharded"]
    info = result["importance"]["info"]

    np.testing.assert_allclose(sharded["z"], single["z"], **ELEMENTWISE)
    np.testing.assert_allclose(
        sharded["log_weight"], single["log_weight"], **ELEMENTWISE
    )
    for name in ("log_Z", "loss", "ess"):
        assert_reduced_close(sharded[name], single[name], name)
    assert sharded["loss"] == pytest.approx(-sharded["log_Z"])  # iwae_loss = -log Z-hat
    assert_grads_close(sharded["grads"], single["grads"])
    for name, value in single["summary"].items():  # ESS, log Z, MCSE, k-hat
        assert_reduced_close(sharded["summary"][name], value, name)

    # The particles were drawn and weighted 16 per device ...
    assert info["single_z_devices"] == 1
    assert_sharded(info["z"], "P('particles',)", [16, 3])
    assert_sharded(info["log_weight"], "P('particles',)", [16])
    assert info["local_random_bits"] and not info["full_particle_arrays"]
    # ... and log-sum-exp (and its gradient) reduce across devices.
    assert info["collectives"]["all-reduce"] >= 1
    # Without shard_plates, replicated inputs and a scalar output leave the
    # partitioner nothing to split: every device computes every particle.
    assert sum(info["collectives_without_shard_plates"].values()) == 0

    # XLA would replicate a plate that does not split evenly; we refuse it.
    assert "not a multiple of the 4 devices" in result["errors"]["uneven"]


def test_random_draws_depend_on_threefry_setting_not_on_sharding():
    result = run_cases("prng")["prng"]
    for flag in ("True", "False"):
        np.testing.assert_array_equal(result[flag]["sharded"], result[flag]["single"])
    # The two settings draw different numbers from the same key, so runs to be
    # compared must use the same setting; only the partitionable one draws
    # each device's block without communication.
    assert not np.allclose(result["True"]["single"], result["False"]["single"])
    assert sum(result["True"]["collectives"].values()) == 0
    assert sum(result["False"]["collectives"].values()) > 0


# ---------------------------------------------------------------------------
# (2) resampling a sharded particle axis
# ---------------------------------------------------------------------------


def test_resampling_sharded_particles_gives_same_ancestors_and_particles():
    result = run_cases("resampling")["resampling"]
    indices = result["indices"]
    assert set(indices["single"]) == set(coix.resampling.SCHEMES)
    for method, single in indices["single"].items():
        np.testing.assert_array_equal(
            indices["sharded"][method], single, err_msg=method
        )

    programs = result["programs"]
    for method, single in programs["single"].items():
        sharded = programs["sharded"][method]
        np.testing.assert_allclose(sharded["z"], single["z"], **ELEMENTWISE)
        assert_reduced_close(sharded["log_Z"], single["log_Z"], method)
        assert_reduced_close(sharded["log_weight"], single["log_weight"], method)
    assert programs["info"]["collectives"]["all-gather"] >= 1  # the cdf


# ---------------------------------------------------------------------------
# (3) SMC (programs/lgssm.py bootstrap filter, adaptive resampling)
# ---------------------------------------------------------------------------


def test_smc_log_Z_and_ess_on_lgssm():
    result = run_cases("smc")["smc"]
    single, sharded = result["single"], result["sharded"]
    # Both branches of adaptive resampling ran, on the same steps.
    assert any(single["resampled"]) and not all(single["resampled"])
    assert sharded["resampled"] == single["resampled"]
    np.testing.assert_allclose(sharded["x"], single["x"], **ELEMENTWISE)
    for name in ("log_Z", "log_Z_increment", "ess", "filtering_mean"):
        assert_reduced_close(sharded[name], single[name], name)
    assert_sharded(result["info"]["x"], "P('particles',)", [16, 2])
    assert result["info"]["collectives"]["all-reduce"] >= 1


def test_tempered_smc_with_mcmc_moves_on_sharded_particles():
    """Resample-move levels (MALA, the moves preconditioned by the particles'
    spread, a reduction across devices) give the single-device run."""
    result = run_cases("tempered")["tempered"]
    single, sharded = result["single"], result["sharded"]
    np.testing.assert_allclose(sharded["z"], single["z"], rtol=1e-5, atol=1e-5)
    for name in ("log_Z", "accept_rate"):
        assert_reduced_close(sharded[name], single[name], name)
    assert 0.2 < min(single["accept_rate"])
    assert_sharded(result["info"]["z"], "P('particles',)", [16, 3])
    assert result["info"]["collectives"]["all-reduce"] >= 1


# ---------------------------------------------------------------------------
# (4) particles x data on a 2-D mesh
# ---------------------------------------------------------------------------


def test_vae_particles_by_data_on_2d_mesh_and_vae_moons_data_parallel():
    result = run_cases("vae_2d", "vae_moons_data_parallel")
    vae = result["vae_2d"]
    single, sharded = vae["single"], vae["sharded"]
    np.testing.assert_allclose(sharded["z"], single["z"], **ELEMENTWISE)
    for name in ("loss", "log_Z", "ess"):
        assert_reduced_close(sharded[name], single[name], name)
    assert_grads_close(sharded["grads"], single["grads"])
    # z has shape (K=8 particles, B=16 data, 2): each device holds 4 x 8.
    assert_sharded(vae["info"]["z"], "P('particles', 'data')", [4, 8, 2])
    assert vae["info"]["collectives"]["all-reduce"] >= 1

    # programs/vae_moons.py unchanged; only its batch is placed on devices.
    moons = result["vae_moons_data_parallel"]
    for name in ("loss", "log_Z"):
        assert_reduced_close(moons["sharded"][name], moons["single"][name], name)
    assert_grads_close(moons["sharded"]["grads"], moons["single"]["grads"])
    assert_sharded(moons["info"]["log_weight"], "P(('particles', 'data'),)", [16])
    assert moons["info"]["collectives"]["all-reduce"] >= 1


# ---------------------------------------------------------------------------
# shard_plates on one device: same trace; eager validation
# ---------------------------------------------------------------------------


def one_device_mesh(axis_type=AxisType.Auto):
    return jax.make_mesh((1,), ("particles",), axis_types=(axis_type,))


def target(y):
    with numpyro.plate("particles", 8):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=y)
    return (z,)


def proposal(y):
    del y
    with numpyro.plate("particles", 8):
        z = numpyro.sample("z", dist.Normal(0.3, 1.2))
    return (z,)


def test_shard_plates_keeps_the_trace_and_metrics():
    mesh = one_device_mesh()
    axes = {"particles": "particles"}
    sharded = coix.propose(
        shard_plates(target, mesh, axes),
        shard_plates(proposal, mesh, axes),
        loss_fn=iwae_loss,
    )
    plain = coix.propose(target, proposal, loss_fn=iwae_loss)
    key = jax.random.key(0)
    _, trace, metrics = jax.jit(lambda k: coix.traced_evaluate(sharded, seed=k)(1.3))(
        key
    )
    _, plain_trace, plain_metrics = coix.traced_evaluate(plain, seed=key)(1.3)
    # Same sites with the same static metadata (plates, observed, reparameterized).
    assert jax.tree_util.tree_structure(trace) == jax.tree_util.tree_structure(
        plain_trace
    )
    np.testing.assert_allclose(trace["z"].value, plain_trace["z"].value, rtol=1e-6)
    np.testing.assert_allclose(
        trace["y"].log_prob, plain_trace["y"].log_prob, rtol=1e-6
    )
    np.testing.assert_allclose(metrics["log_Z"], plain_metrics["log_Z"], rtol=1e-6)


def test_shard_plates_validates_mesh_and_axes():
    axes = {"particles": "particles"}
    with pytest.raises(ValueError, match="AxisType.Auto"):
        shard_plates(target, one_device_mesh(AxisType.Explicit), axes)
    with pytest.raises(ValueError, match="mesh has axes"):
        shard_plates(target, one_device_mesh(), {"particles": "data"})
    with pytest.raises(ValueError, match="given to both plate"):
        shard_plates(
            target, one_device_mesh(), {"particles": "particles", "data": "particles"}
        )
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        shard_plates(target, "mesh", axes)
    with pytest.raises(TypeError, match="program"):
        shard_plates(None, one_device_mesh(), axes)


def test_shard_plates_around_a_combinator_raises():
    wrapped = shard_plates(
        coix.propose(target, proposal), one_device_mesh(), {"particles": "particles"}
    )
    with pytest.raises(ValueError, match="wrap the programs given to the combinator"):
        coix.traced_evaluate(wrapped, seed=jax.random.key(0))(1.3)
