"""The deep Markov model program (programs/dmm.py): VSMC over a batch of sequences.

* Shapes: log weights are ``(particles, batch)``, every value is finite, and
  the VSMC loss is ``-log Z-hat`` (the sum of the per-step IWAE losses).
* Unbiasedness against exact inference: with linear maps in place of the
  networks (``LinearGaussianDMM``) the model is a linear-Gaussian state
  space, whose evidence ``Z_b = p(x^b_{0:T-1})`` a Kalman filter computes
  (here in float64 NumPy). Each column of the batch is an independent
  particle filter, so one run gives B independent ratios ``Z-hat_b / Z_b``
  with mean 1 (Del Moral 2004, "Feynman-Kac Formulae", Thm. 7.4.2); their
  average is checked to 4 standard errors of its own sample spread.
  The same check for the neural DMM (a 1-D latent, so that its evidence is
  a one-dimensional forward recursion on a grid), with bootstrap proposals.
* Training: a few Adam steps on ``-log Z-hat`` lower the loss and keep the
  parameters finite.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

import combinators
from combinators.train import train
from programs import dmm

TINY = dmm.Config(
    latent_dim=2, hidden=8, length=6, batch_size=3, num_train=32, num_test=8
)


def run_smc(model, xs, num_particles, key, record=None):
    program = dmm.make_smc(model, xs, num_particles, record=record)
    return jax.jit(lambda k: combinators.traced_evaluate(program, seed=k)())(key)


# ---------------------------------------------------------------------------
# Shapes and finiteness.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run():
    """The recording SMC program on a tiny DMM (compiled once for this module)."""
    key_data, key_init, key_smc = jax.random.split(jax.random.key(0), 3)
    xs = dmm.make_rings(key_data, TINY.batch_size, TINY.length)
    model = dmm.bind(dmm.init_params(key_init, TINY), TINY)
    num_particles = 5
    result = run_smc(
        model, xs, num_particles, key_smc, record=dmm.filter_records(model)
    )
    return model, xs, num_particles, key_smc, result


def test_shapes_finite_weights_and_loss_is_minus_log_z_hat(tiny_run):
    _, xs, n, _, (out, trace, metrics) = tiny_run
    b, t, _ = xs.shape
    assert xs.shape == (TINY.batch_size, TINY.length, 2)
    (z,) = out
    assert z.shape == (n, b, TINY.latent_dim)
    assert trace["z"].value.shape == (n, b, TINY.latent_dim)
    assert trace["x"].observed
    assert metrics["log_weight"].shape == (n, b)  # particles outermost, then batch
    history = metrics["history"]
    assert history.log_Z.shape == (t,)
    records = history.records
    assert records["log_weight"].shape == (t, n, b)
    assert records["reconstruction"].shape == (t, b, 2)
    assert records["prediction"].shape == (t, b, 2)
    for leaf in jax.tree_util.tree_leaves((out, metrics["log_weight"], records)):
        assert np.all(np.isfinite(leaf))

    # log Z-hat sums the sequences' estimates; the loss is its negative.
    columns = dmm.log_z_columns(metrics["log_weight"])
    np.testing.assert_allclose(metrics["log_Z"], jnp.sum(columns), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], -metrics["log_Z"], rtol=1e-5)
    # The recorded final weights are the program's weights.
    np.testing.assert_allclose(
        records["log_weight"][-1], metrics["log_weight"], rtol=1e-6
    )


def test_vsmc_and_recording_smc_are_the_same_program(tiny_run):
    """``make_smc`` with and without ``record`` gives the same numbers (same key)."""
    model, xs, n, key_smc, (_, _, recorded) = tiny_run
    _, _, plain = run_smc(model, xs, n, key_smc)
    np.testing.assert_allclose(plain["log_weight"], recorded["log_weight"], rtol=1e-6)
    np.testing.assert_allclose(plain["loss"], recorded["loss"], rtol=1e-6)


def test_bad_data_shape_raises():
    model = linear_gaussian()
    with pytest.raises(ValueError, match="shape"):
        dmm.make_smc(model, jnp.zeros((5, 2)), 4)


# ---------------------------------------------------------------------------
# Unbiasedness against a Kalman filter.
# ---------------------------------------------------------------------------


def linear_gaussian():
    """A damped rotation seen through a non-symmetric C, with guided proposals.

    The proposals are near the locally optimal ones, rounded and a little
    wider: for t > 0, ``N(A z + K (x - C A z), Q - K C Q)`` with ``K = Q C^T
    (C Q C^T + R)^{-1} = [[0.350, -0.129], [0.158, 0.763]]`` and sd
    ``(0.237, 0.293)``; for t = 0 (prior ``N(0, I)``), ``K_0 = C^T (C C^T +
    R)^{-1} = [[0.810, -0.302], [0.207, 1.028]]`` and sd ``(0.361, 0.340)``.
    """
    angle = 0.4
    rotation = np.array(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    return dmm.LinearGaussianDMM(
        A=jnp.asarray(0.95 * rotation, jnp.float32),
        transition_scale=jnp.array([0.3, 0.5]),
        C=jnp.array([[1.0, 0.3], [-0.2, 0.8]]),
        emission_scale=jnp.array([0.4, 0.3]),
        gain=jnp.array([[0.35, -0.13], [0.16, 0.76]]),
        proposal_scale=jnp.array([0.28, 0.33]),
        initial_gain=jnp.array([[0.81, -0.30], [0.21, 1.03]]),
        initial_scale=jnp.array([0.42, 0.40]),
    )


def simulate(model, key, num_sequences, length):
    """Sequences ``(B, T, 2)`` from the linear-Gaussian model."""
    key_z0, key_w, key_v = jax.random.split(key, 3)
    d = model.A.shape[0]
    z = jax.random.normal(key_z0, (num_sequences, d))
    w = jax.random.normal(key_w, (length, num_sequences, d)) * model.transition_scale
    v = jax.random.normal(key_v, (length, num_sequences, 2)) * model.emission_scale
    xs = []
    for t in range(length):
        if t > 0:
            z = z @ model.A.T + w[t]
        xs.append(z @ model.C.T + v[t])
    return jnp.stack(xs, axis=1)


def kalman_log_evidence(model, x):
    """``log p(x_{0:T-1})`` of one sequence ``(T, 2)`` by the Kalman filter, float64."""
    A, C = np.asarray(model.A, np.float64), np.asarray(model.C, np.float64)
    Q = np.diag(np.asarray(model.transition_scale, np.float64) ** 2)
    R = np.diag(np.asarray(model.emission_scale, np.float64) ** 2)
    x = np.asarray(x, np.float64)
    mean, cov = np.zeros(A.shape[0]), np.eye(A.shape[0])
    total = 0.0
    for t in range(len(x)):
        if t > 0:
            mean, cov = A @ mean, A @ cov @ A.T + Q
        S = C @ cov @ C.T + R
        residual = x[t] - C @ mean
        _, logdet = np.linalg.slogdet(S)
        total += -0.5 * (
            residual @ np.linalg.solve(S, residual)
            + logdet
            + len(residual) * math.log(2 * math.pi)
        )
        gain = cov @ C.T @ np.linalg.inv(S)
        mean = mean + gain @ residual
        cov = cov - gain @ S @ gain.T
    return total


def test_log_z_hat_is_unbiased_for_the_linear_gaussian_dmm():
    """mean_b Z-hat_b / Z_b = 1 within 4 SE, over B independent column filters."""
    model = linear_gaussian()
    num_sequences, length, num_particles = 512, 10, 128
    key_data, key_smc = jax.random.split(jax.random.key(2))
    xs = simulate(model, key_data, num_sequences, length)
    _, _, metrics = run_smc(model, xs, num_particles, key_smc)

    log_z_hat = np.asarray(dmm.log_z_columns(metrics["log_weight"]), np.float64)
    log_z = np.array([kalman_log_evidence(model, x) for x in xs])
    ratio = np.exp(log_z_hat - log_z)
    se = ratio.std(ddof=1) / math.sqrt(num_sequences)
    assert se < 0.03  # power: a 12% bias in Z-hat would be caught
    assert abs(ratio.mean() - 1.0) < 4 * se, (ratio.mean(), se)
    # Each column filters its own sequence: paired with another sequence's
    # exact evidence, the log ratios are far larger.
    matched = np.mean(np.abs(log_z_hat - log_z))
    shuffled = np.mean(np.abs(log_z_hat - np.roll(log_z, 1)))
    assert shuffled > 5 * matched, (matched, shuffled)


class BootstrapDMM:
    """A DMM whose proposals are its own prior and transition (bootstrap filter).

    Its incremental weights are emission densities, which are bounded, so
    ``Z-hat`` has finite variance whatever the networks' weights; a randomly
    initialised learned proposal can be far narrower than the transition
    and give heavy-tailed weights.
    """

    def __init__(self, model):
        self.model = model
        self.latent_dim = model.latent_dim

    def transition(self, z_prev):
        return self.model.transition(z_prev)

    def emission(self, z):
        return self.model.emission(z)

    def proposal(self, z_prev, x):
        del x
        return self.model.transition(z_prev)

    def initial_proposal(self, x):
        shape = x.shape[:-1] + (self.latent_dim,)
        return jnp.zeros(shape), jnp.ones(shape)


def grid_log_evidence(model, x, half_width=8.0, num_points=1601):
    """``log p(x_{0:T-1})`` of a DMM with a 1-D latent by the forward algorithm.

    The latent is discretised on a uniform grid (Riemann sum; the N(0, 1)
    prior and transitions of scale ~0.7 are negligible beyond +-8 and
    resolved by a spacing of 0.01), in float64.
    """
    grid = np.linspace(-half_width, half_width, num_points)
    log_h = math.log(grid[1] - grid[0])
    points = jnp.asarray(grid, jnp.float32)[:, None]
    loc, scale = model.emission(points)
    x64 = np.asarray(x, np.float64)[:, None, :]
    log_obs = np.sum(
        norm.logpdf(x64, np.asarray(loc, np.float64), np.asarray(scale, np.float64)),
        axis=-1,
    )  # (T, G)
    loc, scale = model.transition(points)
    log_trans = norm.logpdf(
        grid[None, :], np.asarray(loc, np.float64), np.asarray(scale, np.float64)
    )  # [from, to]
    log_alpha = norm.logpdf(grid, 0.0, 1.0) + log_obs[0]
    for t in range(1, len(x64)):
        log_alpha = logsumexp(log_alpha[:, None] + log_trans, axis=0) + log_h
        log_alpha = log_alpha + log_obs[t]
    return float(logsumexp(log_alpha) + log_h)


def test_log_z_hat_is_unbiased_for_a_neural_dmm_against_a_grid():
    """Neural DMM, d = 1: mean Z-hat / Z = 1 within 4 SE, Z by the forward algorithm.

    One sequence is copied into all B columns of the batch, so one run gives
    B independent estimates of the same Z.
    """
    config = dmm.Config(latent_dim=1, hidden=8, length=5)
    num_columns, num_particles = 512, 64
    key_data, key_init, key_smc = jax.random.split(jax.random.key(4), 3)
    x = dmm.make_rings(key_data, 1, config.length)[0]
    model = BootstrapDMM(dmm.bind(dmm.init_params(key_init, config), config))
    xs = jnp.broadcast_to(x, (num_columns, *x.shape))
    _, _, metrics = run_smc(model, xs, num_particles, key_smc)

    log_z_hat = np.asarray(dmm.log_z_columns(metrics["log_weight"]), np.float64)
    ratio = np.exp(log_z_hat - grid_log_evidence(model, x))
    se = ratio.std(ddof=1) / math.sqrt(num_columns)
    assert se < 0.015  # power: a 6% bias in Z-hat would be caught
    assert abs(ratio.mean() - 1.0) < 4 * se, (ratio.mean(), se)


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------


def test_a_few_training_steps_lower_the_loss_and_keep_parameters_finite():
    """200 Adam steps: the mean loss of the last 20 steps is below the first 20's.

    Each step's loss is ``-log Z-hat`` per sequence and time step of a fresh
    minibatch; it varies by 0.1-0.2 nats between steps, so a mean of 20
    varies by about 0.04 and the required drop of 0.3 nats (7 standard
    errors) cannot come from noise. Measured drops over six seeds: 0.67 to
    1.74 nats (from about 2.2).
    """
    config = dmm.Config(
        latent_dim=2, hidden=16, length=8, batch_size=8, num_train=64, num_test=8
    )
    x_train, _ = dmm.load_data(0, config)
    key_init, key_train = jax.random.split(jax.random.key(3))
    result = train(
        functools.partial(dmm.loss_fn, config=config, num_particles=8),
        dmm.init_params(key_init, config),
        optax.adam(2e-2),
        200,
        seed=key_train,
        progress=False,
        log_every=1000,
        return_result=True,
        data=x_train,
    )
    assert result.skipped == 0
    for leaf in jax.tree_util.tree_leaves(result.params):
        assert np.all(np.isfinite(leaf))
    losses = result.history["loss"]
    assert np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses, -result.history["log_Z"], rtol=1e-5)
    first, last = losses[:20].mean(), losses[-20:].mean()
    assert last < first - 0.3, (first, last)
