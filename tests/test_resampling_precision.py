"""Resampling stays exact at large populations in float32.

A float32 cumulative sum of the weights, scaled to [0, 1], has spacing
2**-24 near 1: 0.06 of a slot at M = 10**6 draws, so that systematic
resampling of *equal* weights gave 5% of the particles 0 or 2 offspring
there, and float32 uniforms (spacing 2**-23) cannot tell particles of weight
1/N apart at that N either. The schemes now place positions as an integer
slot plus a fraction (:mod:`combinators.resampling`); these tests check the
offspring counts that are deterministic, and the means of those that are
not, at N around 10**6.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from combinators import resampling

N = 1_000_000
KEYS = (0, 1, 2)


@functools.cache
def compiled(method, num_samples):
    return jax.jit(
        lambda key, log_w: resampling.resample_indices(key, log_w, num_samples, method)
    )


def offspring(method, log_w, num_samples, seed):
    idx = compiled(method, num_samples)(jax.random.key(seed), jnp.asarray(log_w))
    idx = np.asarray(idx)
    assert idx.shape == (num_samples,)
    return np.bincount(idx, minlength=len(log_w))


def expected_counts(log_w, num_samples):
    """M w_i in float64 from the float32 log weights."""
    log_w = np.asarray(log_w, np.float64)
    w = np.exp(log_w - log_w.max())
    return num_samples * w / w.sum()


@pytest.mark.parametrize("method", ["systematic", "stratified", "residual"])
def test_equal_weights_give_every_particle_one_offspring(method):
    log_w = np.zeros(N, np.float32)
    for seed in KEYS:
        counts = offspring(method, log_w, N, seed)
        np.testing.assert_array_equal(counts, 1)


@pytest.mark.parametrize("method", ["systematic", "stratified", "residual"])
def test_integer_expected_counts_are_exact(method):
    """Zero weights between equal ones, M = 2 * #positive: counts 2 and 0."""
    num = N + 3
    log_w = np.zeros(num, np.float32)
    log_w[::7] = -np.inf
    positive = np.isfinite(log_w)
    for seed in KEYS:
        counts = offspring(method, log_w, 2 * int(positive.sum()), seed)
        np.testing.assert_array_equal(counts, np.where(positive, 2, 0))


def test_systematic_counts_are_floor_or_ceil_of_m_w():
    """Weights 1/N' with a thousand doubled (N' = N + 1000): N w_i = 0.999 or
    1.998, so systematic resampling gives 0 or 1 and 1 or 2 offspring."""
    rng = np.random.default_rng(0)
    log_w = np.zeros(N, np.float32)
    log_w[rng.choice(N, 1000, replace=False)] = np.log(2.0)
    expected = expected_counts(log_w, N)
    assert np.all(np.abs(expected - np.round(expected)) > 5e-4)  # far from integers
    for seed in KEYS:
        counts = offspring("systematic", log_w, N, seed)
        assert counts.sum() == N
        low, high = np.floor(expected), np.ceil(expected)
        bad = np.flatnonzero((counts < low) | (counts > high))
        assert bad.size == 0, (bad[:5], counts[bad[:5]], expected[bad[:5]])


def class_means(counts):
    """Mean counts of the particles i = 0, 1, 2 (mod 3), with standard errors."""
    groups = [counts[k::3].astype(np.float64) for k in range(3)]
    means = np.array([g.mean() for g in groups])
    errors = np.array([g.std(ddof=1) / np.sqrt(g.size) for g in groups])
    return means, errors


# N = 3 * 2**19 equal weights: 2**23 / N = 16/3 float32 uniforms (spacing
# 2**-23) per particle, so a plain inverse-cdf draw gives every third
# particle probability 6 / 2**23 instead of 16/3 / 2**23 (12.5% too much).
N_THIRDS = 3 * 2**19


def test_multinomial_draws_are_uniform_at_large_n():
    counts = offspring("multinomial", np.zeros(N_THIRDS, np.float32), N_THIRDS, 0)
    assert counts.sum() == N_THIRDS
    means, errors = class_means(counts)
    np.testing.assert_array_less(np.abs(means - 1.0), 5 * errors)


def test_residual_draws_are_uniform_at_large_n():
    """M = 1.5 N equal weights: one fixed copy each, N/2 draws from equal
    remainders."""
    m = N_THIRDS + N_THIRDS // 2
    counts = offspring("residual", np.zeros(N_THIRDS, np.float32), m, 0)
    assert counts.sum() == m and counts.min() >= 1  # the fixed copies
    means, errors = class_means(counts - 1)
    np.testing.assert_array_less(np.abs(means - 0.5), 5 * errors)


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 100, 129, 1_000, 4_097, 16_385])
def test_systematic_counts_at_every_blocking_of_the_prefix_sums(n):
    """The prefix sums run as one loop up to 128 particles and in blocks of
    128, recursively, beyond (padded when N is not a multiple): at each size
    the systematic counts are floor or ceil of ``M w_i`` and equal weights
    give one offspring each."""
    rng = np.random.default_rng(n)
    log_w = rng.normal(0.0, 2.0, n).astype(np.float32)
    expected = expected_counts(log_w, n)
    for seed in KEYS[:2]:
        counts = offspring("systematic", log_w, n, seed)
        assert counts.sum() == n
        bad = np.flatnonzero(
            (counts < np.floor(expected) - 1e-9) | (counts > np.ceil(expected) + 1e-9)
        )
        assert bad.size == 0, (bad[:5], counts[bad[:5]], expected[bad[:5]])
        np.testing.assert_array_equal(
            offspring("systematic", np.zeros(n, np.float32), n, seed), 1
        )
