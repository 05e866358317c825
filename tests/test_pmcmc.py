"""Particle MCMC (combinators.pmcmc) against exact answers on the 1-D LGSSM.

Model (programs.lgssm_exact.default_params(1)): x_0 ~ N(0, 1),
x_t | x_{t-1} ~ N(a x_{t-1}, 1), y_t | x_t ~ N(x_t, 0.5^2), a = 0.9, data
simulated with a fixed key. Exact answers: the RTS smoother's marginals
(particle Gibbs) and a grid posterior of ``a`` from the Kalman likelihood
(PMMH).

Statistical checks hold for any seed: C independent chains, each giving one
estimate (an average over its iterations); the mean of the C estimates must
be within 5 standard errors, computed from their spread, of the exact value.
Each chain starts from an exact posterior draw (the Kalman backward sampler,
or the grid posterior), so an invariant kernel gives estimates with the
exact expectation whatever the chain length.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from combinators import pmcmc, resampling, smoothing
from programs import lgssm
from programs.lgssm_exact import (
    default_params,
    kalman_filter,
    rts_smoother,
    simulate,
    smoother_sample,
)

NUM_SE = 5.0
PARAMS = default_params(1)


def z_scores(estimates, exact):
    """|mean - exact| / standard error, per entry, over axis 0 (independent runs)."""
    estimates = np.asarray(estimates, np.float64)
    se = estimates.std(axis=0, ddof=1) / np.sqrt(estimates.shape[0])
    return np.abs(estimates.mean(axis=0) - np.asarray(exact, np.float64)) / se


def step_programs(params, ys, num_particles):
    """``targets(t)`` and the bootstrap ``proposals(t)`` of the filter."""

    def targets(t):
        if isinstance(t, int) and t == 0:
            return lgssm.initial_target(params, ys, num_particles)
        return lgssm.transition_target(params, ys, num_particles, t)

    def proposals(t):
        return lgssm.bootstrap_proposal(params, ys, num_particles, t)

    return targets, proposals


# ---------------------------------------------------------------------------
# Conditional resampling: slot 0 is pinned, the scheme's law is kept.
# ---------------------------------------------------------------------------

WEIGHTS = np.array([0.05, 0.3, 0.0, 0.12, 0.33, 0.2])


@pytest.mark.parametrize("method", sorted(resampling.CONDITIONAL_SCHEMES))
def test_conditional_resampling_pins_slot_zero_and_keeps_the_scheme(method):
    n, num_runs = WEIGHTS.size, 4000
    log_weights = jnp.log(jnp.asarray(WEIGHTS, jnp.float32))

    def one(key):
        key_pin, key_draw, key_any = jax.random.split(key, 3)
        pinned = jax.random.categorical(key_pin, log_weights)  # ~ w
        drawn = resampling.conditional_indices(key_draw, log_weights, pinned, method)
        # Any ancestor of positive weight, not only one drawn from w.
        other = jax.random.choice(key_any, jnp.array([0, 1, 3, 4, 5]))
        forced = resampling.conditional_indices(key_draw, log_weights, other, method)
        return pinned, drawn, other, forced

    keys = jax.random.split(jax.random.key(0), num_runs)
    pinned, drawn, other, forced = jax.device_get(jax.jit(jax.vmap(one))(keys))
    np.testing.assert_array_equal(drawn[:, 0], pinned)
    np.testing.assert_array_equal(forced[:, 0], other)
    assert not np.any(drawn == 2) and not np.any(forced == 2)  # zero weight
    counts = (drawn[:, :, None] == np.arange(n)).sum(axis=1)  # (R, N)
    # With slot 0's ancestor drawn from w, the joint law is the unconditional
    # scheme's: unbiased offspring counts.
    z = z_scores(counts[:, WEIGHTS > 0], n * WEIGHTS[WEIGHTS > 0])
    assert np.all(z < NUM_SE), z
    if method == "systematic":  # floor(N w_i) or ceil(N w_i) offspring, always
        for sample in (counts, (forced[:, :, None] == np.arange(n)).sum(axis=1)):
            assert np.all(sample >= np.floor(n * WEIGHTS))
            assert np.all(sample <= np.ceil(n * WEIGHTS))
    if method == "stratified":  # the strata meeting i's interval, at most
        for sample in (counts, (forced[:, :, None] == np.arange(n)).sum(axis=1)):
            assert np.all(sample >= np.maximum(np.floor(n * WEIGHTS) - 1, 0))
            assert np.all(sample <= np.ceil(n * WEIGHTS) + 1)
    # The same joint law as the unconditional scheme: the second moments of
    # the offspring counts agree (a scheme with the right means but another
    # spread, e.g. multinomial draws for the other slots, fails here).
    unconditional = SCHEMES_BY_NAME[method]
    plain = jax.device_get(
        jax.jit(jax.vmap(lambda k: unconditional(k, log_weights, n)))(
            jax.random.split(jax.random.key(1), num_runs)
        )
    )
    plain_counts = (plain[:, :, None] == np.arange(n)).sum(axis=1)
    a, b = counts.astype(np.float64) ** 2, plain_counts.astype(np.float64) ** 2
    se = np.sqrt(a.var(axis=0, ddof=1) / num_runs + b.var(axis=0, ddof=1) / num_runs)
    positive = WEIGHTS > 0
    z = np.abs(a.mean(axis=0) - b.mean(axis=0))[positive] / se[positive]
    assert np.all(z < NUM_SE), z


SCHEMES_BY_NAME = {
    "multinomial": resampling.multinomial,
    "stratified": resampling.stratified,
    "systematic": resampling.systematic,
}


@pytest.mark.parametrize("method", sorted(resampling.CONDITIONAL_SCHEMES))
def test_conditional_resampling_is_the_same_with_and_without_jit(method):
    log_weights = jnp.log(jnp.asarray(WEIGHTS, jnp.float32))

    def draw(key, ancestor):
        return resampling.conditional_indices(key, log_weights, ancestor, method)

    for i, ancestor in enumerate([0, 1, 3, 4, 5]):
        key = jax.random.key(i)
        np.testing.assert_array_equal(draw(key, ancestor), jax.jit(draw)(key, ancestor))


def test_conditional_resampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown method 'residual'"):
        resampling.conditional_indices(jax.random.key(0), jnp.zeros(4), 0, "residual")
    with pytest.raises(ValueError, match=r"one particle axis.*\(4, 2\)"):
        resampling.conditional_indices(jax.random.key(0), jnp.zeros((4, 2)), 0)


# ---------------------------------------------------------------------------
# Conditional SMC keeps the reference.
# ---------------------------------------------------------------------------

T_SMALL, N_SMALL = 5, 8
YS_SMALL = simulate(jax.random.key(0), PARAMS, T_SMALL)[1]


def small_csmc(key, reference, method="systematic", ancestor_sampling=True):
    targets, proposals = step_programs(PARAMS, YS_SMALL, N_SMALL)
    return pmcmc.csmc(
        key,
        targets,
        proposals,
        reference,
        site="x",
        method=method,
        ancestor_sampling=ancestor_sampling,
    )


@pytest.mark.parametrize("method", sorted(resampling.CONDITIONAL_SCHEMES))
def test_csmc_keeps_the_reference_particle_exactly(method):
    reference = jnp.linspace(-1.0, 1.0, T_SMALL)[:, None]

    def run(key):
        return (
            small_csmc(key, reference, method, ancestor_sampling=True),
            small_csmc(key, reference, method, ancestor_sampling=False),
        )

    runs = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(1), 16))
    with_as, without_as = runs
    for history in runs:
        assert history.values.shape == (16, T_SMALL, N_SMALL, 1)
        np.testing.assert_array_equal(
            history.values[:, :, 0], np.broadcast_to(reference, (16, T_SMALL, 1))
        )
        assert np.all(np.isfinite(history.log_weights))
    # Without ancestor sampling the reference keeps its own lineage...
    np.testing.assert_array_equal(without_as.ancestors[:, :, 0], 0)
    one = jax.tree_util.tree_map(lambda x: x[0], without_as)
    path = smoothing.trace_genealogy(one, jnp.array([0]))
    np.testing.assert_array_equal(path.values[:, 0], reference)
    # ... with it, its ancestors are re-drawn.
    assert np.any(with_as.ancestors[:, 1:, 0] != 0)


def test_csmc_is_the_same_with_and_without_jit():
    reference = jnp.zeros((T_SMALL, 1))
    key = jax.random.key(2)
    eager = small_csmc(key, reference)
    jitted = jax.jit(small_csmc)(key, reference)
    np.testing.assert_array_equal(eager.ancestors, jitted.ancestors)
    np.testing.assert_allclose(eager.values, jitted.values, rtol=1e-6)
    np.testing.assert_allclose(eager.log_weights, jitted.log_weights, rtol=1e-5)


# ---------------------------------------------------------------------------
# Particle Gibbs: invariant for the smoothing law, and mixing.
# ---------------------------------------------------------------------------

T_PG = 8
YS_PG = simulate(jax.random.key(0), PARAMS, T_PG)[1]
NUM_ITERATIONS = 10


@functools.cache
def pg_chains(method, draw, num_particles, ancestor_sampling=True, seed=0):
    """Exact starting draws and 64 (N >= 32) or 128 chains of 10 moves."""
    filtered = kalman_filter(PARAMS, YS_PG)
    targets, proposals = step_programs(PARAMS, YS_PG, num_particles)
    num_chains = 64 if num_particles >= 32 else 128

    def chain(key):
        key_start, key_moves = jax.random.split(key)
        start = smoother_sample(key_start, PARAMS, filtered)
        result = pmcmc.particle_gibbs(
            key_moves,
            targets,
            proposals,
            start,
            NUM_ITERATIONS,
            site="x",
            method=method,
            draw=draw,
            ancestor_sampling=ancestor_sampling,
        )
        return start, result

    keys = jax.random.split(jax.random.key(seed), num_chains)
    start, result = jax.device_get(jax.jit(jax.vmap(chain))(keys))
    paths = np.concatenate([start[:, None], result.trajectories], axis=1)
    return paths[..., 0].astype(np.float64), result.update_rate


@functools.cache
def exact_smoothing_moments():
    """RTS means, variances and lag-one covariances Cov(x_t, x_{t+1} | y)."""
    filtered = kalman_filter(PARAMS, YS_PG)
    smoothed = rts_smoother(PARAMS, filtered)
    mean = np.asarray(smoothed.smoothed_means[:, 0], np.float64)
    var = np.asarray(smoothed.smoothed_covs[:, 0, 0], np.float64)
    # Cov(x_t, x_{t+1} | y) = G_t P^s_{t+1}, G_t = P_t A / P^-_{t+1}.
    a = float(PARAMS.A[0, 0])
    gain = np.asarray(filtered.filtered_covs[:-1, 0, 0], np.float64) * a
    gain /= np.asarray(filtered.predicted_covs[1:, 0, 0], np.float64)
    return mean, var, gain * var[1:]


@pytest.mark.parametrize(
    ("method", "draw", "num_particles"),
    [
        ("multinomial", "genealogy", 32),
        ("systematic", "genealogy", 32),
        ("systematic", "backward", 32),
        ("multinomial", "genealogy", 4),  # exact for any N >= 2
    ],
)
def test_particle_gibbs_keeps_the_smoothing_law_and_mixes(method, draw, num_particles):
    paths, update_rate = pg_chains(method, draw, num_particles)  # (C, K + 1, T)
    mean, var, cross = exact_smoothing_moments()
    moved = paths[:, 1:]  # after 1..K moves from an exact draw
    centred = moved - mean
    z_mean = z_scores(moved.mean(axis=1), mean)
    z_var = z_scores((centred**2).mean(axis=1), var)
    z_cross = z_scores((centred[:, :, :-1] * centred[:, :, 1:]).mean(axis=1), cross)
    assert np.all(z_mean < NUM_SE), z_mean
    assert np.all(z_var < NUM_SE), z_var
    assert np.all(z_cross < NUM_SE), z_cross
    # Lag-1 autocorrelation of x_t across iterations (stationary moments).
    lag1 = ((paths[:, 1:] - mean) * (paths[:, :-1] - mean)).mean(axis=(0, 1)) / var
    if num_particles >= 32:
        assert np.all(lag1 < 0.5), lag1
        assert np.all(update_rate.mean(axis=0) > 0.75), update_rate.mean(axis=0)
    else:
        assert np.all(lag1 < 0.9), lag1


def test_without_ancestor_sampling_early_states_are_updated_less_often():
    """Plain CSMC: the reference lineage survives, so x_0 is often kept.

    With ancestor sampling every state's update rate is above 0.75 (the test
    above; about 0.9); without it, the rate at t = 0 (about 0.7) is well
    below that at t = T - 1 (about 0.95).
    """
    _, update_rate = pg_chains("systematic", "genealogy", 32, ancestor_sampling=False)
    rate = update_rate.mean(axis=0)  # 64 chains * 10 moves each: SE < 0.02
    assert rate[-1] > rate[0] + 0.1, rate


# ---------------------------------------------------------------------------
# PMMH: the posterior of the transition coefficient a.
# ---------------------------------------------------------------------------

T_PMMH, N_PMMH = 20, 64
YS_PMMH = simulate(jax.random.key(1), PARAMS, T_PMMH)[1]
PMMH_CHAINS, PMMH_ITERATIONS, BURN_IN = 24, 250, 20


def params_at(a):
    return dataclasses.replace(PARAMS, A=jnp.reshape(a, (1, 1)))


def make_filter(theta):
    return lgssm.bootstrap_filter(params_at(theta["a"]), YS_PMMH, N_PMMH, record=None)


def uniform_prior():
    numpyro.sample("a", dist.Uniform(-1.0, 1.0))


@functools.cache
def grid_posterior():
    """Grid of a over (-1, 1) and its normalised posterior weights."""
    grid = jnp.linspace(-1.0, 1.0, 4001)[1:-1]
    log_lik = jax.vmap(lambda a: kalman_filter(params_at(a), YS_PMMH).log_likelihood)
    weights = jax.nn.softmax(log_lik(grid))  # flat prior density on (-1, 1)
    return np.asarray(grid, np.float64), np.asarray(weights, np.float64)


def test_pmmh_matches_the_grid_posterior_of_the_transition_coefficient():
    grid, weights = grid_posterior()
    mean = weights @ grid
    var = weights @ (grid - mean) ** 2
    key_start, key_chain = jax.random.split(jax.random.key(3))
    starts = jax.random.choice(
        key_start,
        jnp.asarray(grid, jnp.float32),
        (PMMH_CHAINS,),
        p=jnp.asarray(weights),
    )

    def chain(key, a):
        return pmcmc.pmmh(
            key, make_filter, {"a": a}, PMMH_ITERATIONS, scale=1.0, prior=uniform_prior
        )

    keys = jax.random.split(key_chain, PMMH_CHAINS)
    result = jax.device_get(jax.jit(jax.vmap(chain))(keys, starts))
    a = np.asarray(result.thetas["a"], np.float64)
    assert a.shape == (PMMH_CHAINS, PMMH_ITERATIONS)
    assert np.all((a > -1) & (a < 1))  # the support is kept
    assert np.all(np.isfinite(result.log_Z))
    kept = a[:, BURN_IN:]
    z_mean = z_scores(kept.mean(axis=1), mean)
    z_var = z_scores(((kept - mean) ** 2).mean(axis=1), var)
    assert z_mean < NUM_SE, (kept.mean(), mean, z_mean)
    assert z_var < NUM_SE, (((kept - mean) ** 2).mean(), var, z_var)
    accepted = np.asarray(result.accepted, np.float64)
    np.testing.assert_allclose(result.acceptance_rate, accepted.mean(axis=1))
    assert 0.1 < accepted.mean() < 0.9, accepted.mean()
    # A rejected move keeps theta and its log Z-hat.
    rejected = ~result.accepted[:, 1:]
    np.testing.assert_array_equal(a[:, 1:][rejected], a[:, :-1][rejected])
    np.testing.assert_array_equal(
        result.log_Z[:, 1:][rejected], result.log_Z[:, :-1][rejected]
    )


def q_params_at(q_scale):
    """The transition noise covariance is ``q_scale^2``."""
    return dataclasses.replace(PARAMS, Q=jnp.reshape(q_scale**2, (1, 1)))


def half_normal_prior():
    numpyro.sample("q", dist.HalfNormal(2.0))


def test_pmmh_keeps_a_positive_parameter_positive_and_matches_its_grid_posterior():
    """The transition noise scale under a HalfNormal(2) prior: the random walk
    runs on log q (numpyro's bijection for the positive support, with its
    Jacobian), so q stays positive and the draws follow prior x Kalman
    likelihood on a grid."""
    grid = jnp.linspace(1e-3, 4.0, 4000)
    log_lik = jax.vmap(lambda q: kalman_filter(q_params_at(q), YS_PMMH).log_likelihood)(
        grid
    )
    log_post = log_lik + dist.HalfNormal(2.0).log_prob(grid)
    weights = np.asarray(jax.nn.softmax(log_post), np.float64)
    grid = np.asarray(grid, np.float64)
    mean = weights @ grid
    key_start, key_chain = jax.random.split(jax.random.key(5))
    starts = jax.random.choice(
        key_start, jnp.asarray(grid, jnp.float32), (PMMH_CHAINS,), p=weights
    )

    def make(theta):
        return lgssm.bootstrap_filter(
            q_params_at(theta["q"]), YS_PMMH, N_PMMH, record=None
        )

    def chain(key, q):
        return pmcmc.pmmh(
            key, make, {"q": q}, PMMH_ITERATIONS, scale=0.5, prior=half_normal_prior
        )

    result = jax.device_get(
        jax.jit(jax.vmap(chain))(jax.random.split(key_chain, PMMH_CHAINS), starts)
    )
    q = np.asarray(result.thetas["q"], np.float64)
    assert np.all(q > 0)
    kept = q[:, BURN_IN:]
    z_mean = z_scores(kept.mean(axis=1), mean)
    assert z_mean < NUM_SE, (kept.mean(), mean, z_mean)
    assert 0.1 < float(np.mean(result.accepted)) < 0.95


def test_pmmh_without_a_prior_walks_the_raw_parameters():
    ys = YS_SMALL

    def make(theta):
        return lgssm.bootstrap_filter(params_at(theta), ys, N_SMALL, record=None)

    result = jax.jit(lambda key: pmcmc.pmmh(key, make, jnp.float32(0.5), 4, scale=0.1))(
        jax.random.key(4)
    )
    assert result.thetas.shape == (4,) and result.log_Z.shape == (4,)
    moved = np.asarray(result.accepted)
    assert np.all((np.diff(np.r_[0.5, result.thetas]) != 0) == moved)


# ---------------------------------------------------------------------------
# Errors at trace time name the function, the site and the shapes.
# ---------------------------------------------------------------------------


def test_pmcmc_errors_name_the_function_site_and_shapes():
    key = jax.random.key(0)
    targets, proposals = step_programs(PARAMS, YS_SMALL, N_SMALL)
    with pytest.raises(ValueError, match=r"csmc\(site='x'\).*'x'.*\(8, 1\).*\(2,\)"):
        pmcmc.csmc(key, targets, proposals, jnp.zeros((T_SMALL, 2)), site="x")
    with pytest.raises(ValueError, match=r"csmc.*T >= 2.*\(1, 1\)"):
        pmcmc.csmc(key, targets, proposals, jnp.zeros((1, 1)), site="x")
    with pytest.raises(ValueError, match=r"csmc.*latent sites \['x'\].*'z'"):
        pmcmc.csmc(key, targets, proposals, jnp.zeros((T_SMALL, 1)), site="z")
    with pytest.raises(ValueError, match=r"csmc.*method must be one of"):
        small_csmc(key, jnp.zeros((T_SMALL, 1)), method="residual")
    with pytest.raises(TypeError, match=r"csmc.*proposals must be a callable"):
        pmcmc.csmc(key, targets, [proposals(0)], jnp.zeros((T_SMALL, 1)), site="x")

    def with_extra_latent(t):
        def program(*x_prev):
            with numpyro.plate("particles", N_SMALL):
                x = numpyro.sample(
                    "x", dist.Normal(jnp.zeros((N_SMALL, 1)), 1.0).to_event(1)
                )
                numpyro.sample("u", dist.Normal(0.0, 1.0))
            return (x,)

        return program

    with pytest.raises(
        ValueError, match=r"proposals\(0\) has latent sites \['u', 'x'\]"
    ):
        pmcmc.csmc(key, targets, with_extra_latent, jnp.zeros((T_SMALL, 1)), site="x")
    with pytest.raises(ValueError, match=r"particle_gibbs_step: draw must be one"):
        pmcmc.particle_gibbs(
            key, targets, proposals, jnp.zeros((T_SMALL, 1)), 2, site="x", draw="imh"
        )
    with pytest.raises(ValueError, match=r"particle_gibbs: num_iterations"):
        pmcmc.particle_gibbs(
            key, targets, proposals, jnp.zeros((T_SMALL, 1)), 0, site="x"
        )

    def make(theta):
        return lgssm.bootstrap_filter(params_at(theta["a"]), YS_SMALL, 4, record=None)

    with pytest.raises(ValueError, match=r"pmmh: theta has keys \['b'\].*\['a'\]"):
        pmcmc.pmmh(key, make, {"b": 0.5}, 2, scale=0.1, prior=uniform_prior)
    with pytest.raises(ValueError, match=r"pmmh: theta\['a'\] has shape \(2,\)"):
        pmcmc.pmmh(key, make, {"a": jnp.zeros(2)}, 2, scale=0.1, prior=uniform_prior)
    with pytest.raises(ValueError, match=r"pmmh: make_filter\(theta\) returned an unw"):
        pmcmc.pmmh(key, lambda theta: uniform_prior, {"a": 0.5}, 2, scale=0.1)
    with pytest.raises(ValueError, match=r"pmmh: scale must be a float or a pytree"):
        pmcmc.pmmh(key, make, {"a": 0.5}, 2, scale=jnp.ones(3), prior=uniform_prior)
    with pytest.raises(ValueError, match=r"pmmh: num_iterations must be"):
        pmcmc.pmmh(key, make, {"a": 0.5}, 0, scale=0.1, prior=uniform_prior)
    with pytest.raises(ValueError, match=r"pmmh: without a prior, init_theta"):
        pmcmc.pmmh(key, make, None, 2, scale=0.1)
