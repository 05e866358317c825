"""The sigmoid belief network program (programs/sbn.py).

* The programs' log densities and log weights equal a hand computation
  (numpy, float64) for the discrete and the relaxed pair.
* ``exact_log_likelihood`` equals a brute-force sum over the 2^H states.
* The K-sample IWAE estimate ``log p-hat_K = log (1/K) sum_k w_k`` on a tiny
  SBN (H = 4 latent units, D = 6 pixels) is checked against the exact
  ``log p(x)`` from enumerating the 16 latent states. With ``M``
  independent replicates (a data plate of ``M`` copies of ``x``, one
  column each) and their standard error ``SE``:

  - every K: ``mean <= log p(x) + C SE`` (a lower bound in expectation);
  - K = 1: ``|mean - ELBO| <= C SE`` with the ELBO by enumeration;
  - K = 1000: ``0 <= log p(x) - mean <= sigma^2 / K + C SE`` up to
    ``C SE``, where ``sigma^2 = Var_q(w / p(x))`` is computed exactly; the
    delta method gives the bias ``sigma^2 / (2K) + O(K^-2)``, so twice it
    is a safe ceiling. The ceiling is below 0.01 nats here, while the
    K = 1 gap is above 0.5 nats: the estimate converges.

  ``C = 5``: a two-sided normal tail of 6e-7 per check, so the tests pass
  for any seed.
* Each of the six estimators trains for a few steps with finite parameters
  and no skipped step; NVIL's moments move.
* A smoke run of ``run()`` writes its PNG and JSON.

Runtime: about 20 s on 2 busy cores, serially or with ``pytest -n 2``.
"""

from __future__ import annotations

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy.special import logsumexp as jax_logsumexp

import combinators as coix
from combinators import amortized
from combinators.train import train
from programs import data, sbn

C = 5.0
H, D = 4, 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST_COMPILE = {"xla_backend_optimization_level": 0}

TINY = sbn.make_sbn(num_latent=H, num_pixels=D, temperature=0.5)
PARAMS = {
    "p": {
        "b": jnp.array([-0.4, 0.3, 0.9, -1.2]),
        "W": jnp.array(
            [
                [2.0, -1.5, 0.5, 1.0, -0.7, 0.2],
                [-1.0, 1.8, -0.3, 0.6, 1.2, -2.0],
                [0.4, 0.2, 1.7, -1.6, 0.1, 0.9],
                [-0.8, -0.6, 0.3, 1.4, -1.9, 1.1],
            ]
        ),
        "c": jnp.array([-0.5, 0.2, -0.1, 0.3, 0.0, -0.4]),
    },
    # A deliberately imperfect inference network, so that the ELBO is well
    # below log p(x) and the bound has something to converge over.
    "q": {
        "U": jnp.array(
            [
                [0.6, -0.3, 0.2, 0.0],
                [-0.2, 0.5, 0.0, 0.1],
                [0.1, 0.0, 0.4, -0.3],
                [0.0, 0.2, -0.4, 0.3],
                [-0.3, 0.1, 0.0, -0.2],
                [0.2, -0.2, 0.3, 0.1],
            ]
        ),
        "d": jnp.array([-0.4, 0.3, -0.5, 0.7]),
    },
}
X = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
STATES = np.array(list(itertools.product([0.0, 1.0], repeat=H)))  # (16, H)


def np_params(params):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def log_sigmoid(a):
    return -np.logaddexp(0.0, -a)


def bernoulli_lp(v, logits):
    """``sum_i v_i log sigmoid(a_i) + (1 - v_i) log sigmoid(-a_i)``."""
    return np.sum(v * log_sigmoid(logits) + (1 - v) * log_sigmoid(-logits), axis=-1)


def logistic_lp(z, loc, scale):
    u = (z - loc) / scale
    return np.sum(-u - 2.0 * np.logaddexp(0.0, -u) - np.log(scale), axis=-1)


def hand_log_joint(p, x, h):
    """``log p(h) + log p(x | h)`` for the SBN."""
    return bernoulli_lp(h, p["b"]) + bernoulli_lp(x, h @ p["W"] + p["c"])


def hand_log_q(q, x, h):
    return bernoulli_lp(h, x @ q["U"] + q["d"])


def enumerate_tiny(x):
    """``log p(x, s)`` and ``log q(s | x)`` for all 16 states, float64."""
    p = np_params(PARAMS)
    x = np.asarray(x, np.float64)
    return hand_log_joint(p["p"], x, STATES), hand_log_q(p["q"], x, STATES)


def evaluated(program, seed, *args):
    """``traced_evaluate(program, seed=key(seed))(*args)``, compiled quickly.

    One compiled call costs less here than the many small eager ones.
    """
    key = jax.random.key(seed)
    fn = jax.jit(lambda k, *a: coix.traced_evaluate(program, seed=k)(*a))
    return fn.lower(key, *args).compile(compiler_options=FAST_COMPILE)(key, *args)


def logsumexp(a):
    m = np.max(a)
    return m + np.log(np.sum(np.exp(a - m)))


# ---------------------------------------------------------------------------
# The programs against a hand computation.
# ---------------------------------------------------------------------------


def test_log_joint_and_log_weight_equal_a_hand_computation():
    x = jnp.stack([X, 1.0 - X, jnp.ones(D)])  # B = 3 images
    k = 4
    program = amortized.make_program(
        TINY.model, TINY.guide, amortized.AmortizedParams(**PARAMS), k, loss_fn=None
    )
    _, trace, metrics = evaluated(program, 0, x)
    h = np.asarray(trace["h"].value, np.float64)
    assert h.shape == (k, 3, H) and set(np.unique(h)) <= {0.0, 1.0}
    p = np_params(PARAMS)
    xs = np.asarray(x, np.float64)
    log_joint = hand_log_joint(p["p"], xs, h)  # (k, 3)
    program_joint = np.asarray(trace["h"].log_prob) + np.asarray(trace["x"].log_prob)
    np.testing.assert_allclose(program_joint, log_joint, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        metrics.log_weight, log_joint - hand_log_q(p["q"], xs, h), rtol=1e-5, atol=1e-5
    )
    # The generative program alone samples h from the prior and scores x.
    _, model_trace, _ = evaluated(TINY.model.program(PARAMS["p"], k), 1, x)
    h0 = np.asarray(model_trace["h"].value, np.float64)
    total = np.asarray(model_trace["h"].log_prob) + np.asarray(
        model_trace["x"].log_prob
    )
    np.testing.assert_allclose(
        total, hand_log_joint(p["p"], xs, h0), rtol=1e-5, atol=1e-5
    )


def test_relaxed_log_weight_equals_a_hand_computation():
    # Binary Concrete in logit space: z ~ Logistic(logits / t, 1 / t); the
    # likelihood sees sigmoid(z).
    k, t = 3, TINY.temperature
    x = X[None]
    program = amortized.make_program(
        TINY.relaxed_model,
        TINY.relaxed_guide,
        amortized.AmortizedParams(**PARAMS),
        k,
        loss_fn=None,
    )
    _, trace, metrics = evaluated(program, 2, x)
    z = np.asarray(trace["h"].value, np.float64)
    p = np_params(PARAMS)
    xs = np.asarray(x, np.float64)
    y = 1.0 / (1.0 + np.exp(-z))
    log_p = logistic_lp(z, p["p"]["b"] / t, 1 / t) + bernoulli_lp(
        xs, y @ p["p"]["W"] + p["p"]["c"]
    )
    log_q = logistic_lp(z, (xs @ p["q"]["U"] + p["q"]["d"]) / t, 1 / t)
    np.testing.assert_allclose(metrics.log_weight, log_p - log_q, rtol=1e-4, atol=1e-4)


def test_exact_log_likelihood_is_the_sum_over_all_states():
    x = jnp.stack([X, 1.0 - X, jnp.zeros(D)])
    expected = [logsumexp(enumerate_tiny(row)[0]) for row in np.asarray(x)]
    for chunk in (4, 16, 4096):  # several blocks, one block, clipped to 2^H
        got = sbn.exact_log_likelihood(TINY, PARAMS["p"], x, chunk=chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# The IWAE bound against the exact log-likelihood.
# ---------------------------------------------------------------------------


def iwae_replicates(num_particles, num_replicates, seed):
    """``log p-hat_K`` for ``num_replicates`` independent sets of K weights."""

    def estimates(key, copies):
        log_w = amortized.log_weights(
            TINY.model,
            TINY.guide,
            amortized.AmortizedParams(**PARAMS),
            key,
            copies,
            num_particles,
        )  # (K, M): one column per replicate
        assert log_w.shape == (num_particles, num_replicates)
        return jax_logsumexp(log_w, axis=0) - math.log(num_particles)

    copies = jnp.broadcast_to(X, (num_replicates, D))
    key = jax.random.key(seed)
    compiled = (
        jax.jit(estimates).lower(key, copies).compile(compiler_options=FAST_COMPILE)
    )
    return np.asarray(compiled(key, copies), np.float64)


def test_iwae_is_a_lower_bound_converging_to_the_exact_log_likelihood():
    log_joint, log_q = enumerate_tiny(X)
    log_px = logsumexp(log_joint)
    q = np.exp(log_q)
    elbo = np.sum(q * (log_joint - log_q))
    # sigma^2 = Var_q(w / p(x)) = sum_h p(x, h)^2 / (q(h) p(x)^2) - 1.
    sigma2 = np.sum(np.exp(2 * (log_joint - log_px) - log_q)) - 1.0
    assert log_px - elbo > 0.5  # the K = 1 bound is loose

    means = {}
    for k, m, seed in ((1, 20_000, 0), (10, 4000, 1), (1000, 400, 2)):
        est = iwae_replicates(k, m, seed)
        mean, se = est.mean(), est.std(ddof=1) / math.sqrt(m)
        means[k] = mean
        print(f"\n[iwae] K={k:5d}: mean {mean:.4f} +- {se:.4f}, log p(x) {log_px:.4f}")
        assert mean <= log_px + C * se  # a lower bound in expectation
        if k == 1:
            assert abs(mean - elbo) <= C * se
        if k == 1000:
            ceiling = sigma2 / k
            assert ceiling < 0.01
            assert -C * se <= log_px - mean <= ceiling + C * se
            assert C * se < 0.02  # the check is tight
    assert means[1] < means[10] < means[1000]

    # evaluate() (chunked amortized.bounds) reports the same quantity.
    copies = jnp.broadcast_to(X, (200, D))
    report = sbn.evaluate(TINY, PARAMS, jax.random.key(3), copies, 1000, exact=True)
    np.testing.assert_allclose(report["exact"], log_px, rtol=1e-5)
    assert abs(report["iwae"] - log_px) < 0.02
    assert abs(report["elbo"] - elbo) < 0.1


# ---------------------------------------------------------------------------
# Training with each estimator.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(seed=0)


@pytest.mark.parametrize("name", sbn.ESTIMATORS)
def test_each_estimator_trains_with_finite_parameters(name, digits):
    model = sbn.make_sbn()
    estimator = sbn.make_estimator(name, model, 3)
    params = sbn.init_params(model, jax.random.key(0), digits.x_train.mean(axis=0))
    if estimator.baseline:
        params["baseline"] = sbn.init_baseline(jax.random.key(1), model.num_pixels)
    batches = (
        jnp.asarray(b) for b in data.batches(digits.x_train, batch_size=16, seed=0)
    )
    result = train(
        estimator.loss_fn,
        params,
        optax.adam(1e-2),
        5,
        dataloader=batches,
        progress=False,
        return_result=True,
        jit_compile=lambda f: jax.jit(f, compiler_options=FAST_COMPILE),
        **estimator.init_state,
    )
    assert result.skipped == 0
    assert np.all(np.isfinite(result.history["loss"]))
    leaves = jax.tree_util.tree_leaves(result.params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)
    moved = jax.tree_util.tree_map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), result.params, params
    )
    assert moved["q"]["U"] > 0 and moved["p"]["W"] > 0  # both halves learn
    if name == "nvil":
        assert moved["baseline"]["v"] > 0
        assert float(result.metrics["moments"].mean) < -5.0  # tracks log w (about -25)


def test_estimator_errors():
    model = sbn.make_sbn()
    with pytest.raises(ValueError, match="unknown estimator 'vi'"):
        sbn.make_estimator("vi", model, 5)
    with pytest.raises(ValueError, match="at least 2 particles"):
        sbn.make_estimator("vimco", model, 1)
    with pytest.raises(ValueError, match="2\\^24 latent states"):
        sbn.exact_log_likelihood(sbn.make_sbn(num_latent=24), {}, jnp.zeros((1, 64)))


def test_gradient_moments_of_a_deterministic_gradient_have_no_variance():
    # Wake-sleep's and RWS's *model* gradients vary, but a loss that ignores
    # the key has zero variance and the squared mean of its gradient.
    def loss_fn(params, key, x):
        del key
        return jnp.sum(params["q"]["d"] ** 2) + 0.0 * jnp.sum(x), {}

    estimator = sbn.Estimator("fixed", loss_fn, {}, False, False, 1)
    params = {"p": {}, "q": {"d": jnp.array([1.0, -2.0])}}
    variance, mean_sq = sbn.proposal_gradient_moments(
        estimator, params, {}, jax.random.key(0), jnp.zeros((2, 3)), 4
    )
    assert float(variance) == 0.0
    np.testing.assert_allclose(mean_sq, 4.0 + 16.0)


# ---------------------------------------------------------------------------
# The program's entry point.
# ---------------------------------------------------------------------------


def test_smoke_run_writes_figure_and_metrics(tmp_path):
    out = tmp_path / "out"
    metrics = sbn.run(
        steps=30,
        particles=3,
        seed=0,
        out=str(out),
        progress=False,
        estimator="vimco",
        iwae_particles=20,
        variance_draws=4,
        fast_compile=True,
    )
    assert (out / "sbn_vimco.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((out / "sbn_vimco_metrics.json").read_text())
    assert record["steps"] == 30 and record["particles"] == 3
    assert record["iwae_particles"] == 20 and record["estimator"] == "vimco"
    assert record["metrics"] == pytest.approx(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["skipped_steps"] == 0
    # Both bounds come from the same weights: mean log w <= log mean w.
    assert metrics["test_elbo"] <= metrics["test_iwae"]
    # 30 steps raise the exact log-likelihood (by 0.2 nats on seed 0).
    assert metrics["test_log_likelihood"] > metrics["initial_test_log_likelihood"]
    assert (
        record["checkpoints"]["step"][0] == 0
        and record["checkpoints"]["step"][-1] == 30
    )
