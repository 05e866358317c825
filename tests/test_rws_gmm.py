"""The Gaussian-mixture reproduction of Le et al. (2019) (programs/rws_gmm).

* The true and initial mixtures are the authors'; the enumerated posterior
  and evidence equal Bayes' rule computed by hand (numpy, float64).
* The log weights of ``propose(model, guide)`` equal ``log p(c) + log N(x;
  10 c, 5^2) - log q(c | x)`` by hand, and the defensive proposal's equal
  the same with ``log ((1 - delta) q + delta / 20)``.
* Statistical checks against closed-form gradients. With ``R``
  independent draws of a gradient (``vmap`` over keys), each of its ``P``
  entries is compared with the exact value within ``C`` standard errors
  of the mean of the draws, plus a small allowance for the bias of
  self-normalised importance sampling where it applies. ``C = 6``: a
  two-sided normal tail of ``2e-9`` per entry, ``1e-6`` over every entry
  and test, so the tests pass for any seed.

  - RWS (K = 1000): the wake-phi gradient's mean is the gradient of the
    forward KL ``KL(p(c | x) || q(c | x))`` (the cross-entropy
    ``-sum_c p(c | x) log q(c | x)``, by enumeration), and the
    wake-theta gradient's mean is ``-grad log p(x)``. The bias of
    self-normalised importance sampling is ``O(1 / K)``; the allowance is
    ``0.02`` of the largest exact entry.
  - Defensive RWS (K = 1000): its wake-phi gradient has the same mean, the
    forward-KL gradient of ``q_phi`` (not of the mixture).
  - REINFORCE and VIMCO (K = 2): the mean of the score-function gradient
    is the gradient of the IWAE bound ``E log ((w_1 + w_2) / 2)``, exact
    by enumerating the ``20^2`` particle pairs; no bias allowance
    (both are unbiased).
* Every estimator gives finite gradients in both parameter groups; the
  wake-sleep family gives no ``phi`` gradient through its ``theta`` loss.
* The iteration schedule, the checkpoint layout, the temperature and the
  comparison of the smallest and largest K.
* A smoke run of ``run()`` writes its PNG and JSON with finite metrics,
  which :func:`load_results` reads back.

Runtime: each test under 10 s on one core (compilation dominates).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import combinators as coix
from programs import rws_gmm

C = 6.0
THETA_STAR = rws_gmm.true_theta()
X = jnp.array([3.0, 47.0, 121.0, -8.0])
DELTA = rws_gmm.DEFENSIVE_DELTA


def normal_log_pdf(x, loc, scale):
    z = (x - loc) / scale
    return -0.5 * z * z - math.log(scale) - 0.5 * math.log(2 * math.pi)


def mild_phi(key):
    """An inference network whose ``q(. | x)`` covers every component.

    The last layer is shrunk, so ``q`` is close to uniform and importance
    sampling from it is efficient; the test values stay generic.
    """
    phi = rws_gmm.init_phi(key)
    phi["W3"] = 0.3 * phi["W3"]
    return phi


def flat(tree):
    return jnp.concatenate([v.ravel() for v in jax.tree_util.tree_leaves(tree)])


def assert_mean_matches(draws, exact, allowance=0.0):
    """Every entry: ``|mean - exact| <= C SE + allowance * max |exact|``."""
    draws = np.asarray(draws, np.float64)
    exact = np.asarray(exact, np.float64)
    mean = draws.mean(axis=0)
    se = draws.std(axis=0, ddof=1) / math.sqrt(draws.shape[0])
    tolerance = C * se + allowance * np.max(np.abs(exact)) + 1e-7
    excess = np.abs(mean - exact) - tolerance
    assert np.all(excess <= 0), (
        f"{np.sum(excess > 0)} of {exact.size} entries off; worst by "
        f"{excess.max():.3g} (mean {mean[excess.argmax()]:.4g}, exact "
        f"{exact[excess.argmax()]:.4g}, se {se[excess.argmax()]:.3g})"
    )


# ---------------------------------------------------------------------------
# Model: exact quantities by hand
# ---------------------------------------------------------------------------


def test_true_and_initial_mixtures_are_the_authors():
    counts = np.arange(20) + 5.0
    np.testing.assert_allclose(
        rws_gmm.mixture_probs(THETA_STAR), counts / counts.sum(), rtol=1e-5
    )
    initial = np.asarray(rws_gmm.mixture_probs(rws_gmm.initial_theta()))
    # 0.5 * theta_0 = (19, ..., 0): geometric with ratio 1/e.
    expected = np.exp(-np.arange(20.0)) / np.exp(-np.arange(20.0)).sum()
    np.testing.assert_allclose(initial, expected, rtol=1e-5)
    error = float(rws_gmm.p_error(rws_gmm.initial_theta(), THETA_STAR))
    assert error == pytest.approx(np.linalg.norm(expected - counts / counts.sum()))


def test_posterior_and_evidence_are_bayes_rule_by_hand():
    theta = np.asarray(THETA_STAR, np.float64) + np.linspace(-1.0, 1.0, 20)
    logits = 0.5 * theta
    prior = np.exp(logits - logits.max())
    prior /= prior.sum()
    theta32 = jnp.asarray(theta, jnp.float32)
    posterior, evidence = jax.jit(
        lambda t: (rws_gmm.posterior_probs(t, X), rws_gmm.log_evidence(t, X))
    )(theta32)
    posterior, evidence = np.asarray(posterior), np.asarray(evidence)
    for b, x in enumerate(np.asarray(X, np.float64)):
        joint = [
            prior[c] * math.exp(normal_log_pdf(x, 10.0 * c, 5.0)) for c in range(20)
        ]
        total = sum(joint)
        np.testing.assert_allclose(posterior[b], np.array(joint) / total, atol=1e-6)
        assert evidence[b] == pytest.approx(math.log(total), abs=1e-4)
    np.testing.assert_allclose(posterior.sum(axis=1), 1.0, rtol=1e-6)


def test_q_error_is_the_mean_euclidean_distance_by_hand():
    phi = rws_gmm.init_phi(jax.random.key(0))
    q, p, error = jax.jit(
        lambda phi: (
            rws_gmm.guide_probs(phi, X),
            rws_gmm.posterior_probs(THETA_STAR, X),
            rws_gmm.q_error(phi, THETA_STAR, X),
        )
    )(phi)
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    by_hand = np.mean([np.sqrt(np.sum((q[b] - p[b]) ** 2)) for b in range(len(X))])
    assert float(error) == pytest.approx(by_hand, rel=1e-5)


def test_log_weights_of_the_programs_equal_a_hand_computation():
    phi = rws_gmm.init_phi(jax.random.key(1))
    k = 7
    for guide, log_q_of in [
        (rws_gmm.guide_program(phi, k), lambda q: np.log(q)),
        (
            rws_gmm.defensive_guide_program(phi, k, DELTA),
            lambda q: np.log((1 - DELTA) * q + DELTA / 20),
        ),
    ]:

        def evaluate(key, guide=guide):
            program = coix.propose(rws_gmm.model_program(THETA_STAR, k), guide)
            _, trace, metrics = coix.traced_evaluate(program, seed=key)(X)
            return trace["c"].value, metrics["log_weight"]

        c, log_weight = jax.jit(evaluate)(jax.random.key(2))
        c = np.asarray(c)
        assert c.shape == (k, len(X))
        prior = np.asarray(rws_gmm.mixture_probs(THETA_STAR), np.float64)
        q = np.asarray(rws_gmm.guide_probs(phi, X), np.float64)
        x = np.asarray(X, np.float64)
        expected = np.empty((k, len(X)))
        for i in range(k):
            for b in range(len(X)):
                expected[i, b] = (
                    math.log(prior[c[i, b]])
                    + normal_log_pdf(x[b], 10.0 * c[i, b], 5.0)
                    - log_q_of(q[b, c[i, b]])
                )
        np.testing.assert_allclose(log_weight, expected, atol=2e-4)


# ---------------------------------------------------------------------------
# Estimators: gradients against closed forms
# ---------------------------------------------------------------------------


def _objective_gradients(name, k, params, x, num_draws, seed):
    objective = rws_gmm.make_objective(name, k)

    def draw(key):
        grads = jax.grad(lambda p: objective(p, key, x, 3.0)[0])(params)
        return flat(grads["p"]), flat(grads["q"])

    keys = jax.random.split(jax.random.key(seed), num_draws)
    return jax.jit(jax.vmap(draw))(keys)


def _forward_kl_gradient(params, x):
    posterior = rws_gmm.posterior_probs(params["p"], x)

    def cross_entropy(phi):
        log_q = jax.nn.log_softmax(rws_gmm.guide_logits(phi, x), axis=-1)
        return -jnp.mean(jnp.sum(posterior * log_q, axis=-1))

    return flat(jax.grad(cross_entropy)(params["q"]))


@pytest.mark.parametrize("name", ["rws", "defensive_rws"])
def test_wake_phi_gradient_is_the_forward_kl_gradient_at_large_k(name):
    params = {"p": THETA_STAR, "q": mild_phi(jax.random.key(3))}
    grad_p, grad_q = _objective_gradients(name, 1000, params, X, 48, seed=4)
    assert_mean_matches(grad_q, _forward_kl_gradient(params, X), allowance=0.02)
    # Wake-theta: -grad_theta mean_b log p(x_b) (Fisher's identity).
    exact_p = jax.grad(lambda t: -jnp.mean(rws_gmm.log_evidence(t, X)))(THETA_STAR)
    assert_mean_matches(grad_p, exact_p, allowance=0.02)


def _exact_iwae_gradient(params, x):
    """``grad_phi mean_b E log ((w_1 + w_2) / 2)`` over all ``20^2`` pairs."""

    def bound(phi):
        log_q = jax.nn.log_softmax(rws_gmm.guide_logits(phi, x), axis=-1)  # (B, C)
        log_w = rws_gmm.log_joint_table(params["p"], x) - log_q
        pair = jnp.logaddexp(log_w[:, :, None], log_w[:, None, :]) - math.log(2.0)
        prob = jnp.exp(log_q[:, :, None] + log_q[:, None, :])
        return -jnp.mean(jnp.sum(prob * pair, axis=(1, 2)))

    return flat(jax.grad(bound)(params["q"]))


@pytest.mark.parametrize("name", ["reinforce", "vimco"])
def test_score_function_gradients_are_unbiased_for_the_iwae_bound(name):
    x = X[:2]
    params = {"p": THETA_STAR, "q": mild_phi(jax.random.key(5))}
    _, grad_q = _objective_gradients(name, 2, params, x, 4000, seed=6)
    assert_mean_matches(grad_q, _exact_iwae_gradient(params, x))


@pytest.mark.parametrize("name", rws_gmm.ESTIMATORS)
def test_every_estimator_gives_finite_gradients(name):
    params = {"p": rws_gmm.initial_theta(), "q": rws_gmm.init_phi(jax.random.key(7))}
    objective = rws_gmm.make_objective(name, 3)
    x = rws_gmm.sample_data(jax.random.key(8), THETA_STAR, 5)
    (loss, metrics), grads = jax.jit(
        jax.value_and_grad(
            lambda p: objective(p, jax.random.key(9), x, 2.0), has_aux=True
        )
    )(params)
    assert np.isfinite(float(loss)) and np.isfinite(float(metrics["iwae"]))
    assert np.all(np.isfinite(flat(grads["p"]))) and np.any(flat(grads["p"]) != 0)
    assert np.all(np.isfinite(flat(grads["q"]))) and np.any(flat(grads["q"]) != 0)


def test_wake_theta_part_gives_no_phi_gradient():
    # The wake-sleep family sums a theta loss and a phi loss: the theta loss
    # alone must not move phi, or one Adam would not be two optimisers.
    params = {"p": THETA_STAR, "q": rws_gmm.init_phi(jax.random.key(10))}

    def loss(params):
        program = coix.propose(
            rws_gmm.model_program(params["p"], 4),
            coix.detach(rws_gmm.guide_program(params["q"], 4)),
            loss_fn=coix.loss.rws_wake_theta_loss,
        )
        return coix.traced_evaluate(program, seed=jax.random.key(11))(X)[2]["loss"]

    grads = jax.jit(jax.grad(loss))(params)
    assert np.all(flat(grads["q"]) == 0)
    assert np.any(flat(grads["p"]) != 0)


def test_make_objective_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown estimator"):
        rws_gmm.make_objective("iwae", 2)
    with pytest.raises(ValueError, match="K >= 2"):
        rws_gmm.make_objective("vimco", 1)


# ---------------------------------------------------------------------------
# Experiment plumbing
# ---------------------------------------------------------------------------


def test_schedule_checkpoints_and_temperature():
    from programs.rws_gmm.experiment import schedule

    rows = schedule(num_segments=2, segment_steps=3, grad_draws=2)
    expected = [
        (0, 0, 0), (0, 0, 1), (0, 0, -1), (1, 0, -1), (2, 0, -1),
        (3, 1, 0), (3, 1, 1), (3, 1, -1), (4, 1, -1), (5, 1, -1),
        (6, 2, 0), (6, 2, 1),
    ]  # fmt: skip
    assert [tuple(r) for r in rows] == expected
    assert rws_gmm.checkpoint_layout(100, 20) == (20, 5)
    assert rws_gmm.checkpoint_layout(30, 20) == (15, 2)
    assert rws_gmm.checkpoint_layout(3, 20) == (3, 1)
    assert rws_gmm.temperature_at(0, 10) == 3.0
    assert rws_gmm.temperature_at(10, 10) == 1.0


def test_smoke_run_writes_figure_and_metrics(tmp_path):
    config = dict(rws_gmm.SMOKE_CONFIG)
    config.update(particle_counts=(2,), estimators=("vimco",))
    metrics = rws_gmm.run(**config, seed=0, out=str(tmp_path), progress=False)
    assert (tmp_path / "rws_gmm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "rws_gmm_metrics.json").read_text())
    assert record["steps"] == config["steps"]
    assert record["particle_counts"] == [2]
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    for name in ("vimco",):
        for metric in ("p_error", "q_error", "q_error_model", "grad_sd"):
            assert f"{name}_K2_{metric}" in metrics
            assert f"{name}_K2_{metric}_se" in metrics
        curves = record["curves"][f"{name}_K2"]
        assert len(curves["step"]) == config["num_checkpoints"] + 1
        assert np.asarray(curves["q_error"]).shape == (
            config["num_seeds"],
            config["num_checkpoints"] + 1,
        )
    assert metrics["skipped_steps"] == 0
    record2, results = rws_gmm.load_results(str(tmp_path / "rws_gmm_metrics.json"))
    assert record2 == record
    np.testing.assert_allclose(
        results[("vimco", 2)]["q_error"][:, -1].mean(), metrics["vimco_K2_q_error"]
    )


def test_compare_extremes_by_hand():
    metrics = {
        "rws_K2_q_error": 0.5,
        "rws_K2_q_error_se": 0.03,
        "rws_K20_q_error": 0.3,
        "rws_K20_q_error_se": 0.04,
    }
    difference, se, verdict = rws_gmm.compare_extremes(metrics, "rws", (2, 20))
    assert difference == pytest.approx(-0.2) and se == pytest.approx(0.05)
    assert verdict == "lower"
    metrics["rws_K20_q_error"] = 0.45
    assert rws_gmm.compare_extremes(metrics, "rws", (20, 2))[2] == "no clear change"
    metrics["rws_K20_q_error"] = 0.65
    assert rws_gmm.compare_extremes(metrics, "rws", (2, 20))[2] == "higher"
