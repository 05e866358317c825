"""The AESMC-vs-IWAE LGSSM program against closed forms and the Kalman filter.

* The exact reference (Kalman filter) equals a dense Gaussian computation and
  is invariant under ``b -> -b``.
* The IWAE program's whole-trajectory log weights equal a hand computation
  from the recorded paths (learned and bootstrap proposals), with and
  without ``jit``.
* Statistical checks at small ``T``, with tolerances of five Monte Carlo
  standard errors of independent runs (valid for any seed): ``Z-hat / Z``
  has mean 1 for every method, and ``grad Z-hat / Z`` has mean ``grad log Z``
  (Kalman) in ``(a, b)`` and 0 in the proposal parameters for the unbiased
  estimators (IWAE, and SMC with the score-gradient resampling).
* The program's smoke run (a subprocess started at once, with fast XLA
  compilation) writes its figure and a finite metrics record.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from program_runs import start_smoke_run, stop

import combinators
from programs import aesmc_lgssm as al


@pytest.fixture(scope="module", autouse=True)
def smoke_process(tmp_path_factory):
    """Starts the smoke run in a subprocess at once; the other tests run meanwhile."""
    out = tmp_path_factory.mktemp("aesmc_lgssm")
    process = start_smoke_run("aesmc_lgssm", 2, out)
    yield process, out
    stop(process)


def _theta(a, b):
    return {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}


def _good_phi(a, b, shift=0.003):
    """Near the locally optimal proposal of ``(a, b)``, mean shifted by ``shift``."""
    r = al.EMISSION_SD**2
    phi = {
        "v0": b / (b * b + r),
        "c0": shift,
        "u": a * r / (b * b + r) + shift,
        "v": b / (b * b + r),
        "c": shift,
    }
    return {name: jnp.asarray(value, jnp.float32) for name, value in phi.items()}


def _normal_log_pdf(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)


def test_kalman_reference_matches_dense_gaussian_and_sign_symmetry():
    num_steps, a, b = 6, 0.7, 1.3
    _, ys = al.simulate(jax.random.key(0), num_steps)
    # x = M eps with M[t, k] = a^(t - k) for k <= t; y = b x + noise.
    t = np.arange(num_steps)
    powers = np.where(t[:, None] >= t[None, :], a ** (t[:, None] - t[None, :]), 0.0)
    cov = b**2 * powers @ powers.T + al.EMISSION_SD**2 * np.eye(num_steps)
    y = np.asarray(ys, np.float64)
    _, log_det = np.linalg.slogdet(cov)
    dense = -0.5 * (
        y @ np.linalg.solve(cov, y) + log_det + num_steps * np.log(2 * np.pi)
    )
    kalman = float(al.exact_log_likelihood(_theta(a, b), ys))
    assert kalman == pytest.approx(dense, abs=2e-3)
    assert float(al.exact_log_likelihood(_theta(a, -b), ys)) == pytest.approx(kalman)
    np.testing.assert_allclose(
        al.smoothing_means(_theta(a, -b), ys),
        -al.smoothing_means(_theta(a, b), ys),
        atol=1e-6,
    )
    assert al.distance_to_truth(0.9, -1.0) == 0.0
    assert al.distance_to_truth(0.6, 1.4) == pytest.approx(0.5)


@pytest.mark.parametrize("bootstrap", [False, True], ids=["learned", "bootstrap"])
def test_iwae_log_weights_equal_hand_computation(bootstrap):
    num_steps, num_particles = 5, 4
    _, ys = al.simulate(jax.random.key(1), num_steps)
    theta = _theta(0.6, 0.8)
    phi = al.init_proposal_params(jax.random.key(2))
    model = al.Model(theta, phi, ys, num_particles, bootstrap)
    program = al.importance_sampler(model, record=lambda out, trace, metrics: out[0])

    def evaluate(key):
        _, _, metrics = combinators.traced_evaluate(program, seed=key)()
        return metrics["history"].records, metrics["log_weight"], metrics["log_Z"]

    key = jax.random.key(3)
    paths, log_weight, log_z = jax.jit(evaluate)(key)
    eager = evaluate(key)
    for jitted, plain in zip((paths, log_weight, log_z), eager, strict=True):
        np.testing.assert_allclose(jitted, plain, rtol=1e-5, atol=1e-3)

    x = np.asarray(paths, np.float64)  # (T, K)
    y = np.asarray(ys, np.float64)[:, None]
    a, b = 0.6, 0.8
    p = {name: float(value) for name, value in phi.items()}
    x_prev = np.concatenate([np.zeros((1, num_particles)), x[:-1]])
    hand = _normal_log_pdf(y, b * x, al.EMISSION_SD)
    if not bootstrap:  # the transition cancels against the bootstrap proposal
        loc_q = p["u"] * x_prev + p["v"] * y + p["c"]
        loc_q[0] = p["v0"] * y[0, 0] + p["c0"]
        hand = hand + _normal_log_pdf(x, a * x_prev, 1.0)
        hand = hand - _normal_log_pdf(x, loc_q, al.PROPOSAL_SD)
    hand = hand.sum(axis=0)
    np.testing.assert_allclose(log_weight, hand, rtol=1e-4, atol=1e-2)
    expected_log_z = np.logaddexp.reduce(hand) - math.log(num_particles)
    assert float(log_z) == pytest.approx(expected_log_z, rel=1e-4, abs=1e-2)


@pytest.mark.parametrize("method", al.METHODS)
def test_z_hat_and_its_gradient_against_kalman(method):
    """``E[Z-hat] = Z``; unbiased estimators: ``E[grad Z-hat] = grad Z``."""
    num_steps, num_particles, num_runs = 5, 16, 1000
    a, b = 0.7, 1.2  # not the truth: the gradient is far from 0
    _, ys = al.simulate(jax.random.key(11), num_steps)
    params = {"theta": _theta(a, b), "phi": _good_phi(a, b)}
    log_z = float(al.exact_log_likelihood(params["theta"], ys))
    grad_log_z = jax.grad(al.exact_log_likelihood)(params["theta"], ys)

    def one(key):
        return jax.value_and_grad(
            lambda p: al.estimate(p, key, ys, num_particles, method)[0]
        )(params)

    keys = jax.random.split(jax.random.key(5), num_runs)
    log_z_hat, grads = jax.jit(jax.vmap(one))(keys)
    ratio = np.exp(np.asarray(log_z_hat, np.float64) - log_z)

    def check(values, expected, what):
        mean = values.mean()
        se = values.std(ddof=1) / math.sqrt(num_runs)
        assert abs(mean - expected) < 5 * se + 1e-6, (what, mean, expected, se)

    check(ratio, 1.0, "Z-hat / Z")
    if method == "aesmc":  # the ancestor draws' score is dropped: biased
        return
    # grad Z-hat / Z = (Z-hat / Z) grad log Z-hat has mean grad log Z.
    for name, value in grads["theta"].items():
        values = ratio * np.asarray(value, np.float64)
        check(values, float(grad_log_z[name]), f"d/d{name}")
    # Z does not depend on the proposal: grad_phi Z-hat has mean 0.
    for name, value in grads["phi"].items():
        check(ratio * np.asarray(value, np.float64), 0.0, f"d/d{name}")


def test_smoke_run_writes_a_finite_record(smoke_process):
    process, out = smoke_process
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout + stderr
    assert "aesmc_lgssm: T=" in stdout
    assert (out / "aesmc_lgssm.png").exists()
    record = json.loads((out / "aesmc_lgssm_metrics.json").read_text())
    metrics = record["metrics"]
    assert all(math.isfinite(value) for value in metrics.values())
    for setting in al.SETTINGS:
        for method in al.METHODS:
            for name in ("distance", "log_lik_gap", "ess"):
                assert f"{setting}_{method}_{name}_mean" in metrics
    assert "learned_aesmc_score_posterior_l2_se" in metrics
    steps = record["steps"]
    curve = record["curves"]["learned"]["iwae"]
    assert np.shape(curve["a"]) == (record["num_seeds"], steps + 1)
    # Every chain starts at (a, b) = (0, 0).
    assert np.all(np.asarray(curve["a"])[:, 0] == 0.0)
    assert np.shape(curve["posterior_l2"]) == (
        record["num_seeds"],
        len(record["eval_steps"]),
    )
