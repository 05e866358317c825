# SPDX-License-Identifier: Apache-2.0
"""Coix's behaviours, checked with this project's own programs and numbers.

Each test names the Coix behaviour it covers: Coix-format dict traces in the
losses, ``coix.core``'s names, one trace of a loop body, path-form SMC, and
a batch dimension written without a plate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp

import combinators as coix
import combinators.core


def softmax0(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(0))
    return e / e.sum(0)


# -- Coix-format dict traces -------------------------------------------------


def dict_traces():
    # Three particles; "z" re-sampled by a kernel (z_PREV_ is its old value,
    # scored in the target by the reverse kernel), "obs" observed.
    p = {
        "z": {"log_prob": np.array([[0.5, -1.0], [0.2, 0.1], [-0.3, 0.4]])},
        "obs": {"log_prob": np.array([-1.0, -2.0, -0.5]), "is_observed": True},
        "z_PREV_": {"log_prob": np.array([[0.1, 0.2], [0.0, -0.4], [0.3, 0.3]])},
    }
    q = {
        "z": {"log_prob": np.array([[-0.2, 0.0], [0.6, -0.1], [0.2, 0.2]])},
        "z_PREV_": {"log_prob": np.array([[1.0, 0.5], [-0.5, 0.0], [0.0, 0.1]])},
    }
    return q, p


def test_rws_loss_reads_coix_dict_traces():
    q, p = dict_traces()
    incoming = np.zeros(3)
    incremental = np.array([0.3, -0.2, 0.1])
    loss = coix.loss.rws_loss(q, p, incoming, incremental)
    # Leading dim = particles; trailing dims summed. Proposal sites: the
    # suffixed z_PREV_ of q; forward: z of q; target: unsuffixed p sites.
    target = p["z"]["log_prob"].sum(1) + p["obs"]["log_prob"]
    proposal = q["z_PREV_"]["log_prob"].sum(1)
    forward = q["z"]["log_prob"].sum(1)
    expected = -(softmax0(incoming + incremental) * (target - proposal + forward)).sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_apg_loss_reads_coix_dict_traces():
    q, p = dict_traces()
    loss = coix.loss.apg_loss(q, p, np.zeros(3), np.zeros(3))
    # The block z and the observation share only the particle dim.
    target = p["z"]["log_prob"].sum(1) + p["obs"]["log_prob"]
    reverse = p["z_PREV_"]["log_prob"].sum(1)
    forward = q["z"]["log_prob"].sum(1)
    proposal = q["z_PREV_"]["log_prob"].sum(1)
    w = softmax0(target + reverse - forward - proposal)
    np.testing.assert_allclose(loss, -(w * (target + forward)).sum(), rtol=1e-5)


def test_a_trace_of_the_wrong_type_is_named():
    with pytest.raises(TypeError, match="rws_loss|loss.*p_trace"):
        coix.loss.rws_loss({"z": {"log_prob": np.zeros(3)}}, ["z"], 0.0, 0.0)


def test_core_names_of_coix():
    assert combinators.core.get_backend_name() == "coix.numpyro"
    combinators.core.register_backend("coix.numpyro")
    coix.set_backend("coix.numpyro")
    with pytest.raises(ValueError, match="numpyro"):
        coix.set_backend("coix.oryx")
    renamed = combinators.core.desuffix(
        {"a_PREV_": 1, "b_PREV__PREV_": 2, "b_PREV_": 3}
    )
    assert renamed == {"a": 1, "b_PREV_": 2, "b": 3}


def test_resampling_without_a_key_is_a_named_error():
    with pytest.raises(ValueError, match="no PRNG key"):
        coix.util.get_systematic_resampling_indices(jnp.zeros(4), None, 4)


# -- loops ----------------------------------------------------------------------


def test_fori_loop_traces_its_body_once():
    def walk(key, x):
        key_out, key = jax.random.split(key)
        return key_out, numpyro.sample("x", dist.Normal(x, 1.0), rng_key=key)

    def back(key, x):
        numpyro.sample("x", dist.Normal(x, 1.0), rng_key=key)

    calls = []

    def body(i, q):
        calls.append(i)
        return coix.propose(coix.extend(walk, back), coix.compose(walk, q))

    program = coix.fori_loop(0, 4, body, walk)
    _, x = program(jax.random.PRNGKey(0), jnp.zeros(3))
    assert len(calls) == 1 and x.shape == (3,)


def test_propose_returns_the_targets_marginal():
    # A documented difference: the auxiliary site "u" drawn by extend's
    # kernel is integrated out (Coix keeps non-clashing auxiliary names).
    def p():
        return (numpyro.sample("x", dist.Normal(0.0, 1.0)),)

    def f(x):
        numpyro.sample("u", dist.Normal(x, 1.0))

    def q():
        return numpyro.sample("x", dist.Normal(1.0, 2.0))

    _, trace, _ = coix.traced_evaluate(coix.propose(coix.extend(p, f), q), seed=0)()
    assert set(trace) == {"x"}
    _, full, _ = coix.traced_evaluate(coix.extend(p, f), seed=0)()
    assert set(full) == {"x", "u"} and full["u"].auxiliary


# -- path-form SMC vs the Kalman filter --------------------------------------------

A, Q, R = 0.8, 1.0, 0.5
YS = np.array([0.4, -0.6, 1.1, 0.9, -0.2])
N = 32


def kalman_log_likelihood(ys):
    m, v, total = 0.0, 1.0, 0.0
    for t, y in enumerate(ys):
        if t:
            m, v = A * m, A * A * v + Q
        s = v + R
        total += -0.5 * (np.log(2 * np.pi * s) + (y - m) ** 2 / s)
        m, v = m + v / s * (y - m), v * R / s
    return total


def path_target(t):
    """Scores the whole path x_0..x_t and y_0..y_t (Coix's path form)."""

    def p():
        with numpyro.plate("particles", N):
            x = numpyro.sample("x0", dist.Normal(0.0, 1.0))
            numpyro.sample("y0", dist.Normal(x, np.sqrt(R)), obs=YS[0])
            for s in range(1, t + 1):
                x = numpyro.sample(f"x{s}", dist.Normal(A * x, np.sqrt(Q)))
                numpyro.sample(f"y{s}", dist.Normal(x, np.sqrt(R)), obs=YS[s])
        return (x,)

    return p


def path_kernel(t):
    """Draws x_t from the transition given the previous output (bootstrap)."""
    if t == 0:

        def k0():
            with numpyro.plate("particles", N):
                return (numpyro.sample("x0", dist.Normal(0.0, 1.0)),)

        return k0

    def k(x):
        with numpyro.plate("particles", N):
            return (numpyro.sample(f"x{t}", dist.Normal(A * x, np.sqrt(Q))),)

    return k


@pytest.mark.parametrize("name", ["vsmc", "nasmc"])
def test_path_form_smc_is_unbiased_against_kalman(name):
    steps = range(len(YS))
    program = getattr(coix.algo, name)(
        [path_target(t) for t in steps], [path_kernel(t) for t in steps]
    )
    runs = 300

    @jax.jit
    def log_z(keys):
        return jax.vmap(lambda k: coix.traced_evaluate(program, seed=k)()[2]["log_Z"])(
            keys
        )

    estimates = np.asarray(
        log_z(jax.random.split(jax.random.PRNGKey(3), runs)), np.float64
    )
    ratio = np.exp(estimates - kalman_log_likelihood(YS))
    # E[Z-hat] = Z: the mean ratio is 1 within 5 standard errors.
    assert abs(ratio.mean() - 1.0) < 5 * ratio.std(ddof=1) / np.sqrt(runs) + 1e-3
    assert ratio.std() < 0.5  # a working filter, not a lucky mean


def test_smc_form_is_an_argument():
    with pytest.raises(ValueError, match="form"):
        coix.algo.vsmc(
            [path_target(0), path_target(1)], [path_kernel(0)] * 2, form="auto"
        )


# -- a batch written without a plate ------------------------------------------


def test_an_undeclared_batch_gives_one_weight_column_per_entry():
    y = jnp.array([0.0, 1.0, 2.0, -1.0, 3.0])

    def p():
        with numpyro.plate("particles", 8, dim=-2):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(5), 1.0))
            numpyro.sample("y", dist.Normal(z, 1.0), obs=y)

    def q():
        with numpyro.plate("particles", 8, dim=-2):
            numpyro.sample("z", dist.Normal(jnp.zeros(5), 1.0))

    program = coix.propose(p, q)

    @jax.jit
    def run(keys):
        def one(k):
            metrics = coix.traced_evaluate(program, seed=k)()[2]
            return metrics["log_weight"], metrics["log_Z"]

        return jax.vmap(one)(keys)

    runs = 2000
    log_weight, log_z = run(jax.random.split(jax.random.PRNGKey(0), runs))
    assert log_weight.shape == (runs, 8, 5)
    # Each column estimates its own Z_b = N(y_b; 0, 2) without bias, and
    # log Z-hat is the sum of the columns' estimates.
    column_z = np.exp(np.asarray(logsumexp(log_weight, axis=1) - np.log(8), np.float64))
    exact = np.exp(np.asarray(dist.Normal(0.0, np.sqrt(2.0)).log_prob(y), np.float64))
    ratio = column_z / exact
    se = ratio.std(0, ddof=1) / np.sqrt(runs)
    assert np.all(np.abs(ratio.mean(0) - 1.0) < 5 * se + 1e-3)
    np.testing.assert_allclose(log_z, np.log(column_z).sum(1), rtol=1e-4, atol=1e-4)
