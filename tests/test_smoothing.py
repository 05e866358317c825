"""Particle smoothing and score-gradient resampling against exact answers.

Model (programs.lgssm_exact.default_params(1)): x_0 ~ N(0, 1),
x_t | x_{t-1} ~ N(0.9 x_{t-1}, 1), y_t | x_t ~ N(x_t, 0.5^2), T = 5 steps of
data simulated with a fixed key. The RTS smoother gives the smoothing means
and variances, the Kalman filter log p(y) and (by jax.grad) its gradient in
the transition coefficient A.

Statistical checks hold for any seed: R independent replications, each giving
one estimate per step; the mean of the R estimates must be within 5 standard
errors (from their spread) of the exact value. The smoothers' estimates are
self-normalised, so biased by O(1/N); with R = 64 replications of N = 256
particles the bias is below half a standard error.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix
from combinators import algo, smoothing
from programs import lgssm
from programs.lgssm_exact import default_params, kalman_filter, rts_smoother, simulate

T = 5
NUM_SE = 5.0
PARAMS = default_params(1)
YS = simulate(jax.random.key(0), PARAMS, T)[1]


def transition_targets(params, num_particles):
    """The step targets ``t >= 1`` the filter uses (``t`` may be traced)."""
    return lambda t: lgssm.transition_target(params, YS, num_particles, t)


def filter_program(num_particles, params=PARAMS, record=None):
    return lgssm.bootstrap_filter(
        params,
        YS,
        num_particles,
        record=smoothing.record_particles("x", record=record),
    )


def particles_of(program, key):
    _, _, metrics = coix.traced_evaluate(program, seed=key)()
    return smoothing.particle_history(metrics)


def z_scores(estimates, exact):
    """|mean - exact| / standard error, per entry, over axis 0 (replications)."""
    estimates = np.asarray(estimates, np.float64)
    se = estimates.std(axis=0, ddof=1) / np.sqrt(estimates.shape[0])
    return np.abs(estimates.mean(axis=0) - np.asarray(exact, np.float64)) / se


@functools.cache
def smoothed_moments(num_particles=256, num_runs=64, seed=0):
    """Per-replication smoothed means and variances, shape (R, T), by method."""
    program = filter_program(num_particles)
    targets = transition_targets(PARAMS, num_particles)

    def one(key):
        key_filter, key_exact, key_imh = jax.random.split(key, 3)
        particles = particles_of(program, key_filter)
        paths = {
            "exact": smoothing.ffbs(key_exact, targets, particles),
            "imh": smoothing.ffbs(key_imh, targets, particles, backward="imh"),
        }
        moments = {
            name: (jnp.mean(p.values[..., 0], 1), jnp.var(p.values[..., 0], 1))
            for name, p in paths.items()
        }
        genealogy = smoothing.trace_genealogy(particles)
        w = jax.nn.softmax(genealogy.log_weights)
        moments["genealogy_final_mean"] = w @ genealogy.values[-1, :, 0]
        return moments

    keys = jax.random.split(jax.random.key(seed), num_runs)
    return jax.device_get(jax.jit(jax.vmap(one))(keys))


@functools.cache
def exact_smoother():
    filtered = kalman_filter(PARAMS, YS)
    smoothed = rts_smoother(PARAMS, filtered)
    return filtered, smoothed


# ---------------------------------------------------------------------------
# Forward filtering, backward simulation: smoothed moments match RTS.
# ---------------------------------------------------------------------------


def test_smoothed_means_and_variances_match_rts_for_every_backward_kernel():
    """One set of filter runs (computed once) serves every smoother."""
    moments = smoothed_moments()
    filtered, smoothed = exact_smoother()
    for backward in smoothing.BACKWARD_KERNELS:
        means, variances = moments[backward]
        z_mean = z_scores(means, smoothed.smoothed_means[:, 0])
        z_var = z_scores(variances, smoothed.smoothed_covs[:, 0, 0])
        assert np.all(z_mean < NUM_SE), (backward, z_mean)
        assert np.all(z_var < NUM_SE), (backward, z_var)
    # The genealogy's last step is the filter: its mean is the Kalman mean.
    z = z_scores(moments["genealogy_final_mean"], filtered.filtered_means[-1, 0])
    assert z < NUM_SE, z


# ---------------------------------------------------------------------------
# Genealogy tracing: exact bookkeeping against a hand-written loop.
# ---------------------------------------------------------------------------


def test_genealogy_follows_the_recorded_ancestors_and_ends_at_the_filter():
    n = 8
    program = filter_program(n, record=lgssm.filtering_mean)
    _, _, metrics = coix.traced_evaluate(program, seed=jax.random.key(3))()
    particles = smoothing.particle_history(metrics)
    paths = smoothing.trace_genealogy(particles)
    ancestors = np.asarray(particles.ancestors)
    np.testing.assert_array_equal(ancestors[0], np.arange(n))
    assert np.any(ancestors[1:] != np.arange(n))  # resampling moved particles
    index = np.arange(n)
    for t in range(T - 1, -1, -1):
        np.testing.assert_array_equal(paths.indices[t], index)
        np.testing.assert_array_equal(
            paths.values[t], np.asarray(particles.values[t])[index]
        )
        index = ancestors[t][index]
    np.testing.assert_array_equal(paths.values[-1], particles.values[-1])
    np.testing.assert_array_equal(paths.log_weights, particles.log_weights[-1])
    weighted = jax.nn.softmax(paths.log_weights) @ paths.values[-1]
    recorded = metrics["history"].records["filtering_mean"][-1]
    np.testing.assert_allclose(weighted, recorded, rtol=1e-6)
    # The recorded outputs are the states the next targets take.
    np.testing.assert_array_equal(particles.outputs[0], particles.values)


def test_resample_reports_ancestors_only_when_asked():
    zs = jnp.array([-1.0, 0.2, 0.9, 3.0])

    def p():
        with numpyro.plate("particles", 4):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
        return (z,)

    def q():  # known particles: each new one must be a copy of its ancestor
        with numpyro.plate("particles", 4):
            return (numpyro.sample("z", dist.Delta(zs)),)

    key = jax.random.key(0)
    plain = coix.traced_evaluate(coix.resample(coix.propose(p, q)), seed=key)()
    asked = coix.traced_evaluate(
        coix.resample(coix.propose(p, q), record_ancestors=True), seed=key
    )()
    assert "ancestors" not in plain[2]
    ancestors = np.asarray(asked[2]["ancestors"])
    assert ancestors.shape == (4,) and ancestors.dtype.kind == "i"
    np.testing.assert_array_equal(asked[1]["z"].value, zs[ancestors])
    np.testing.assert_array_equal(asked[1]["z"].value, plain[1]["z"].value)


# ---------------------------------------------------------------------------
# jit, and errors at trace time.
# ---------------------------------------------------------------------------


def test_ffbs_is_the_same_with_and_without_jit():
    n = 8
    targets = transition_targets(PARAMS, n)
    particles = particles_of(filter_program(n), jax.random.key(5))

    def run(key, particles):
        return [
            smoothing.ffbs(key, targets, particles, backward=backward)
            for backward in smoothing.BACKWARD_KERNELS
        ]

    key = jax.random.key(6)
    for eager, jitted in zip(
        run(key, particles), jax.jit(run)(key, particles), strict=True
    ):
        np.testing.assert_array_equal(eager.indices, jitted.indices)
        np.testing.assert_allclose(eager.values, jitted.values, rtol=1e-6)


def test_smoothing_errors_name_the_function_site_and_shapes():
    n = 8
    particles = particles_of(filter_program(n), jax.random.key(0))
    targets = transition_targets(PARAMS, n)
    key = jax.random.key(1)

    with pytest.raises(ValueError, match=r"record_particles.*no latent site 'z'"):
        coix.traced_evaluate(
            lgssm.bootstrap_filter(
                PARAMS, YS, n, record=smoothing.record_particles("z")
            ),
            seed=key,
        )()
    wrong_site = dataclasses.replace(particles, site="y")
    with pytest.raises(ValueError, match=r"ffbs.*no latent site 'y'"):
        smoothing.ffbs(key, targets, wrong_site)

    def with_extra_latent(t):
        def program(x_prev):
            with numpyro.plate("particles", n):
                x = numpyro.sample("x", dist.Normal(0.9 * x_prev[..., 0], 1.0))
                numpyro.sample("u", dist.Normal(0.0, 1.0))
            return (x,)

        return program

    with pytest.raises(ValueError, match=r"ffbs.*\['u'\] besides.*'x'"):
        smoothing.ffbs(key, with_extra_latent, particles)
    with pytest.raises(ValueError, match=r"ffbs.*\(16,\).*\(8,\)"):
        smoothing.ffbs(key, transition_targets(PARAMS, 16), particles)
    with pytest.raises(ValueError, match=r"imh.*num_trajectories must be N = 8"):
        smoothing.ffbs(key, targets, particles, 4, backward="imh")
    with pytest.raises(ValueError, match=r"backward must be one of"):
        smoothing.ffbs(key, targets, particles, backward="rejection")
    with pytest.raises(TypeError, match=r"ffbs.*callable targets\(t\)"):
        smoothing.ffbs(key, [targets(1)] * T, particles)
    with pytest.raises(ValueError, match=r"particle_history: no particles"):
        _, _, metrics = coix.traced_evaluate(
            lgssm.bootstrap_filter(PARAMS, YS, n), seed=key
        )()
        smoothing.particle_history(metrics)
    with pytest.raises(ValueError, match=r"trace_genealogy.*shape \(8,\)"):
        smoothing.trace_genealogy(
            dataclasses.replace(particles, log_weights=particles.log_weights[0])
        )


# ---------------------------------------------------------------------------
# Score-gradient resampling (Ścibior & Wood 2021).
# ---------------------------------------------------------------------------


def params_at(a):
    return dataclasses.replace(PARAMS, A=a * jnp.eye(1))


def log_z_hat(a, key, num_particles, score_gradient):
    model_params = params_at(a)
    program = algo.smc(
        step_targets(model_params, num_particles),
        lambda t: lgssm.bootstrap_proposal(model_params, YS, num_particles, t),
        num_targets=T,
        score_gradient=score_gradient,
        record=lambda out, trace, metrics: {"log_weight": metrics.log_weight},
    )
    _, _, metrics = coix.traced_evaluate(program, seed=key)()
    return metrics.log_Z, metrics["history"].records["log_weight"]


def step_targets(model_params, n):
    """``targets(t)`` of the filter: the initial target at a static 0."""

    def targets(t):
        if isinstance(t, int) and t == 0:
            return lgssm.initial_target(model_params, YS, n)
        return lgssm.transition_target(model_params, YS, n, t)

    return targets


def test_score_gradient_leaves_every_forward_value_unchanged():
    key = jax.random.key(2)
    default = log_z_hat(0.9, key, 16, False)
    scored = log_z_hat(0.9, key, 16, True)
    for a, b in zip(default, scored, strict=True):
        np.testing.assert_array_equal(a, b)


@functools.cache
def gradient_runs(num_particles=32, num_runs=1000, seed=0):
    """(Z-hat / Z) * d log Z-hat / dA over R runs, for both estimators."""
    keys = jax.random.split(jax.random.key(seed), num_runs)
    exact = kalman_filter(PARAMS, YS).log_likelihood
    out = {}
    for score in (False, True):

        def one(key, score=score):
            value, grad = jax.value_and_grad(
                lambda a: log_z_hat(a, key, num_particles, score)[0]
            )(0.9)
            return jnp.exp(value - exact) * grad

        out[score] = np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)
    return out


def test_score_gradient_of_z_hat_is_unbiased_and_the_default_is_not():
    """E[grad Z-hat] / Z = grad log Z exactly (any N) with the score term."""
    exact = float(
        jax.grad(lambda a: kalman_filter(params_at(a), YS).log_likelihood)(0.9)
    )
    runs = gradient_runs()
    z_unbiased = z_scores(runs[True], exact)
    z_default = z_scores(runs[False], exact)
    assert z_unbiased < NUM_SE, (runs[True].mean(), exact, z_unbiased)
    assert z_default > 3 * NUM_SE, (runs[False].mean(), exact, z_default)


def test_vsmc_score_gradient_loss_keeps_its_value_and_has_the_log_z_gradient():
    n = 8

    def metrics_at(a, key):
        model_params = params_at(a)
        program = algo.vsmc(
            step_targets(model_params, n),
            lambda t: lgssm.bootstrap_proposal(model_params, YS, n, t),
            num_targets=T,
            form="incremental",
            score_gradient=True,
        )
        return coix.traced_evaluate(program, seed=key)()[2]

    key = jax.random.key(4)

    def loss_and_log_z(a):
        metrics = metrics_at(a, key)
        return jnp.stack([metrics.loss, metrics.log_Z])

    (loss, log_z), (grad_loss, grad_log_z) = jax.jit(
        lambda a: (loss_and_log_z(a), jax.jacrev(loss_and_log_z)(a))
    )(0.9)
    np.testing.assert_allclose(loss, -log_z, rtol=1e-5)
    assert abs(float(grad_log_z)) > 0.1
    np.testing.assert_allclose(grad_loss, -grad_log_z, rtol=1e-5)
