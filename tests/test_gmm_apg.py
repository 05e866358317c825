"""Amortised population Gibbs on the Gaussian mixture (programs/gmm_apg.py).

Model: mu_k ~ N(0, sigma_0^2 I), c_n ~ Uniform{1..K}, x_n ~ N(mu_{c_n}, sigma^2 I).
The known-answer check uses the exact conjugate Gibbs kernels: a Gibbs
kernel is its own reverse kernel, so every APG sweep has incremental weight
p(x, z') p(z_b | z_-b) / (p(x, z) p(z'_b | z_-b)) = 1 exactly, and the
particles are posterior draws of the means.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import combinators
from combinators.train import train
from programs import gmm_apg as gmm

K = gmm.NUM_CLUSTERS


def log_normal(x, loc, scale):
    return -0.5 * np.log(2 * np.pi * scale**2) - 0.5 * ((x - loc) / scale) ** 2


def hand_log_joint(x, mu, c):
    """log p(x, mu, c) in float64 numpy, one (particle, instance) at a time.

    x: (B, N, 2); mu: (P, B, K, 2); c: (P, B, N).
    """
    x, mu = np.asarray(x, np.float64), np.asarray(mu, np.float64)
    c = np.asarray(c).astype(int)
    out = np.zeros(c.shape[:-1])
    for p, b in np.ndindex(*c.shape[:-1]):
        m, z = mu[p, b], c[p, b]
        out[p, b] = (
            log_normal(m, 0.0, gmm.PRIOR_SCALE).sum()
            - z.size * np.log(K)
            + log_normal(x[b], m[z], gmm.NOISE_SCALE).sum()
        )
    return out


def test_clustering_accuracy_is_invariant_to_relabelling():
    truth = jnp.array([[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2]])
    relabelled = jnp.array([2, 0, 1])[truth]
    np.testing.assert_allclose(gmm.clustering_accuracy(relabelled, truth), [1.0, 1.0])
    one_wrong = relabelled.at[0, 0].set(relabelled[0, 2])
    np.testing.assert_allclose(gmm.clustering_accuracy(one_wrong, truth), [5 / 6, 1.0])


# Training and the untrained-program checks share one configuration, so
# the forward program and the training step are each compiled once.
NUM_PARTICLES, NUM_SWEEPS, BATCH_SIZE = 4, 1, 8


@functools.cache
def held_out_evaluation():
    """A jitted ``(params, key) -> (outputs, trace, metrics)`` on held-out data."""
    held_out = gmm.simulate(jax.random.key(9), 50)
    program = functools.partial(gmm.make_program, num_particles=NUM_PARTICLES)

    @jax.jit
    def evaluate(params, key):
        p = program(params, num_sweeps=NUM_SWEEPS)
        return combinators.traced_evaluate(p, seed=key)(held_out.x)

    return held_out, evaluate


def test_untrained_program_has_finite_weights_and_particle_by_batch_shapes():
    held_out, evaluate = held_out_evaluation()
    num_instances = held_out.x.shape[0]
    params = gmm.init_params(jax.random.key(7))
    (x, mu, c), trace, metrics = evaluate(params, jax.random.key(5))
    assert metrics["log_weight"].shape == (NUM_PARTICLES, num_instances)
    assert mu.shape == trace["mu"].value.shape == (NUM_PARTICLES, num_instances, K, 2)
    assert c.shape == trace["c"].value.shape
    assert c.shape == (NUM_PARTICLES, num_instances, gmm.NUM_POINTS)
    assert x.shape == held_out.x.shape
    assert trace["mu"].log_prob.shape == (NUM_PARTICLES, num_instances)
    assert np.all(np.isfinite(metrics["log_weight"]))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["log_Z"])
    assert 1.0 <= float(metrics["ess"]) <= NUM_PARTICLES
    assert np.all((c >= 0) & (c < K))


def test_target_log_density_matches_hand_computation():
    # The program's trace is the target's: every site scored by p(mu, c, x).
    held_out, evaluate = held_out_evaluation()
    _, trace, _ = evaluate(gmm.init_params(jax.random.key(7)), jax.random.key(5))
    mu, c = trace["mu"].value, trace["c"].value
    assert trace["x"].observed and not trace["mu"].observed
    assert not trace["c"].observed
    total = trace["mu"].log_prob + trace["c"].log_prob + trace["x"].log_prob
    assert total.shape == (NUM_PARTICLES, held_out.x.shape[0])
    expected = hand_log_joint(held_out.x, mu, c)
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_allclose(gmm.log_joint(held_out.x, mu, c), expected, rtol=1e-5)


def test_short_training_decreases_the_loss():
    held_out, evaluate = held_out_evaluation()
    init_params = gmm.init_params(jax.random.key(7))
    result = train(
        functools.partial(
            gmm.loss_fn,
            batch_size=BATCH_SIZE,
            num_particles=NUM_PARTICLES,
            num_sweeps=NUM_SWEEPS,
        ),
        init_params,
        optax.adam(1e-2),
        60,
        seed=jax.random.key(8),
        progress=False,
        return_result=True,
        log_every=60,
        data=gmm.simulate(jax.random.key(6), 500).x,
    )
    assert np.all(np.isfinite(result.history["loss"])) and result.skipped == 0
    # The same held-out instances and keys before and after training; the
    # loss varies by about 1% between keys, training lowers it by about 35%.
    keys = jax.random.split(jax.random.key(10), 3)
    before = np.mean([evaluate(init_params, k)[2]["loss"] for k in keys])
    after = np.mean([evaluate(result.params, k)[2]["loss"] for k in keys])
    assert after < 0.85 * before, (before, after)


def well_separated_instance(key, num_points=30):
    """One instance with three far-apart clusters of equal size."""
    mu = jnp.array([[-6.0, -4.0], [6.0, -4.0], [0.0, 6.0]])
    c = jnp.arange(num_points) % K
    x = mu[c] + gmm.NOISE_SCALE * jax.random.normal(key, (num_points, 2))
    return gmm.Data(x=x[None], c=c[None], mu=mu[None])


def align_to(reference, means):
    """Relabels each particle's means to best match ``reference`` (K, 2)."""
    perms = np.asarray(list(itertools.permutations(range(K))))
    aligned = means[:, perms]  # (P, K!, K, 2)
    cost = np.sum((aligned - reference) ** 2, axis=(-2, -1))
    return aligned[np.arange(means.shape[0]), np.argmin(cost, axis=1)]


@functools.cache
def exact_apg(num_particles=200, num_sweeps=4):
    """APG with the exact conjugate Gibbs kernels, jitted once."""
    program = gmm.make_program(None, num_particles, num_sweeps)
    return jax.jit(lambda key, x: combinators.traced_evaluate(program, seed=key)(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_gibbs_kernels_recover_the_means_with_unit_incremental_weights(seed):
    num_particles = 200
    key_data, key_program = jax.random.split(jax.random.key(seed))
    data = well_separated_instance(key_data)
    (_, mu, c), _, metrics = exact_apg(num_particles)(key_program, data.x)

    # Gibbs kernels are their own reverse kernels: after the last resampling
    # every sweep multiplies the weights by exactly 1, so they stay equal.
    log_weight = np.asarray(metrics["log_weight"])[:, 0]
    np.testing.assert_allclose(log_weight, log_weight[0], atol=1e-2)
    assert float(metrics["ess"]) == pytest.approx(num_particles, rel=1e-4)

    # The conditional posterior of the means given the true assignments,
    # which is the posterior up to a negligible mass on other assignments.
    post_loc, post_scale = (
        np.asarray(a) for a in gmm.exact_mean_posterior(data.x[0], data.c[0])
    )
    # The clusters are more than 11 sigma apart: every particle assigns every
    # point correctly, so the last sweep drew each particle's means
    # independently from p(mu | x, c_true), the posterior up to a negligible
    # mass on other assignments. Their average is within 5 standard errors.
    accuracy = np.asarray(gmm.clustering_accuracy(c[:, 0], data.c[0]))
    np.testing.assert_array_equal(accuracy, 1.0)
    means = align_to(post_loc, np.asarray(mu[:, 0]))
    standard_error = post_scale / np.sqrt(num_particles)
    error = np.abs(means.mean(axis=0) - post_loc)
    assert np.all(error < 5 * standard_error), (error, standard_error)
    # ... and the draws spread like the posterior (not collapsed, not wide):
    # the sample sd of P normal draws has relative error 1 / sqrt(2 (P - 1)),
    # 5% here; allow 6 of those.
    spread = means.std(axis=0, ddof=1)
    tolerance = 6 / np.sqrt(2 * (num_particles - 1))
    assert np.all(np.abs(spread / post_scale - 1) < tolerance), spread / post_scale
    # The data pin the means down: the posterior is near the truth.
    assert np.all(np.abs(post_loc - np.asarray(data.mu[0])) < 1.0)
