"""The Gaussian toy of Rainforth et al. (2018) and DReG (programs/tighter_bounds).

Model ``z ~ N(mu, I)``, ``x | z ~ N(z, I)``, ``q(z | x) = N(A x + b, 2/3 I)``
in 20 dimensions, at parameters perturbed from the optimum; gradients of the
K-sample bound from the library's ``iwae_loss`` and ``dreg_iwae`` programs.

* Closed forms (exact, float64): ``log p(x) = log p(x, z) - log p(z | x)``
  at any ``z``; the ELBO and the chi-square divergence against 1-D
  quadrature (both factorise over dimensions).
* Per-draw identities (exact): ``g_A = g_b x^T`` (``A`` enters only through
  ``q``'s mean); IWAE's ``g_b = x - mu - 2 g_mu``; IWAE and DReG give the
  same ``mu`` gradient for the same key; a draw is the same alone and
  inside ``jax.vmap``.
* K = 1 (statistical): each estimator is affine in one Gaussian ``eps``, so
  its mean is the closed-form ELBO gradient and its sd is known exactly
  (IWAE ``g_b``: ``2 s``; DReG ``g_b``: ``|1/s^2 - 2| s``; ``g_mu``: ``s``,
  ``s^2 = 2/3``). Every coordinate's mean is within 5 se of the truth and
  every sample variance within 5 of its own sds (``sqrt(2 / (R - 1))``
  relative) of the exact one.
* K = 3: IWAE and DReG are unbiased for the same gradient: their means agree
  within ``5 (se_iwae + se_dreg)`` per coordinate (the se of a difference
  is at most the sum of the se's).
* K = 100: the mean gradient matches the closed-form asymptote
  ``grad [log p(x) - chi2 / (2K)]``. For ``b`` (DReG, whose noise is small)
  ``||mean - ref|| <= 0.05 ||ref|| + 5 sqrt(sum_j se_j^2)``: the ``O(K^-2)``
  remainder measured 1-2% of ``||ref||`` at K = 100 on this problem; the MC
  term is five times the expected norm of the error (a 20-d chi-square
  exceeding 25 times its mean never happens). The K = 1 gradient is about
  100 times larger, so the check has teeth. For ``mu``, per coordinate
  within 5 se.
* Signal-to-noise ratios from K = 1 to K = 100 move the way the papers
  predict (theory: a factor 10): the ``mu`` SNR rises at least 4-fold, the
  IWAE ``b`` SNR's upper 3-se bound falls below 0.6 times its K = 1 value,
  the DReG ``b`` SNR's lower 3-se bound is at least twice its K = 1 value
  (comparing each bound with the K = 1 estimate's opposite 3-se bound). Over
  12 Monte Carlo seeds the three ratios were 8.2-8.4, 0.22-0.41 and
  2.9-3.0.
* A smoke run of ``run()`` writes its PNG and JSON with the slopes' signs.

``C = 5``: a two-sided normal tail of 6e-7 per check, so the statistical
checks pass for any seed of the Monte Carlo draws (the problem itself, data
and perturbation, is fixed).

The gradient moments are computed once per K (module fixtures) with the
smoke configuration's sizes, so ``run(**SMOKE_CONFIG)`` reuses the compiled
code. Runtime: about 15 s in all on one free core.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from programs import tighter_bounds as tb

C = 5.0
S2 = 2.0 / 3.0
DRAWS = tb.SMOKE_CONFIG["steps"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def problem():
    return tb.make_problem(jax.random.key(0))


def _moments(problem, k, seed):
    return tb.gradient_moments(
        problem.params, jax.random.key(seed), problem.point, k, DRAWS, fast_compile=True
    )


@pytest.fixture(scope="module")
def k1(problem):
    return _moments(problem, 1, 11)


@pytest.fixture(scope="module")
def k3(problem):
    return _moments(problem, 3, 12)


@pytest.fixture(scope="module")
def k100(problem):
    return _moments(problem, 100, 13)


# ---------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------


def _normal_logpdf(z, mean, var):
    return -0.5 * np.log(2 * np.pi * var) - (z - mean) ** 2 / (2 * var)


def test_log_marginal_is_joint_minus_posterior(problem):
    mu, x = problem.params["mu"], problem.point
    z = np.asarray(problem.params["b"]) * 3.0 - 1.0  # any z
    joint = np.sum(
        _normal_logpdf(z, np.asarray(mu), 1.0) + _normal_logpdf(np.asarray(x), z, 1.0)
    )
    posterior = np.sum(_normal_logpdf(z, (np.asarray(x) + np.asarray(mu)) / 2, 0.5))
    assert float(tb.log_marginal(mu, x)) == pytest.approx(joint - posterior, abs=1e-3)


def test_elbo_and_chi_square_match_quadrature(problem):
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), problem.params)
    x = np.asarray(problem.point, np.float64)
    m = p["A"] @ x + p["b"]
    a = (x + p["mu"]) / 2
    elbo, log_second_moment = 0.0, 0.0
    for d in range(x.size):
        z = np.linspace(m[d] - 12, m[d] + 12, 200_001)
        dz = z[1] - z[0]
        log_q = _normal_logpdf(z, m[d], S2)
        log_joint = _normal_logpdf(z, p["mu"][d], 1.0) + _normal_logpdf(x[d], z, 1.0)
        elbo += np.sum(np.exp(log_q) * (log_joint - log_q)) * dz
        log_post = _normal_logpdf(z, a[d], 0.5)
        log_second_moment += np.log(np.sum(np.exp(2 * log_post - log_q)) * dz)
    assert float(tb.elbo(problem.params, problem.point)) == pytest.approx(
        elbo, abs=1e-3
    )
    assert float(tb.chi_square(problem.params, problem.point)) == pytest.approx(
        np.expm1(log_second_moment), rel=1e-4
    )


# ---------------------------------------------------------------------------
# Exact per-draw identities
# ---------------------------------------------------------------------------

_grad = jax.jit(tb.bound_gradient, static_argnames=("num_particles", "estimator"))


def test_per_draw_identities(problem):
    x = problem.point
    mu = problem.params["mu"]
    for seed in range(3):
        key = jax.random.key(seed)
        iwae = _grad(problem.params, key, x, num_particles=3, estimator="iwae")
        dreg = _grad(problem.params, key, x, num_particles=3, estimator="dreg")
        for g in (iwae, dreg):
            np.testing.assert_allclose(
                g["A"], np.outer(g["b"], x), rtol=1e-4, atol=1e-5
            )
        np.testing.assert_allclose(dreg["mu"], iwae["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            iwae["b"], x - mu - 2 * iwae["mu"], rtol=1e-4, atol=1e-5
        )
        assert not np.allclose(dreg["b"], iwae["b"])  # DReG is a different estimator


def test_vmapped_draws_equal_single_draws(problem):
    keys = jax.random.split(jax.random.key(7), 3)

    def draw(key):
        return tb.bound_gradient(problem.params, key, problem.point, 3, "dreg")

    batched = jax.jit(jax.vmap(draw))(keys)
    for i, key in enumerate(keys):
        single = _grad(
            problem.params, key, problem.point, num_particles=3, estimator="dreg"
        )
        for name in ("mu", "A", "b"):
            # Equal up to float32 rounding (XLA fuses the two differently).
            np.testing.assert_allclose(
                batched[name][i], single[name], rtol=1e-4, atol=1e-5
            )


def test_errors():
    with pytest.raises(ValueError, match="unknown estimator"):
        tb.make_program(tb.optimal_params(jnp.zeros((2, 3))), 2, "reinforce")
    with pytest.raises(ValueError, match="num_draws"):
        tb.gradient_moments({}, jax.random.key(0), jnp.zeros(3), 2, 1)


# ---------------------------------------------------------------------------
# Mean gradients against closed forms
# ---------------------------------------------------------------------------

EXACT_SD = {
    ("iwae", "b"): 2 * math.sqrt(S2),
    ("dreg", "b"): abs(1 / S2 - 2) * math.sqrt(S2),
    ("iwae", "mu"): math.sqrt(S2),
    ("dreg", "mu"): math.sqrt(S2),
}


@pytest.mark.parametrize("estimator", tb.ESTIMATORS)
def test_k1_mean_and_spread_are_the_elbo_gradient(problem, k1, estimator):
    moments = k1[estimator]
    r = moments.num_draws
    exact = tb.elbo_gradient(problem.params, problem.point)
    for name in ("b", "mu"):
        sd = EXACT_SD[(estimator, name)]
        error = np.abs(moments.mean[name] - np.asarray(exact[name]))
        assert np.all(error <= C * sd / math.sqrt(r)), (name, error.max())
        ratio = moments.variance[name] / sd**2
        assert np.all(np.abs(ratio - 1) <= C * math.sqrt(2 / (r - 1))), (name, ratio)
    # A's rows: the b gradient times x_j.
    exact_a = np.asarray(exact["A"])
    sd_a = EXACT_SD[(estimator, "b")] * np.abs(np.asarray(problem.point))[None, :]
    assert np.all(np.abs(moments.mean["A"] - exact_a) <= C * sd_a / math.sqrt(r))


def test_iwae_and_dreg_estimate_the_same_gradient(k3):
    iwae, dreg = k3["iwae"], k3["dreg"]
    for name in ("b", "mu", "A"):
        se = np.sqrt(iwae.variance[name] / iwae.num_draws) + np.sqrt(
            dreg.variance[name] / dreg.num_draws
        )
        error = np.abs(iwae.mean[name] - dreg.mean[name])
        assert np.all(error <= C * se), name


def test_k100_mean_gradient_matches_the_asymptote(problem, k100):
    ref = tb.asymptotic_gradient(problem.params, problem.point, 100)
    dreg = k100["dreg"]
    ref_b = np.asarray(ref["b"])
    se_b = np.sqrt(dreg.variance["b"] / dreg.num_draws)
    error = np.linalg.norm(dreg.mean["b"] - ref_b)
    assert error <= 0.05 * np.linalg.norm(ref_b) + C * np.linalg.norm(se_b)
    # The expected inference-network gradient has fallen like 1/K.
    k1_b = np.asarray(tb.elbo_gradient(problem.params, problem.point)["b"])
    assert np.linalg.norm(ref_b) < np.linalg.norm(k1_b) / 50
    for estimator in tb.ESTIMATORS:
        m = k100[estimator]
        se = np.sqrt(m.variance["mu"] / m.num_draws)
        assert np.all(np.abs(m.mean["mu"] - np.asarray(ref["mu"])) <= C * se)


# ---------------------------------------------------------------------------
# Signal-to-noise ratios
# ---------------------------------------------------------------------------


def test_snr_moves_as_the_papers_predict(k1, k100):
    def bounds(moments, name):
        a = tb.aggregate_snr(moments, name)
        lower = math.sqrt(max(a.mean_sq - 3 * a.se, 0.0))
        upper = math.sqrt(max(a.mean_sq + 3 * a.se, 0.0))
        return a, lower, upper

    mu1, _, mu1_up = bounds(k1["iwae"], "mu")
    _, mu100_low, _ = bounds(k100["iwae"], "mu")
    assert mu100_low >= 4 * mu1_up

    iwae1, iwae1_low, _ = bounds(k1["iwae"], "b")
    _, _, iwae100_up = bounds(k100["iwae"], "b")
    assert iwae1.resolved and iwae100_up <= 0.6 * iwae1_low

    _, _, dreg1_up = bounds(k1["dreg"], "b")
    _, dreg100_low, _ = bounds(k100["dreg"], "b")
    assert dreg100_low >= 2 * dreg1_up


def test_aggregate_snr_removes_the_noise_floor():
    # Zero-mean gradients: the plain |mean| / sd sits at about sqrt(2 / (pi R)),
    # the debiased mean square is within a few se of 0.
    r, j = 1000, 400
    g = np.random.default_rng(0).normal(size=(r, j))
    moments = tb.GradientMoments(
        mean={"b": g.mean(0)}, variance={"b": g.var(0, ddof=1)}, num_draws=r
    )
    plain = tb.coordinate_snr(moments, "b").mean()
    assert plain == pytest.approx(math.sqrt(2 / (math.pi * r)), rel=0.1)
    a = tb.aggregate_snr(moments, "b")
    assert abs(a.mean_sq) <= C * a.se and not a.resolved


# ---------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------


def test_smoke_run_writes_outputs(tmp_path, k1, k3, k100):
    del k1, k3, k100  # compiled first, so the run reuses them
    metrics = tb.run(**tb.SMOKE_CONFIG, out=str(tmp_path), progress=False)
    assert (tmp_path / "tighter_bounds.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((tmp_path / "tighter_bounds_metrics.json").read_text())
    assert record["particle_grid"] == [1, 3, 100]
    assert record["metrics"].keys() == metrics.keys()
    assert metrics["slope_mu"] > 0.3
    assert metrics["slope_phi_dreg"] > 0
    assert metrics["slope_phi_iwae"] < 0
    assert metrics["snr_A_minus_b_max_relative"] < 1e-3
