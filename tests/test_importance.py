"""Statistical correctness of importance weights on a conjugate Gaussian model.

Model: z ~ N(0, 1), y | z ~ N(z, 0.5^2), y observed. Exactly:
  Z = N(y; 0, 1.25),  p(z | y) = N(y / 1.25, 0.25 / 1.25).
The proposal q = N(0.3, 1.2^2) is not the posterior. Every statistical
tolerance is 5 Monte-Carlo standard errors estimated from the same sample.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp
from jax.scipy.stats import norm

import combinators
from combinators import compose, extend, propose, resample, traced_evaluate

Y = 1.3
SIGMA_Y = 0.5
EXACT_LOG_Z = float(norm.logpdf(Y, 0.0, np.sqrt(1.0 + SIGMA_Y**2)))
POST_MEAN = Y / (1.0 + SIGMA_Y**2)
POST_VAR = SIGMA_Y**2 / (1.0 + SIGMA_Y**2)
Q_LOC, Q_SCALE = 0.3, 1.2
NUM_SEEDS = 2000


# ---------------------------------------------------------------------------
# Programs.
# ---------------------------------------------------------------------------


def target(n, with_w=False):
    def p(y):
        with numpyro.plate("particles", n):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            if with_w:
                numpyro.sample("w", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, SIGMA_Y), obs=y)
        return (z,)

    return p


def proposal(n, loc=Q_LOC, scale=Q_SCALE, extra=False):
    def q(y):
        with numpyro.plate("particles", n):
            z = numpyro.sample("z", dist.Normal(loc, scale))
            if extra:
                numpyro.sample("v", dist.Normal(0.0, 1.0))
        return (z,)

    return q


def ar_kernel(n, rho, shift=0.0, scale_mult=1.0):
    """z' ~ N(mu + rho (z - mu) + shift, scale_mult^2 (1 - rho^2) sigma^2).

    With shift=0, scale_mult=1 it is reversible w.r.t. the posterior, so for a
    *mismatched* reverse kernel r (scale_mult < 1) the ratio
    p(z') r(z | z') / (p(z) k(z' | z)) is bounded: Z-hat has light tails.
    """
    loc = POST_MEAN * (1.0 - rho) + shift
    scale = scale_mult * np.sqrt(POST_VAR * (1.0 - rho**2))

    def k(z):
        with numpyro.plate("particles", n):
            z = numpyro.sample("z", dist.Normal(rho * z + loc, scale))
        return (z,)

    return k, (rho, loc, scale)


FORWARD = dict(rho=0.5)
REVERSE = dict(rho=0.4, shift=0.05, scale_mult=0.8)  # not the reversal of FORWARD


def log_joint(z):
    return norm.logpdf(z, 0.0, 1.0) + norm.logpdf(Y, z, SIGMA_Y)


def hand_log_weight(z, loc=Q_LOC, scale=Q_SCALE):
    return log_joint(z) - norm.logpdf(z, loc, scale)


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


@pytest.fixture(params=["eager", "jit"])
def mode(request):
    return request.param


def run(program, *args, seed=0, mode="eager"):
    """``traced_evaluate(program, seed=key(seed))(*args)``, eager or jitted."""

    def evaluate(key):
        return traced_evaluate(program, seed=key)(*args)

    if mode == "jit":
        evaluate = jax.jit(evaluate)
    return evaluate(jax.random.key(seed))


def assert_z_hat_unbiased(program, seed):
    """|mean(Z-hat) - Z| < 5 SE over NUM_SEEDS seeds; power: SE < 2% of Z."""
    log_z = jax.jit(
        jax.vmap(lambda key: traced_evaluate(program, seed=key)(Y)[2].log_Z)
    )(keys(NUM_SEEDS, seed=seed))
    z_hat = np.exp(np.asarray(log_z, dtype=np.float64))
    exact = np.exp(EXACT_LOG_Z)
    assert np.all(np.isfinite(z_hat))
    se = z_hat.std(ddof=1) / np.sqrt(z_hat.size)
    assert se < 0.02 * exact, se
    assert abs(z_hat.mean() - exact) < 5 * se, (z_hat.mean(), exact, se)


# ---------------------------------------------------------------------------
# Exact bookkeeping.
# ---------------------------------------------------------------------------


def test_log_weights_equal_log_joint_minus_log_proposal(mode):
    n = 16
    _, trace, metrics = run(propose(target(n), proposal(n)), Y, seed=0, mode=mode)
    z = trace["z"].value
    assert z.shape == (n,) and metrics.log_weight.shape == (n,)
    np.testing.assert_allclose(
        metrics.log_weight, hand_log_weight(z), rtol=1e-5, atol=1e-5
    )
    # The returned trace is the target's: z scored by the prior.
    np.testing.assert_allclose(
        trace["z"].log_prob, norm.logpdf(z, 0.0, 1.0), rtol=1e-5, atol=1e-6
    )


def test_ess_and_log_z_from_log_weights(mode):
    n = 16
    _, _, metrics = run(propose(target(n), proposal(n)), Y, seed=1, mode=mode)
    lw = metrics.log_weight
    np.testing.assert_allclose(
        metrics.ess, 1.0 / jnp.sum(jax.nn.softmax(lw) ** 2), rtol=1e-5
    )
    np.testing.assert_allclose(
        metrics.log_Z, logsumexp(lw) - np.log(n), rtol=1e-5, atol=1e-6
    )
    assert 1.0 < float(metrics.ess) < n


# ---------------------------------------------------------------------------
# Statistical properties.
# ---------------------------------------------------------------------------


def test_z_hat_is_unbiased():
    """E[exp(log Z-hat)] = Z over seeds (N = 10)."""
    assert_z_hat_unbiased(propose(target(10), proposal(10)), seed=0)


@pytest.fixture(scope="module")
def large_run():
    n = 100_000
    program = propose(target(n), proposal(n))
    _, trace, metrics = jax.jit(traced_evaluate(program, seed=jax.random.key(3)))(Y)
    return n, np.asarray(trace["z"].value, np.float64), metrics


def test_log_z_hat_is_consistent(large_run):
    """|log Z-hat - log Z| < 5 std(w) / (mean(w) sqrt(N)) (delta method)."""
    n, z, metrics = large_run
    lw = hand_log_weight(z)
    w = np.exp(lw - lw.max())
    tol = 5 * w.std() / (w.mean() * np.sqrt(n))
    assert tol < 0.03  # power: a 3% error in Z would be caught
    assert abs(float(metrics.log_Z) - EXACT_LOG_Z) < tol


def test_self_normalised_posterior_moments(large_run):
    """Posterior mean / variance within 5 SE, SE = sd / sqrt(ESS)."""
    _, z, metrics = large_run
    wbar = np.asarray(jax.nn.softmax(metrics.log_weight), np.float64)
    ess = float(metrics.ess)
    mean = np.sum(wbar * z)
    var = np.sum(wbar * (z - mean) ** 2)
    assert abs(mean - POST_MEAN) < 5 * np.sqrt(POST_VAR / ess)
    # Var of a sample variance of a Gaussian: 2 sigma^4 / n.
    assert abs(var - POST_VAR) < 5 * POST_VAR * np.sqrt(2.0 / ess)


def test_nested_resample_move_is_properly_weighted():
    """propose(extend(p, r), compose(k, resample(propose(p, q)))): E[Z-hat] = Z."""
    n = 10
    k, _ = ar_kernel(n, **FORWARD)
    r, _ = ar_kernel(n, **REVERSE)
    program = propose(
        extend(target(n), r), compose(k, resample(propose(target(n), proposal(n))))
    )
    assert_z_hat_unbiased(program, seed=1)


def test_extend_with_reverse_kernel_weights_and_marginal(mode):
    """w = log p(z', y) + log r(z | z') - log q(z) - log k(z' | z) exactly."""
    n = 16
    k, (rho_k, loc_k, scale_k) = ar_kernel(n, **FORWARD)
    r, (rho_r, loc_r, scale_r) = ar_kernel(n, **REVERSE)
    q_out, q_trace, _ = run(proposal(n), Y, seed=4, mode=mode)
    z0 = q_trace["z"].value
    program = propose(
        extend(target(n), r), compose(k, combinators.empirical(q_out, q_trace, None))
    )
    out, trace, metrics = run(program, Y, seed=5, mode=mode)
    z1 = trace["z"].value
    # The result is p's marginal: one generation of z, no auxiliary site.
    assert len(trace.history("z")) == 1 and not trace["z"].auxiliary
    assert not np.allclose(z1, z0)
    np.testing.assert_array_equal(out[0], z1)
    expected = (
        log_joint(z1)
        + norm.logpdf(z0, rho_r * z1 + loc_r, scale_r)
        - norm.logpdf(z0, Q_LOC, Q_SCALE)
        - norm.logpdf(z1, rho_k * z0 + loc_k, scale_k)
    )
    np.testing.assert_allclose(metrics.log_weight, expected, rtol=1e-5, atol=1e-5)


def test_extend_with_reverse_kernel_keeps_z_unbiased():
    """The auxiliary kernel integrates to one: E[Z-hat] is still Z."""
    n = 10
    k, _ = ar_kernel(n, **FORWARD)
    r, _ = ar_kernel(n, **REVERSE)
    program = propose(extend(target(n), r), compose(k, proposal(n)))
    assert_z_hat_unbiased(program, seed=2)


def _aux_only_target(n):
    """p(z, y) extended by f(u | z) = N(u; z, 0.5^2): u is auxiliary only."""

    def f(z):
        with numpyro.plate("particles", n):
            numpyro.sample("u", dist.Normal(z, 0.5))

    return extend(target(n), f)


# q(u) k(z | u): nearly the joint q(z) f(u | z) with q(z) = N(0.3, 1.2^2); k is
# 10% wider than that joint's conditional, so the weights stay bounded.
AUX_U_SCALE = np.sqrt(Q_SCALE**2 + 0.25)
AUX_GAIN = Q_SCALE**2 / AUX_U_SCALE**2
AUX_Z_SCALE = 1.1 * np.sqrt(Q_SCALE**2 * 0.25) / AUX_U_SCALE


def _aux_first_proposal(n):
    def q_u(y):
        with numpyro.plate("particles", n):
            u = numpyro.sample("u", dist.Normal(Q_LOC, AUX_U_SCALE))
        return (u,)

    def k_z(u):
        with numpyro.plate("particles", n):
            z = numpyro.sample(
                "z", dist.Normal(Q_LOC + AUX_GAIN * (u - Q_LOC), AUX_Z_SCALE)
            )
        return (z,)

    return compose(k_z, q_u)


def test_extend_scores_auxiliary_variable_of_proposal():
    """Coix's auxiliary-variable pattern propose(extend(p, f), compose(k, q_u)).

    ``f`` scores ``u``, which ``q_u`` drew and ``k`` did not re-sample: the
    reverse kernel is matched with the proposal's site at the same depth.
    """
    n = 10
    program = propose(_aux_only_target(n), _aux_first_proposal(n))
    assert_z_hat_unbiased(program, seed=6)


def test_latent_only_in_target_is_drawn_from_target():
    n = 20_000
    program = propose(target(n, with_w=True), proposal(n))
    _, trace, metrics = jax.jit(traced_evaluate(program, seed=jax.random.key(7)))(Y)
    w = np.asarray(trace["w"].value, np.float64)
    assert w.shape == (n,)
    assert abs(w.mean()) < 5 * np.sqrt(1.0 / n)
    assert abs(w.var() - 1.0) < 5 * np.sqrt(2.0 / n)
    # w cancels: the weights are those of the model without w.
    np.testing.assert_allclose(
        metrics.log_weight, hand_log_weight(trace["z"].value), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        trace["w"].log_prob, norm.logpdf(trace["w"].value), rtol=1e-5, atol=1e-6
    )


def test_latent_only_in_proposal_raises(mode):
    program = propose(target(4), proposal(4, extra=True))
    with pytest.raises(ValueError, match="'v'"):
        run(program, Y, mode=mode)


# ---------------------------------------------------------------------------
# Transformations: vmap, grad (jit: the ``mode`` fixture).
# ---------------------------------------------------------------------------


def _run(key, n=16):
    _, trace, metrics = traced_evaluate(propose(target(n), proposal(n)), seed=key)(Y)
    return trace["z"].value, metrics.log_weight, metrics.log_Z, metrics.ess


def test_vmap_over_keys_equals_one_evaluation_per_key():
    # Eager against jit is the ``mode`` parameter of the exact tests above.
    ks = keys(2, seed=8)
    batched = jax.jit(jax.vmap(_run))(ks)
    for i, k in enumerate(ks):
        one = _run(k)
        for a, c in zip(one, batched, strict=True):
            np.testing.assert_allclose(a, c[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            batched[1][i], hand_log_weight(batched[0][i]), rtol=1e-5, atol=1e-5
        )
    assert not np.allclose(batched[0][0], batched[0][1])


def test_jit_vmap_grad_of_elbo_matches_pathwise_gradient():
    """grad of -mean(log p(z, y) - log q(z)), z = m + s eps, eps fixed."""
    n = 16

    def loss(params, key):
        m, s = params
        program = propose(
            target(n), proposal(n, m, s), loss_fn=combinators.loss.elbo_loss
        )
        _, trace, metrics = traced_evaluate(program, seed=key)(Y)
        return metrics.loss, (trace["z"].value, metrics.log_weight)

    params = (jnp.float32(Q_LOC), jnp.float32(Q_SCALE))
    grads, (z, lw) = jax.jit(jax.vmap(jax.grad(loss, has_aux=True), in_axes=(None, 0)))(
        params, keys(4, seed=9)
    )
    values = jax.jit(jax.vmap(loss, in_axes=(None, 0)))(params, keys(4, seed=9))[0]
    z = np.asarray(z, np.float64)
    eps = (z - Q_LOC) / Q_SCALE
    dlogp_dz = -z + (Y - z) / SIGMA_Y**2
    # log q(m + s eps) = -eps^2 / 2 - log s + const.
    grad_m = -np.mean(dlogp_dz, axis=1)
    grad_s = -np.mean(dlogp_dz * eps + 1.0 / Q_SCALE, axis=1)
    np.testing.assert_allclose(grads[0], grad_m, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[1], grad_s, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        values, -np.mean(hand_log_weight(z), axis=1), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(lw, hand_log_weight(z), rtol=1e-5, atol=1e-5)
