"""Resampling: unbiased offspring counts, equal weights, unchanged log Z.

With normalised weights w and M draws, every scheme must give offspring
counts c_i = #{j : a_j = i} with E[c_i] = M w_i. Statistical tolerances are
5 Monte-Carlo standard errors from the empirical spread of the counts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp

from combinators import (
    empirical,
    fori_loop,
    propose,
    resample,
    resampling,
    scan,
    traced_evaluate,
)

METHODS = ("systematic", "stratified", "multinomial", "residual")
Y = 1.3
N = 8
NUM_KEYS = 20_000

# Normalised weights deliberately not multiples of 1/M; offset tests softmax.
W = np.array([0.31, 0.02, 0.17, 0.005, 0.245, 0.11, 0.14])
LOG_W = np.log(W) - 3.7


def target(n, extra_out=False):
    def p(y):
        with numpyro.plate("particles", n):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.5), obs=y)
        return (z, 2.0 * z) if extra_out else (z,)

    return p


def proposal(n):
    def q(y):
        with numpyro.plate("particles", n):
            z = numpyro.sample("z", dist.Normal(0.3, 1.2))
        return (z,)

    return q


@functools.cache
def weighted_particles(seed=0):
    """(out, trace, metrics) of propose(p, q) with N particles."""
    program = propose(target(N), proposal(N))
    return traced_evaluate(program, seed=jax.random.key(seed))(Y)


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


@functools.cache
def offspring_counts(method, num_samples, log_w=tuple(LOG_W)):
    """Counts (NUM_KEYS, N, *columns) of resample_indices over many keys."""
    log_w = jnp.asarray(log_w)
    n = log_w.shape[0]

    def counts(key):
        idx = resampling.resample_indices(key, log_w, num_samples, method)
        return jnp.sum(jax.nn.one_hot(idx, n, axis=1, dtype=jnp.int32), axis=0)

    out = jax.jit(jax.vmap(counts))(keys(NUM_KEYS, seed=METHODS.index(method)))
    return np.asarray(out, dtype=np.float64)


def assert_mean_counts(counts, expected):
    se = counts.std(axis=0, ddof=1) / np.sqrt(counts.shape[0])
    tol = np.maximum(5 * se, 1e-3)
    np.testing.assert_array_less(np.abs(counts.mean(axis=0) - expected), tol)


# ---------------------------------------------------------------------------
# The resample combinator.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [None, 3 * N, N // 2, ()])
def test_resample_equalises_weights_and_keeps_log_z(num_samples):
    out, trace, metrics = weighted_particles()
    lw_in = np.asarray(metrics.log_weight, np.float64)
    log_z = logsumexp(lw_in) - np.log(N)
    program = resample(empirical(out, trace, metrics), num_samples=num_samples)
    _, new_trace, new = traced_evaluate(program, seed=jax.random.key(1))(Y)
    m = N if num_samples is None else num_samples
    shape = () if m == () else (m,)
    assert new.log_weight.shape == shape
    np.testing.assert_allclose(new.log_weight, np.full(shape, log_z), rtol=1e-6)
    np.testing.assert_allclose(new.log_Z, log_z, rtol=1e-6)
    np.testing.assert_allclose(new.ess, 1 if m == () else m, rtol=1e-6)
    # Every new particle is a copy of an old one, value and density together.
    z_old = np.asarray(trace["z"].value)
    z_new = np.asarray(new_trace["z"].value)
    assert z_new.shape == shape
    ancestors = np.argmin(np.abs(z_new.reshape(-1, 1) - z_old[None, :]), axis=1)
    np.testing.assert_array_equal(z_new.reshape(-1), z_old[ancestors])
    np.testing.assert_array_equal(
        np.reshape(new_trace["z"].log_prob, -1),
        np.asarray(trace["z"].log_prob)[ancestors],
    )
    np.testing.assert_array_equal(
        np.reshape(new_trace["y"].log_prob, -1),
        np.asarray(trace["y"].log_prob)[ancestors],
    )


@pytest.mark.parametrize("num_samples", [None, 3 * N, ()])
def test_resample_moves_outputs_with_the_trace(num_samples):
    program = resample(
        propose(target(N, extra_out=True), proposal(N)), num_samples=num_samples
    )
    out, trace, _ = traced_evaluate(program, seed=jax.random.key(2))(Y)
    z = trace["z"].value
    assert jnp.shape(z) == (() if num_samples == () else (num_samples or N,))
    np.testing.assert_array_equal(out[0], z)
    np.testing.assert_allclose(out[1], 2.0 * z, rtol=1e-6)


def _local_latent_model(num_particles, num_sets, num_points):
    """A global ``z`` per data set and a local ``c`` per point; returns ``c``.

    The data sets are an undeclared batch dim, so the weights are
    ``(particles, sets, 1)`` while ``c`` is ``(particles, sets, points)``.
    """

    def target(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand((num_sets, 1)))
        with numpyro.plate("points", num_points, dim=-1):
            c = numpyro.sample("c", dist.Normal(z, 1.0))
            numpyro.sample("x", dist.Normal(c, 1.0), obs=x)
        return ({"c": c},)

    return numpyro.plate("particles", num_particles, dim=-3)(target)


def test_loops_resample_outputs_that_are_site_values():
    """A target returning what it sampled: inside fori_loop and scan bodies,
    resample must still move that output with the site's particles (a loop
    gives each carry leaf its own tracer, so the output stops being the
    site's array unless the carry keeps the link)."""
    n, sets, points = 6, 3, 4
    p = _local_latent_model(n, sets, points)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(sets, points)))
    init = propose(p, p)

    def body(_, q):
        return resample(q)

    for loop in (fori_loop, scan):
        program = loop(0, 3, body, init)
        out, trace, _ = traced_evaluate(program, seed=jax.random.key(3))(x)
        np.testing.assert_array_equal(out[0]["c"], trace["c"].value)


def test_resample_moves_outputs_with_a_constant_weight_column():
    """An output that is not a site's array but leads with the particles,
    with a data dim where the weights have a size-1 column, moves too."""
    n, sets, points = 6, 3, 4
    p = _local_latent_model(n, sets, points)

    def copy_out(x):
        (out,) = p(x)
        return ({"c": out["c"] + 0.0},)

    x = jnp.asarray(np.random.default_rng(1).normal(size=(sets, points)))
    program = resample(propose(copy_out, p))
    out, trace, metrics = traced_evaluate(program, seed=jax.random.key(4))(x)
    assert metrics.log_weight.shape == (n, sets, 1)
    np.testing.assert_allclose(out[0]["c"], trace["c"].value)


# ---------------------------------------------------------------------------
# The schemes.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [len(W), 2 * len(W) + 3])
@pytest.mark.parametrize("method", METHODS)
def test_offspring_counts_are_unbiased(method, num_samples):
    """E[c_i] = M w_i; sum_i c_i = M."""
    counts = offspring_counts(method, num_samples)
    assert np.all(counts.sum(axis=1) == num_samples)
    assert_mean_counts(counts, num_samples * W)


@pytest.mark.parametrize("method", ["systematic", "stratified", "residual"])
def test_count_variance_below_multinomial(method):
    """sum_i Var(c_i) is smaller than multinomial's M (1 - sum_i w_i^2)."""
    m = len(W)
    var = offspring_counts(method, m).var(axis=0, ddof=1).sum()
    var_multinomial = offspring_counts("multinomial", m).var(axis=0, ddof=1).sum()
    np.testing.assert_allclose(var_multinomial, m * (1 - np.sum(W**2)), rtol=0.05)
    assert var < 0.8 * var_multinomial


@pytest.mark.parametrize("num_samples", [N, 3 * N])
@pytest.mark.parametrize("method", METHODS)
def test_zero_weight_particles_are_never_chosen(method, num_samples):
    log_w = jnp.array([-jnp.inf, 0.3, -1.0, -jnp.inf, 2.0, -jnp.inf, -40.0, 0.0])
    zero = ~np.isfinite(np.asarray(log_w))
    idx = jax.jit(
        jax.vmap(lambda k: resampling.resample_indices(k, log_w, num_samples, method))
    )(keys(4000, seed=11))
    assert idx.shape == (4000, num_samples)
    assert not np.any(zero[np.asarray(idx)])
    # All particles of positive (even tiny) weight stay reachable.
    assert set(np.unique(np.asarray(idx))) <= set(np.flatnonzero(~zero))


@pytest.mark.parametrize("method", ["systematic", "stratified"])
def test_zero_weight_last_particle_is_never_chosen(method):
    """Regression: in float32 the last position (u + M - 1) / M rounds to 1.0
    with probability ~ M / 2**25 per draw (3 hits expected here before the
    fix); it must not land on a trailing zero-weight particle."""
    m, num_keys = 1 << 18, 384
    log_w = jnp.array([0.0, -jnp.inf])

    @jax.jit
    def hits(ks):
        def one(k):
            return jnp.sum(resampling.resample_indices(k, log_w, m, method) == 1)

        return jax.lax.map(one, ks, batch_size=64)

    assert int(jnp.sum(hits(keys(num_keys, seed=12)))) == 0


@pytest.mark.parametrize("method", METHODS)
def test_batched_weights_resampled_per_column(method):
    """log weights (N, B): each column's mean counts are M times its weights."""
    columns = np.stack(
        [W, W[::-1], np.array([0.5, 0.0, 0.1, 0.1, 0.2, 0.0, 0.1])], axis=1
    )
    with np.errstate(divide="ignore"):
        log_w = np.log(columns) + np.array([0.0, 5.0, -2.0])
    m = 11
    counts = offspring_counts(method, m, log_w=tuple(map(tuple, log_w)))
    assert counts.shape == (NUM_KEYS, len(W), 3)
    assert np.all(counts.sum(axis=1) == m)
    assert_mean_counts(counts, m * columns)
    assert np.all(counts[:, columns == 0] == 0)


# ---------------------------------------------------------------------------
# Non-finite weights are reported, never hidden.
# ---------------------------------------------------------------------------


def _resample_with_log_weight(log_weight, key):
    out, trace, metrics = weighted_particles()
    program = resample(empirical(out, trace, metrics.replace(log_weight=log_weight)))
    _, new_trace, new = traced_evaluate(program, seed=key)(Y)
    return new_trace["z"].value, new.log_weight, new.log_Z, new.ess


@pytest.mark.parametrize("kind", ["nan", "all_neg_inf"])
def test_non_finite_weights_are_reported(kind):
    _, trace, metrics = weighted_particles()
    lw = metrics.log_weight
    lw = lw.at[2].set(jnp.nan) if kind == "nan" else jnp.full_like(lw, -jnp.inf)
    key = jax.random.key(3)
    eager = _resample_with_log_weight(lw, key)
    jitted = jax.jit(_resample_with_log_weight)(lw, key)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_array_equal(a, b)
    z, new_lw, log_z, ess = eager
    assert np.isnan(ess)
    if kind == "nan":
        assert np.isnan(log_z) and np.all(np.isnan(new_lw))
    else:
        assert log_z == -np.inf and np.all(new_lw == -np.inf)
    z_old = np.asarray(trace["z"].value)
    assert not np.all(z == z_old[0])
    np.testing.assert_array_equal(z, z_old)  # documented: identity ancestors


@pytest.mark.parametrize("method", METHODS)
def test_resample_indices_identity_for_invalid_columns(method):
    log_w = jnp.stack(
        [
            jnp.asarray(LOG_W[:4]),
            jnp.array([0.0, jnp.nan, 1.0, 0.0]),
            jnp.array([0.0, jnp.inf, 1.0, 0.0]),
            jnp.full(4, -jnp.inf),
        ],
        axis=1,
    )
    idx = np.asarray(resampling.resample_indices(jax.random.key(4), log_w, 6, method))
    assert idx.shape == (6, 4)
    for column in (1, 2, 3):
        np.testing.assert_array_equal(idx[:, column], np.arange(6) % 4)
