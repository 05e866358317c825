"""VIMCO, multi-sample NVIL and RWS at K particles (programs/sbn_particles).

On a tiny SBN (H = 4 latent units, D = 6 pixels, two images) the K = 2
importance weighted bound ``E log (w_1 + w_2) / 2`` and its gradient are
computed exactly by enumerating the 16 x 16 pairs of latent states.

* Unbiasedness (statistical): the mean over ``R`` draws of the VIMCO and
  multi-sample NVIL gradient estimates (with a non-zero baseline network
  and moving mean; moving variance below 1, so no rescaling) equals the
  exact gradient of the bound, every coordinate within ``C = 5`` standard
  errors; for RWS, the model's gradient is the bound's too and the
  inference network's is ``E[sum_k wbar_k grad log q(h_k | x)]``, also by
  enumeration. ``C = 5`` is a two-sided normal tail of 6e-7 per coordinate
  (62 of them), so the checks pass for any seed.
* At K = 1 the multi-sample NVIL gradient equals ``programs.sbn``'s NVIL
  (the ELBO) exactly in the model and the baseline, and differs in the
  inference network by exactly ``(1/B) sum_b grad log q(h_b | x_b)`` (the
  zero-mean term ``wbar grad log w`` that the multi-sample form keeps).
* ``exact_bounds`` equals a brute-force float64 sum over the states (and
  ``programs.sbn.exact_log_likelihood``); ELBO <= log p(x).
* The estimators refuse too few particles; a smoke run writes its outputs.

Runtime: about 25 s in all on one free core.
"""

from __future__ import annotations

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

import combinators as coix
from combinators.loss import SignalMoments, reinforce_loss
from programs import sbn
from programs import sbn_particles as sp

C = 5.0
H, D = 4, 6
DRAWS = 5000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST_COMPILE = {"xla_backend_optimization_level": 0}

TINY = sbn.make_sbn(num_latent=H, num_pixels=D)
X = jnp.array([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]])
STATES = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=H)))  # (16, H)


def tiny_params():
    key_p, key_q, key_b = jax.random.split(jax.random.key(42), 3)
    params = sbn.init_params(TINY, key_p)
    params["p"]["W"] = 1.5 * jax.random.normal(key_p, (H, D))
    params["p"]["b"] = jnp.array([-0.4, 0.3, 0.9, -1.2])
    params["q"]["U"] = 0.8 * jax.random.normal(key_q, (D, H))
    params["q"]["d"] = jnp.array([-0.4, 0.3, -0.5, 0.7])
    baseline = sbn.init_baseline(key_b, D)
    baseline["v"] = jnp.linspace(-1.0, 1.0, baseline["v"].shape[0])
    baseline["v0"] = jnp.asarray(-3.0)
    params["baseline"] = baseline
    return params


PARAMS = tiny_params()
MOMENTS = SignalMoments(mean=jnp.asarray(0.7), variance=jnp.asarray(0.5))


def enumerated(p, q):
    """``log p(x, s)`` and ``log q(s | x)`` for every image and state: ``(B, 16)``."""
    log_joint = TINY.model.prior(p).log_prob(STATES)[None] + jax.vmap(
        lambda s: TINY.model.likelihood(p, s).log_prob(X), out_axes=1
    )(STATES)
    log_q = jax.vmap(
        lambda s: TINY.guide.distribution_fn(q, X).log_prob(s), out_axes=1
    )(STATES)
    return log_joint, log_q


def exact_iwae_k2(params):
    """``(1/B) sum_b E_{h1, h2 ~ q} log (w_1 + w_2) / 2``, by enumeration."""
    log_joint, log_q = enumerated(params["p"], params["q"])
    log_w = log_joint - log_q  # (B, 16)
    pair_log_w = jnp.logaddexp(log_w[:, :, None], log_w[:, None, :]) - math.log(2)
    pair_q = jnp.exp(log_q[:, :, None] + log_q[:, None, :])
    return jnp.mean(jnp.sum(pair_q * pair_log_w, axis=(1, 2)))


def exact_wake_phi_k2(q):
    """``(1/B) sum_b E[sum_k wbar_k log q(h_k | x)]`` with ``wbar`` and ``h`` fixed."""
    log_joint, log_q_fixed = jax.lax.stop_gradient(enumerated(PARAMS["p"], PARAMS["q"]))
    _, log_q = enumerated(PARAMS["p"], q)
    log_w = log_joint - log_q_fixed
    pair = jnp.stack(jnp.broadcast_arrays(log_w[:, :, None], log_w[:, None, :]))
    wbar = jax.nn.softmax(pair, axis=0)  # (2, B, 16, 16)
    pair_q = jnp.exp(log_q_fixed[:, :, None] + log_q_fixed[:, None, :])
    scored = wbar[0] * log_q[:, :, None] + wbar[1] * log_q[:, None, :]
    return jnp.mean(jnp.sum(pair_q * scored, axis=(1, 2)))


def flat(tree):
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])


def gradient_draws(estimator, state):
    """``R`` draws of the ascent direction ``-grad loss`` in ``{"p", "q"}``, flat."""

    def draw(key):
        grads = jax.grad(lambda pr: estimator.loss_fn(pr, key, X, **state)[0])(PARAMS)
        return jnp.concatenate(
            [-jnp.ravel(v) for v in jax.tree.leaves({"p": grads["p"], "q": grads["q"]})]
        )

    keys = jax.random.split(jax.random.key(3), DRAWS)
    fn = jax.jit(jax.vmap(draw))
    return np.asarray(fn.lower(keys).compile(compiler_options=FAST_COMPILE)(keys))


# ---------------------------------------------------------------------------
# Unbiasedness against enumeration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sp.ESTIMATORS)
def test_k2_gradient_mean_equals_the_enumerated_gradient(name):
    estimator = sp.make_estimator(name, TINY, 2)
    state = {"moments": MOMENTS} if name == "nvil" else {}
    g = gradient_draws(estimator, state)
    grad = jax.jit(jax.grad(exact_iwae_k2))({"p": PARAMS["p"], "q": PARAMS["q"]})
    if name == "rws":
        grad["q"] = jax.jit(jax.grad(exact_wake_phi_k2))(PARAMS["q"])
    exact = flat(grad)
    mean = g.mean(axis=0)
    se = g.std(axis=0, ddof=1) / math.sqrt(DRAWS)
    error = np.abs(mean - exact)
    # Pixels off in both images give exactly zero gradient to their U row.
    assert np.all(error[se == 0] < 1e-6)
    z = error[se > 0] / se[se > 0]
    assert np.all(z <= C), (name, z.max())
    # The check has power: the exact gradient is well resolved.
    assert np.linalg.norm(exact) > 10 * np.linalg.norm(se)


def test_multisample_nvil_at_k1_is_nvil_plus_a_zero_mean_score():
    ours = sp.make_estimator("nvil", TINY, 1)
    theirs = sbn.make_estimator("nvil", TINY, 1)
    key = jax.random.key(5)

    def grads(estimator):
        fn = jax.jit(
            jax.grad(lambda pr: estimator.loss_fn(pr, key, X, moments=MOMENTS)[0])
        )
        return fn(PARAMS)

    g_ours, g_theirs = grads(ours), grads(theirs)
    for group in ("p", "baseline"):
        for a, b in zip(
            jax.tree.leaves(g_ours[group]),
            jax.tree.leaves(g_theirs[group]),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    program = sbn.make_program(TINY, PARAMS, 1, reinforce_loss)

    @jax.jit
    def score_fn(q):
        h = coix.traced_evaluate(program, seed=key)(X)[1]["h"].value

        def mean_log_q(q):
            return jnp.sum(TINY.guide.distribution_fn(q, X).log_prob(h)) / X.shape[0]

        return jax.grad(mean_log_q)(q)

    score = score_fn(PARAMS["q"])
    for name in ("U", "d"):
        np.testing.assert_allclose(
            g_ours["q"][name] - g_theirs["q"][name], score[name], rtol=1e-4, atol=1e-5
        )
    assert np.abs(flat(score)).max() > 0.1  # the term is not trivially zero


# ---------------------------------------------------------------------------
# Exact bounds
# ---------------------------------------------------------------------------


def test_exact_bounds_equal_a_brute_force_sum():
    log_likelihood, elbo = sp.exact_bounds(TINY, PARAMS, X, chunk=4)
    pairs = jax.jit(enumerated)(PARAMS["p"], PARAMS["q"])
    log_joint, log_q = (np.asarray(v, np.float64) for v in pairs)
    expected_ll = np.array([logsumexp(row) for row in log_joint])
    expected_elbo = np.sum(np.exp(log_q) * (log_joint - log_q), axis=1)
    np.testing.assert_allclose(log_likelihood, expected_ll, rtol=1e-5)
    np.testing.assert_allclose(elbo, expected_elbo, rtol=1e-5)
    np.testing.assert_allclose(
        log_likelihood, sbn.exact_log_likelihood(TINY, PARAMS["p"], X), rtol=1e-5
    )
    assert np.all(np.asarray(elbo) <= np.asarray(log_likelihood))


# ---------------------------------------------------------------------------
# Errors and the program
# ---------------------------------------------------------------------------


def test_estimator_errors():
    with pytest.raises(ValueError, match="at least 2"):
        sp.make_estimator("vimco", TINY, 1)
    with pytest.raises(ValueError, match="at least 2"):
        sp.make_estimator("rws", TINY, 1)
    with pytest.raises(ValueError, match="unknown estimator"):
        sp.make_estimator("reinforce", TINY, 2)
    with pytest.raises(ValueError, match="moments"):
        sp.multisample_nvil_loss(normalize=True)
    assert sp.configurations(("nvil", "vimco"), (1, 2)) == [
        ("nvil", 1),
        ("nvil", 2),
        ("vimco", 2),
    ]


def test_smoke_run_writes_outputs(tmp_path):
    metrics = sp.run(**sp.SMOKE_CONFIG, out=str(tmp_path), progress=False)
    assert (tmp_path / "sbn_particles.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((tmp_path / "sbn_particles_metrics.json").read_text())
    assert record["metrics"].keys() == metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    runs = record["runs"]
    assert len(runs) == len(
        sp.configurations(
            sp.SMOKE_CONFIG["estimators"], sp.SMOKE_CONFIG["particle_grid"]
        )
    )
    for r in runs:
        assert len(r["log_likelihood"]) == sp.SMOKE_CONFIG["num_seeds"]
        # Exact log p(x) of 8x8 binary images: negative, above 64 log(1/2).
        assert all(-64 * math.log(2) < v < 0 for v in r["log_likelihood"])
        assert len(r["train_elbo"][0]) == 10  # one mean per segment
        assert all(
            e <= ll for e, ll in zip(r["elbo"], r["log_likelihood"], strict=True)
        )
    assert metrics["skipped_steps"] == 0
