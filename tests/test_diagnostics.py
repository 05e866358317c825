"""Weight diagnostics against hand computations, closed forms and Monte Carlo.

Notation: ``w_i`` weights, ``Wbar_i = w_i / sum_j w_j``, ``N`` particles.
  ESS = 1 / sum Wbar_i^2                                  (Kish)
  CESS = N (sum Wbar_i v_i)^2 / sum Wbar_i v_i^2           (Zhou et al. 2016)
  mcse(log Zhat) = sqrt(sum (N Wbar_i - 1)^2 / ((N - 1) N))    (delta method)
Statistical tolerances are a stated number of Monte Carlo standard errors;
where an estimator has a known small bias the docstring says so.

Inputs are drawn with numpy and most tests share the shape ``(N, C)`` below,
so each diagnostic compiles only a few times (keeps the file fast).
"""

import math

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators
from combinators import diagnostics, weights
from combinators.diagnostics import (
    conditional_ess,
    effective_sample_size,
    log_normalizer,
    log_normalizer_from_runs,
    log_normalizer_mcse,
    pareto_khat,
    pareto_khat_threshold,
    relative_ess,
    summary,
)

N, C = 200, 5  # particles and columns of the exact tests


def zeros_for(log_weight):
    """Equal log weights, broadcastable against ``log_weight``."""
    return np.zeros(log_weight.shape[:1] + (1,) * (log_weight.ndim - 1), np.float32)


PER_COLUMN = {
    "ess": effective_sample_size,
    "relative_ess": relative_ess,
    "log_Z": log_normalizer,
    "mcse": log_normalizer_mcse,
    "khat": pareto_khat,
    "cess_of_increments": lambda lw: conditional_ess(zeros_for(lw), lw),
    "cess_of_previous": lambda lw: conditional_ess(lw, zeros_for(lw)),
}


def normal_log_weights(seed, shape=(N, C), scale=1.0, loc=0.0):
    """log w ~ N(loc, scale^2)."""
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def lomax_log_weights(seed, shape, k):
    """log w for w ~ GPD(shape k, scale 1): w = (U^-k - 1) / k."""
    u = 1.0 - np.random.default_rng(seed).random(shape)  # in (0, 1]
    return np.log(np.expm1(-k * np.log(u)) / k).astype(np.float32)


def pareto_quantile_log_weights(n, k):
    """log w at the n quantiles of a Pareto with tail shape k: (1 - p)^-k."""
    p = (np.arange(1, n + 1) - 0.5) / n
    return (-k * np.log1p(-p)).astype(np.float32)


def float64(x):
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------
# Effective sample size.
# ---------------------------------------------------------------------------

# Columns with n1 weights a and n2 = N - n1 weights b:
#   ESS = (n1 a + n2 b)^2 / (n1 a^2 + n2 b^2).
TWO_VALUED = [(60, 1.0, 5.0), (199, 2.0, 0.1), (1, 1e-3, 1.0)]


def test_ess_of_equal_one_hot_and_two_valued_weights_column_by_column():
    equal = np.full(N, 3.7)
    one_hot = np.full(N, -np.inf)
    one_hot[17] = 2.0
    columns = [equal, one_hot]
    expected = [N, 1.0]
    for n1, a, b in TWO_VALUED:
        columns.append(np.log([a] * n1 + [b] * (N - n1)))
        expected.append((n1 * a + (N - n1) * b) ** 2 / (n1 * a**2 + (N - n1) * b**2))
    log_weight = np.stack(columns, axis=1).astype(np.float32)
    expected = np.array(expected)
    np.testing.assert_allclose(effective_sample_size(log_weight), expected, rtol=1e-5)
    np.testing.assert_allclose(relative_ess(log_weight), expected / N, rtol=1e-5)


def test_ess_keeps_columns_and_reuses_the_metric_formula():
    log_weight = normal_log_weights(0, scale=1.5)
    w = np.exp(float64(log_weight))
    wbar = w / w.sum(axis=0)
    ess = effective_sample_size(log_weight)
    np.testing.assert_allclose(ess, 1.0 / np.sum(wbar**2, axis=0), rtol=1e-5)
    # The ess metric is the mean over columns.
    np.testing.assert_allclose(
        np.mean(ess), weights.effective_sample_size(log_weight), rtol=1e-5
    )
    # Extra trailing axes are columns too.
    reshaped = effective_sample_size(log_weight[:, :4].reshape(N, 2, 2))
    np.testing.assert_allclose(reshaped, ess[:4].reshape(2, 2), rtol=1e-6)


def test_a_scalar_log_weight_is_one_particle():
    assert float(effective_sample_size(np.float32(-2.0))) == 1.0
    assert float(log_normalizer(np.float32(-2.0))) == -2.0
    assert np.isnan(log_normalizer_mcse(np.float32(-2.0)))


# ---------------------------------------------------------------------------
# Every per-column diagnostic: NaN safety and jit.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", PER_COLUMN.values(), ids=PER_COLUMN.keys())
def test_unusable_columns_give_nan_and_others_are_unaffected(fn):
    log_weight = np.repeat(normal_log_weights(1, (N, 1)), C, axis=1)
    log_weight[5, 1] = np.nan
    log_weight[7, 2] = np.inf
    log_weight[:, 3] = -np.inf  # every weight 0
    log_weight[3, 4] = -np.inf  # one particle outside the support: fine
    out = np.asarray(fn(log_weight))
    assert out.shape == (C,)
    assert np.all(np.isnan(out[1:4]))
    assert np.all(np.isfinite(out[[0, 4]]))


def test_same_result_with_and_without_jit():
    log_weight = normal_log_weights(2, scale=2.0)

    def all_diagnostics(lw):
        return {name: fn(lw) for name, fn in PER_COLUMN.items()}

    jitted = jax.jit(all_diagnostics)(log_weight)
    for name, value in all_diagnostics(log_weight).items():
        np.testing.assert_allclose(jitted[name], value, rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------
# Conditional ESS.
# ---------------------------------------------------------------------------


def cess_float64(log_weight_prev, log_incremental):
    """The definition, term by term, in float64 numpy."""
    prev, inc = float64(log_weight_prev), float64(log_incremental)
    wbar = np.exp(prev - prev.max(axis=0))
    wbar /= wbar.sum(axis=0)
    v = np.exp(inc - inc.max(axis=0))
    n = prev.shape[0]
    return n * np.sum(wbar * v, axis=0) ** 2 / np.sum(wbar * v**2, axis=0)


def test_cess_is_n_for_constant_increments():
    prev = normal_log_weights(3, scale=3.0)
    constant = np.full((N, C), -7.5, np.float32)
    np.testing.assert_allclose(conditional_ess(prev, constant), N, rtol=1e-5)


def test_cess_is_the_ess_of_the_increments_after_equal_weights():
    inc = normal_log_weights(4, scale=1.5)
    np.testing.assert_allclose(
        conditional_ess(np.zeros((N, C), np.float32), inc),
        effective_sample_size(inc),
        rtol=1e-5,
    )


def test_cess_matches_the_definition_in_float64():
    prev = normal_log_weights(5, scale=2.0)
    inc = normal_log_weights(6, scale=1.0)
    np.testing.assert_allclose(
        conditional_ess(prev, inc), cess_float64(prev, inc), rtol=1e-4
    )


def test_cess_is_invariant_to_the_scale_of_either_weight():
    prev = normal_log_weights(7, scale=2.0)
    inc = normal_log_weights(8, scale=1.0)
    expected = cess_float64(prev, inc)
    # Weights around exp(+-400) overflow a direct float32 computation.
    for c_prev, c_inc in [(400.0, 0.0), (0.0, -400.0), (-35.0, 420.0)]:
        np.testing.assert_allclose(
            conditional_ess(prev + c_prev, inc + c_inc), expected, rtol=1e-4
        )


def test_cess_broadcasts_columns_and_checks_the_particle_axis():
    prev = normal_log_weights(9, (N, 1), scale=2.0)
    inc = normal_log_weights(10)
    out = conditional_ess(prev, inc)
    assert out.shape == (C,)
    np.testing.assert_allclose(
        out, cess_float64(np.broadcast_to(prev, (N, C)), inc), rtol=1e-4
    )
    with pytest.raises(ValueError, match="200 and 199 particles"):
        conditional_ess(prev, inc[:-1])


# ---------------------------------------------------------------------------
# log Z and its Monte Carlo standard error.
# ---------------------------------------------------------------------------


def test_log_normalizer_is_log_mean_weight_per_column():
    log_weight = normal_log_weights(11)
    expected = np.log(np.mean(np.exp(float64(log_weight)), axis=0))
    np.testing.assert_allclose(log_normalizer(log_weight), expected, rtol=1e-5)
    # The log_Z metric is the sum over columns (independent problems).
    np.testing.assert_allclose(
        np.sum(log_normalizer(log_weight)),
        weights.log_normalizer(log_weight),
        rtol=1e-5,
    )


def test_mcse_equals_the_delta_method_by_hand():
    """sqrt(var(w) / N) / mean(w) = sqrt((N / ESS - 1) / (N - 1))."""
    log_weight = normal_log_weights(12, scale=1.2, loc=-30.0)
    w = np.exp(float64(log_weight) + 30.0)
    by_hand = np.sqrt(np.var(w, axis=0, ddof=1) / N) / np.mean(w, axis=0)
    mcse = log_normalizer_mcse(log_weight)
    np.testing.assert_allclose(mcse, by_hand, rtol=1e-4)
    ess = float64(effective_sample_size(log_weight))
    np.testing.assert_allclose(mcse, np.sqrt((N / ess - 1) / (N - 1)), rtol=1e-3)
    # Equal weights: no error; a single weight: relative error 1.
    equal_and_one_hot = np.zeros((N, C), np.float32)
    equal_and_one_hot[1:, 1] = -np.inf
    np.testing.assert_allclose(
        log_normalizer_mcse(equal_and_one_hot)[:2], [0.0, 1.0], atol=1e-6
    )


MCSE_N, MCSE_REPS = 2000, 200


def test_mcse_z_scores_are_standard_normal_for_log_normal_weights():
    """log w ~ N(mu, s^2): Z = exp(mu + s^2 / 2); z = (log Zhat - log Z) / mcse.

    Over R replications the mean of z has standard error 1/sqrt(R) and its
    standard deviation 1/sqrt(2R); tolerance 5 of each. (Measured over 300
    seeds: mean of z -0.05, from the skew of the weights; sd 1.01.)
    """
    mu, s = 0.7, 1.0
    log_weight = normal_log_weights(13, (MCSE_N, MCSE_REPS), scale=s, loc=mu)
    error = float64(log_normalizer(log_weight)) - (mu + s**2 / 2)
    z = error / float64(log_normalizer_mcse(log_weight))
    assert abs(np.mean(z)) < 5 / math.sqrt(MCSE_REPS)
    assert abs(np.std(z, ddof=1) - 1) < 5 / math.sqrt(2 * MCSE_REPS)


def test_mcse_shrinks_like_one_over_sqrt_n():
    """sqrt(N) mcse -> sqrt(var(w)) / E w = sqrt(exp(s^2) - 1) for log-normal w.

    s = 0.5 keeps the weights' kurtosis small, so the bias of a square root
    of a sample variance (~0.2% here) is below the tolerance: 5 standard
    errors of the mean over replications.
    """
    s = 0.5
    expected = math.sqrt(math.expm1(s**2))
    for seed, n in enumerate((MCSE_N // 4, MCSE_N)):
        log_weight = normal_log_weights(14 + seed, (n, MCSE_REPS), scale=s)
        scaled = math.sqrt(n) * float64(log_normalizer_mcse(log_weight))
        standard_error = np.std(scaled) / math.sqrt(MCSE_REPS)
        assert abs(np.mean(scaled) - expected) < 5 * standard_error


def test_pooling_runs_is_importance_sampling_over_runs():
    """Equal-size runs: pooled log Z = log Z of all particles together."""
    runs = normal_log_weights(17, scale=1.3)  # C runs of N particles
    log_Z_runs = log_normalizer(runs)
    pooled = log_normalizer_from_runs(log_Z_runs)
    log_Z, mcse = pooled  # a NamedTuple
    all_particles = np.log(np.mean(np.exp(float64(runs))))
    np.testing.assert_allclose(log_Z, all_particles, rtol=1e-5)
    np.testing.assert_allclose(mcse, log_normalizer_mcse(log_Z_runs), rtol=1e-6)
    assert pooled.log_Z is log_Z and pooled.mcse.shape == ()


# ---------------------------------------------------------------------------
# Pareto k-hat.
# ---------------------------------------------------------------------------

KHAT_N, KHAT_COLUMNS = 10_000, 16
KHAT_TAIL = 300  # ceil(min(N / 5, 3 sqrt(N)))


@pytest.mark.parametrize("k", [0.2, 0.5, 0.8])
def test_khat_recovers_the_tail_shape_of_generalized_pareto_weights(k):
    """w ~ GPD(k): exceedances over any threshold are GPD(k) again.

    The target is k shrunk by the PSIS prior, (M k + 5) / (M + 10). The
    estimator's standard error is ~(1 + k) / sqrt(M) (measured 0.068, 0.083,
    0.099 over 320 columns); the mean over 16 columns must lie within 4
    standard errors, every column within 5.5.
    """
    log_weight = lomax_log_weights(int(10 * k), (KHAT_N, KHAT_COLUMNS), k)
    khat = float64(pareto_khat(log_weight))
    assert khat.shape == (KHAT_COLUMNS,)
    target = (KHAT_TAIL * k + 10 * 0.5) / (KHAT_TAIL + 10)
    standard_error = (1 + k) / math.sqrt(KHAT_TAIL)
    assert abs(np.mean(khat) - target) < 4 * standard_error / math.sqrt(KHAT_COLUMNS)
    assert np.max(np.abs(khat - target)) < 5.5 * standard_error


def test_khat_is_small_for_light_tailed_weights():
    """Log-normal weights have all moments; s = 0.5 gives k-hat ~0.08 (max 0.24)."""
    log_weight = normal_log_weights(20, (KHAT_N, KHAT_COLUMNS), scale=0.5)
    assert np.max(pareto_khat(log_weight)) < 0.5


def test_khat_flags_a_proposal_narrower_than_the_target():
    """q = N(0, 1), p = N(0, 3^2): w ~ exp(4 x^2 / 9), asymptotically k = 8/9.

    At N = 10^4 the estimate is ~0.80 with standard deviation ~0.105 per
    column (a slowly varying factor biases it low), so the mean over 64
    columns is ~7 standard errors above 0.7.
    """
    x = np.random.default_rng(21).normal(size=(4, KHAT_N, KHAT_COLUMNS))
    # log N(x; 0, 3^2) - log N(x; 0, 1)
    log_weight = (4 / 9 * x**2 - np.log(3.0)).astype(np.float32)
    khat = np.concatenate([pareto_khat(batch) for batch in log_weight])
    assert np.mean(khat) > 0.7


def test_khat_does_not_depend_on_the_scale_of_the_weights():
    log_weight = lomax_log_weights(22, (KHAT_N, KHAT_COLUMNS), 0.5)
    khat = pareto_khat(log_weight)
    for c in (-60.0, 45.0):
        np.testing.assert_allclose(pareto_khat(log_weight + c), khat, atol=2e-3)


def test_khat_tail_size_and_edge_cases():
    log_weight = pareto_quantile_log_weights(KHAT_N, 0.5)
    # Default tail of 300 points, or 10%: 1000 points; both estimate 0.5.
    assert abs(float(pareto_khat(log_weight)) - 0.5) < 0.05
    assert abs(float(pareto_khat(log_weight, tail_fraction=0.1)) - 0.5) < 0.05
    with pytest.raises(ValueError, match="tail_fraction"):
        pareto_khat(log_weight, tail_fraction=1.5)
    # Equal weights (e.g. after resampling) have no tail at all.
    assert float(pareto_khat(np.zeros(KHAT_N, np.float32))) == -np.inf
    # Too few particles for a tail fit.
    assert np.isnan(pareto_khat(np.arange(5.0)))  # M = 1
    assert np.isfinite(pareto_khat(np.arange(6.0)))  # M = 2


def test_khat_threshold_depends_on_sample_size():
    assert pareto_khat_threshold(100) == pytest.approx(0.5)
    assert pareto_khat_threshold(10) == pytest.approx(0.0)
    assert pareto_khat_threshold(10_000) == 0.7  # capped
    assert pareto_khat_threshold(1) == -np.inf


# ---------------------------------------------------------------------------
# summary().
# ---------------------------------------------------------------------------

SUMMARY_N = 1000
Y, SIGMA_Y = 1.3, 0.5
EXACT_LOG_Z = float(dist.Normal(0.0, math.sqrt(1.0 + SIGMA_Y**2)).log_prob(Y))


def conjugate_metrics(seed=0):
    """z ~ N(0, 1), y ~ N(z, 0.5^2) with q = N(0.3, 1.2^2): bounded weights."""

    def p():
        with numpyro.plate("particles", SUMMARY_N):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, SIGMA_Y), obs=Y)
        return (z,)

    def q():
        with numpyro.plate("particles", SUMMARY_N):
            return (numpyro.sample("z", dist.Normal(0.3, 1.2)),)

    def run(key):
        return combinators.traced_evaluate(combinators.propose(p, q), seed=key)()

    _, _, metrics = jax.jit(run)(jax.random.key(seed))  # one compile, not many
    return metrics


def test_summary_of_a_proposed_program():
    metrics = conjugate_metrics()
    result = summary(metrics)
    assert isinstance(result, diagnostics.Diagnostics)
    assert result.num_particles == SUMMARY_N
    np.testing.assert_allclose(result.ess, metrics.ess, rtol=1e-5)
    np.testing.assert_allclose(result.relative_ess, metrics.ess / SUMMARY_N, rtol=1e-5)
    np.testing.assert_allclose(result.log_Z, metrics.log_Z, rtol=1e-5)
    assert 0 < float(result.log_Z_mcse) < 0.1
    # Statistical: within 5 standard errors of the exact evidence.
    assert abs(float(result.log_Z) - EXACT_LOG_Z) < 5 * float(result.log_Z_mcse)
    assert float(result.pareto_k) < 0.5 and result.verdict == "good"
    as_dict = result.to_dict()
    assert list(as_dict) == [
        "num_particles",
        "ess",
        "relative_ess",
        "log_Z",
        "log_Z_mcse",
        "pareto_k",
    ]
    assert all(type(v) is float for k, v in as_dict.items() if k != "num_particles")
    text = str(result)
    assert all(name in text for name in as_dict) and "good" in text
    assert result._repr_html_().startswith("<table>")
    assert "pareto_k" in result._repr_html_()
    # A Coix-style dict and the raw array give the same record.
    assert summary({"log_weight": metrics.log_weight}).to_dict() == as_dict
    assert summary(metrics.log_weight).to_dict() == as_dict


def test_summary_of_non_finite_weights_is_nan_without_raising(capsys):
    log_weight = normal_log_weights(24, (SUMMARY_N,))
    log_weight[3] = np.nan
    result = summary(log_weight, print_=True)
    for name, value in result.to_dict().items():
        assert name == "num_particles" or np.isnan(value), name
    assert result.verdict == "nan"
    assert "nan" in capsys.readouterr().out


def test_summary_verdicts_follow_the_thresholds():
    # Pareto quantiles with k = 1 (no mean): unreliable at any N.
    heavy = summary(pareto_quantile_log_weights(SUMMARY_N, 1.0))
    assert float(heavy.pareto_k) > 0.9 and heavy.verdict == "unreliable"
    assert diagnostics.Diagnostics(10_000, 1.0, 1.0, 0.0, 0.0, 0.3).verdict == "good"
    assert diagnostics.Diagnostics(10_000, 1.0, 1.0, 0.0, 0.0, 0.6).verdict == "ok"
    # 0.45 is below 0.5 but above the threshold for 50 particles (0.41).
    small = diagnostics.Diagnostics(50, 1.0, 1.0, 0.0, 0.0, 0.45)
    assert small.verdict == "unreliable"


def test_summary_combines_columns_like_the_metrics_and_jits():
    log_weight = normal_log_weights(26, scale=0.8)
    result = summary(log_weight)
    np.testing.assert_allclose(
        result.ess, np.mean(effective_sample_size(log_weight)), rtol=1e-6
    )
    np.testing.assert_allclose(
        result.log_Z, weights.log_normalizer(log_weight), rtol=1e-5
    )
    np.testing.assert_allclose(
        result.log_Z_mcse, np.linalg.norm(log_normalizer_mcse(log_weight)), rtol=1e-5
    )
    np.testing.assert_allclose(result.pareto_k, np.max(pareto_khat(log_weight)))
    jitted = jax.jit(summary)(log_weight)
    assert isinstance(jitted, diagnostics.Diagnostics) and jitted.num_particles == N
    for name, value in result.to_dict().items():
        np.testing.assert_allclose(jitted.to_dict()[name], value, rtol=1e-5)
