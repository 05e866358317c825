"""Values and gradients of the losses in ``combinators.loss``.

Every loss is checked against a hand computation with ``jax.numpy`` on the
*same* samples: the sampled values are read from the trace of a run with the
same seed, the log densities are recomputed by hand, and gradients are taken
with ``jax.grad`` through a function of the parameters (re-parameterised
samples ``z = mu + sigma * eps`` with ``eps`` recovered from the trace, or the
values held fixed for detached proposals).

Model (conjugate): ``z ~ N(theta, 1)``, ``y | z ~ N(z, 0.5^2)``, ``y`` observed;
proposal ``z ~ N(mu, exp(log_sigma))``. The multi-step programs are
``propose(extend(p, reverse), compose(kernel, resample(propose(p0, q))))``
with Gaussian kernels, where ``p0`` (``z ~ N(theta0, 1)``) is an intermediate
target.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp

import combinators
from combinators import loss as L

N = 8
Y = jnp.array(1.0)
OBS_SCALE = 0.5
RTOL = ATOL = 1e-5

PARAMS = {
    "mu": 0.3,
    "log_sigma": -0.2,
    "theta": 0.1,
    "theta0": -0.2,
    "a": 0.8,
    "b": 0.2,
    "log_sk": -0.5,
    "c": 0.9,
    "d": -0.1,
    "log_sr": -0.3,
}
PARAMS = {name: jnp.asarray(value, dtype=jnp.float32) for name, value in PARAMS.items()}

ALL_LOSSES = {
    "elbo": L.elbo_loss,
    "iwae": L.iwae_loss,
    "rws": L.rws_loss,
    "apg": L.apg_loss,
    "avo": L.avo_loss,
    "fkl": L.fkl_loss,
    "rkl": L.rkl_loss,
}
# Score-function losses are used with detached proposals; pathwise losses
# differentiate through the samples.
SCORE_FUNCTION = {"rws", "apg", "fkl"}
MULTI_STEP = ("rws", "apg", "fkl", "rkl", "avo")


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol
    )


def close_tree(actual, expected, rtol=RTOL, atol=ATOL):
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(
            np.asarray(actual[name]),
            np.asarray(expected[name]),
            rtol=rtol,
            atol=atol,
            err_msg=f"gradient wrt {name!r}",
        )


def normal_lp(x, loc, scale):
    return (
        -0.5 * ((x - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * math.log(2 * math.pi)
    )


# ---------------------------------------------------------------------------
# Programs (each in the particle plate).
# ---------------------------------------------------------------------------


def target(params, observe=True):
    def program():
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(params["theta"], 1.0))
            if observe:
                numpyro.sample("y", dist.Normal(z, OBS_SCALE), obs=Y)
        return (z,)

    return program


def prior_target(params):
    """Intermediate target ``z ~ N(theta0, 1)`` (no observation)."""

    def program():
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(params["theta0"], 1.0))
        return (z,)

    return program


def proposal(params):
    def program():
        with numpyro.plate("particles", N):
            z = numpyro.sample(
                "z", dist.Normal(params["mu"], jnp.exp(params["log_sigma"]))
            )
        return (z,)

    return program


def kernel(params):
    def program(z):
        with numpyro.plate("particles", N):
            z_new = numpyro.sample(
                "z",
                dist.Normal(params["a"] * z + params["b"], jnp.exp(params["log_sk"])),
            )
        return (z_new,)

    return program


def reverse(params):
    def program(z):
        with numpyro.plate("particles", N):
            numpyro.sample(
                "z",
                dist.Normal(params["c"] * z + params["d"], jnp.exp(params["log_sr"])),
            )
        return ()

    return program


def single_step(params, loss_fn, *, detach=False, stl=False):
    q = proposal(params)
    if detach:
        q = combinators.detach(q)
    if stl:
        q = combinators.stick_the_landing(q)
    return combinators.propose(target(params), q, loss_fn=loss_fn)


def multi_step(params, loss_fn, *, detach=False, first_target=prior_target):
    q, k = proposal(params), kernel(params)
    if detach:
        q, k = combinators.detach(q), combinators.detach(k)
    inner = combinators.resample(combinators.propose(first_target(params), q))
    return combinators.propose(
        combinators.extend(target(params), reverse(params)),
        combinators.compose(k, inner),
        loss_fn=loss_fn,
    )


def run(program, seed=0):
    return combinators.traced_evaluate(program, seed=jax.random.key(seed))()


def loss_of(build, seed=0):
    """``params -> metrics.loss`` of the program ``build(params)``."""
    return lambda params: run(build(params), seed)[2].loss


class Recorder:
    """A loss_fn that records its arguments and returns ``loss_fn(*args)``."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)
        return self.loss_fn(*args)


# ---------------------------------------------------------------------------
# Hand computations.
# ---------------------------------------------------------------------------


def single_step_values(seed=0):
    _, trace, _ = run(single_step(PARAMS, None), seed)
    return trace["z"].value


def single_step_log_weight(params, z_fixed, detached):
    """``log p(z, y) - log q(z)`` per particle, and its parts."""
    mu, sigma = params["mu"], jnp.exp(params["log_sigma"])
    if detached:
        z = jax.lax.stop_gradient(z_fixed)
    else:
        eps = jax.lax.stop_gradient((z_fixed - mu) / sigma)
        z = mu + sigma * eps
    log_p = normal_lp(z, params["theta"], 1.0) + normal_lp(Y, z, OBS_SCALE)
    log_q = normal_lp(z, mu, sigma)
    return log_p - log_q, log_p, log_q


def hand_single_step(name, params, z_fixed):
    """The loss of ``propose(p, q, loss_fn)`` for an unweighted ``q``."""
    detached = name in SCORE_FUNCTION
    lw, log_p, log_q = single_step_log_weight(params, z_fixed, detached)
    w = jax.lax.stop_gradient(jax.nn.softmax(lw))
    uniform = jnp.full((N,), 1.0 / N)
    if name in ("elbo", "avo"):
        return -jnp.sum(uniform * lw)
    if name == "iwae":
        return -(logsumexp(lw) - jnp.log(N))
    # No kernel: no proposal sites, every q site is a forward site.
    if name == "rws":
        return -jnp.sum(w * (log_p + log_q))
    if name == "fkl":
        return -jnp.sum(w * log_q)
    if name == "rkl":
        return -(jnp.sum(uniform * lw) - jnp.sum(w * log_p))
    if name == "apg":
        return -jnp.sum(w * log_p)
    raise AssertionError(name)


def multi_step_parts(params, z_old_fixed, z_new_fixed, detached):
    """Per-particle log densities of the multi-step program's sites.

    Returns a dict: ``proposal`` (the intermediate target p0 at the resampled
    draw, the oldest generation of ``z`` in q), ``forward`` (the kernel),
    ``target`` (newest ``z`` and ``y`` in p), ``reverse`` (auxiliary ``z``).
    """
    mu, sigma = params["mu"], jnp.exp(params["log_sigma"])
    a, b, sk = params["a"], params["b"], jnp.exp(params["log_sk"])
    c, d, sr = params["c"], params["d"], jnp.exp(params["log_sr"])
    if detached:
        z_old = jax.lax.stop_gradient(z_old_fixed)
        z_new = jax.lax.stop_gradient(z_new_fixed)
    else:
        eps_old = jax.lax.stop_gradient((z_old_fixed - mu) / sigma)
        z_old = mu + sigma * eps_old
        eps_new = jax.lax.stop_gradient((z_new_fixed - (a * z_old_fixed + b)) / sk)
        z_new = a * z_old + b + sk * eps_new
    return {
        "proposal": normal_lp(z_old, params["theta0"], 1.0),
        "forward": normal_lp(z_new, a * z_old + b, sk),
        "target": normal_lp(z_new, params["theta"], 1.0)
        + normal_lp(Y, z_new, OBS_SCALE),
        "reverse": normal_lp(z_old, c * z_new + d, sr),
    }


def multi_step_incremental(parts):
    return parts["target"] + parts["reverse"] - parts["forward"] - parts["proposal"]


def hand_multi_step(name, params, z_old, z_new):
    """The outer loss of ``multi_step`` (its incoming weights are uniform)."""
    lp = multi_step_parts(params, z_old, z_new, name in SCORE_FUNCTION)
    inc = multi_step_incremental(lp)
    w = jax.lax.stop_gradient(jax.nn.softmax(inc))
    w1 = jnp.full((N,), 1.0 / N)
    if name == "rws":
        return -jnp.sum(w * (lp["target"] - lp["proposal"] + lp["forward"]))
    if name == "fkl":
        return -jnp.sum(w * (lp["forward"] + lp["proposal"]) - w1 * lp["proposal"])
    if name == "rkl":
        v = jax.lax.stop_gradient(inc)
        surrogate = inc + (1.0 + v - jnp.mean(v)) * lp["proposal"]
        return -jnp.sum(w1 * surrogate - w * lp["target"])
    if name == "apg":
        return -jnp.sum(w * (lp["target"] + lp["forward"]))
    if name in ("avo", "elbo"):
        return -jnp.mean(inc)
    raise AssertionError(name)


def multi_step_values(seed=0):
    """``(z_old, z_new)``: the resampled initial draw and the kernel's draw."""
    recorder = Recorder(L.avo_loss)
    run(multi_step(PARAMS, recorder), seed)
    ((q_trace, _, _, _),) = recorder.calls
    history = q_trace.history("z")
    assert len(history) == 2
    return history[-1].value, history[0].value


# ---------------------------------------------------------------------------
# Single-step losses: propose(p, q).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_single_step_value_and_gradient(name):
    loss_fn = ALL_LOSSES[name]
    detached = name in SCORE_FUNCTION
    build = lambda params: single_step(params, loss_fn, detach=detached)  # noqa: E731
    z = single_step_values()

    _, trace, metrics = run(build(PARAMS))
    close(trace["z"].value, z)  # same samples (detach does not change them)
    lw, _, _ = single_step_log_weight(PARAMS, z, detached)
    close(metrics.log_weight, lw)

    close(metrics.loss, hand_single_step(name, PARAMS, z))
    grad = jax.grad(loss_of(build))(PARAMS)
    expected = jax.grad(lambda params: hand_single_step(name, params, z))(PARAMS)
    close_tree(grad, expected)


def test_elbo_gradient_is_reparameterised_mean():
    z = single_step_values()
    grad = jax.grad(loss_of(lambda params: single_step(params, L.elbo_loss)))(PARAMS)
    expected = jax.grad(
        lambda params: -jnp.mean(single_step_log_weight(params, z, False)[0])
    )(PARAMS)
    close_tree(grad, expected)
    # Pathwise: the gradient in mu is -mean(d/dz log p(z, y)), since
    # log q(mu + sigma * eps) = log N(eps; 0, 1) - log sigma does not depend
    # on mu for fixed eps.
    dlogp_dz = -(z - PARAMS["theta"]) + (Y - z) / OBS_SCALE**2
    close(grad["mu"], -jnp.mean(dlogp_dz))
    close(grad["log_sigma"], -jnp.mean(dlogp_dz * (z - PARAMS["mu"])) - 1.0)


def test_iwae_gradient_is_gradient_of_log_z_hat():
    z = single_step_values()
    build = lambda params: single_step(params, L.iwae_loss)  # noqa: E731
    _, _, metrics = run(build(PARAMS))
    lw = single_step_log_weight(PARAMS, z, False)[0]
    log_z_hat = logsumexp(lw) - jnp.log(N)
    close(metrics.loss, -log_z_hat)
    close(metrics.log_Z, log_z_hat)

    grad = jax.grad(loss_of(build))(PARAMS)
    # Gradient of log Z-hat, by autodiff of the hand formula ...
    expected = jax.grad(
        lambda params: (
            -(logsumexp(single_step_log_weight(params, z, False)[0]) - jnp.log(N))
        )
    )(PARAMS)
    close_tree(grad, expected)
    # ... and as -sum_i softmax(lw)_i grad lw_i from per-particle gradients.
    jac = jax.jacobian(lambda params: single_step_log_weight(params, z, False)[0])(
        PARAMS
    )
    wbar = jax.nn.softmax(lw)
    close_tree(grad, {k: -jnp.sum(wbar * jac[k]) for k in jac})
    # Not the uniform (ELBO) average of the per-particle gradients.
    assert not np.allclose(grad["mu"], -jnp.mean(jac["mu"]), rtol=1e-3, atol=1e-3)


def test_rws_wake_gradients_use_normalised_weights():
    z = single_step_values()
    build = lambda params: single_step(params, L.rws_loss, detach=True)  # noqa: E731
    mu, sigma, theta = PARAMS["mu"], jnp.exp(PARAMS["log_sigma"]), PARAMS["theta"]
    log_p = normal_lp(z, theta, 1.0) + normal_lp(Y, z, OBS_SCALE)
    log_q = normal_lp(z, mu, sigma)
    wbar = jax.nn.softmax(log_p - log_q)
    assert not np.allclose(wbar, 1.0 / N, atol=1e-3)  # the weights matter

    _, _, metrics = run(build(PARAMS))
    close(metrics.loss, -jnp.sum(wbar * (log_p + log_q)))

    grad = jax.grad(loss_of(build))(PARAMS)
    # Wake-phi: -sum_i wbar_i d/dphi log q(z_i), z held fixed.
    dlogq_dmu = (z - mu) / sigma**2
    dlogq_dlogsigma = ((z - mu) / sigma) ** 2 - 1.0
    close(grad["mu"], -jnp.sum(wbar * dlogq_dmu))
    close(grad["log_sigma"], -jnp.sum(wbar * dlogq_dlogsigma))
    assert not np.allclose(grad["mu"], -jnp.mean(dlogq_dmu), rtol=1e-3, atol=1e-3)
    # Wake-theta: -sum_i wbar_i d/dtheta log p(z_i, y).
    close(grad["theta"], -jnp.sum(wbar * (z - theta)))
    # Parameters the program does not use get zero gradient.
    for name in ("theta0", "a", "b", "log_sk", "c", "d", "log_sr"):
        assert grad[name] == 0.0


def posterior_params():
    params = dict(PARAMS)
    params["theta"] = jnp.asarray(0.0)
    params["mu"] = Y / 1.25
    params["log_sigma"] = 0.5 * jnp.log(jnp.asarray(0.25 / 1.25))
    return params


def per_particle_elbo_jacobian(stl, seed=0):
    """Jacobian of the per-particle ELBO terms (``aggregate=False``).

    ``propose`` only accepts scalar losses, so the terms are computed from
    the arguments the loss received, inside the differentiated function.
    """

    def terms(params):
        recorder = Recorder(L.elbo_loss)
        run(single_step(params, recorder, stl=stl), seed)
        return L.elbo_loss(*recorder.calls[-1], aggregate=False)

    return jax.jacobian(terms)(posterior_params())


def test_stick_the_landing_gradient_vanishes_at_the_posterior():
    params = posterior_params()
    # q is exactly the posterior: log p(z, y) - log q(z) = log p(y) for all z.
    _, trace, metrics = run(single_step(params, None))
    log_evidence = normal_lp(Y, 0.0, math.sqrt(1.0 + OBS_SCALE**2))
    close(metrics.log_weight, jnp.full((N,), log_evidence))

    for seed in (0, 1):
        jac = per_particle_elbo_jacobian(stl=True, seed=seed)
        for name in ("mu", "log_sigma"):
            assert jac[name].shape == (N,)
            np.testing.assert_allclose(np.asarray(jac[name]), 0.0, atol=1e-5)

    # Without sticking the landing the per-particle gradients are the score
    # terms d/dphi log q(z) (z fixed), which are not zero.
    jac = per_particle_elbo_jacobian(stl=False)
    z = run(single_step(params, None))[1]["z"].value
    sigma = jnp.exp(params["log_sigma"])
    eps = (z - params["mu"]) / sigma
    close(jac["mu"], (eps / sigma) / N)
    close(jac["log_sigma"], (eps**2 - 1.0) / N)
    assert np.all(np.abs(np.asarray(jac["mu"])) > 1e-4)

    # The STL value is unchanged: the aggregated loss is -log p(y).
    _, _, stl_metrics = run(single_step(params, L.elbo_loss, stl=True))
    close(stl_metrics.loss, -log_evidence)


def test_elbo_and_iwae_with_incoming_weights():
    """A weighted, not resampled, proposal: w1 = softmax(incoming)."""

    def build(params, loss_fn):
        inner = combinators.propose(prior_target(params), proposal(params))
        return combinators.propose(
            combinators.extend(target(params), reverse(params)),
            combinators.compose(kernel(params), inner),
            loss_fn=loss_fn,
        )

    recorder = Recorder(L.elbo_loss)
    run(build(PARAMS, recorder))
    ((q_trace, _, incoming, _),) = recorder.calls
    z_old, z_new = q_trace.history("z")[-1].value, q_trace.history("z")[0].value

    def hand(params, name):
        lp = multi_step_parts(params, z_old, z_new, False)
        mu, sigma = params["mu"], jnp.exp(params["log_sigma"])
        z0 = mu + sigma * jax.lax.stop_gradient((z_old - mu) / sigma)
        lw0 = normal_lp(z0, params["theta0"], 1.0) - normal_lp(z0, mu, sigma)
        inc = multi_step_incremental(lp)
        if name == "elbo":
            return -jnp.sum(jax.lax.stop_gradient(jax.nn.softmax(lw0)) * inc)
        return -(logsumexp(lw0 + inc) - jnp.log(N))

    mu, sigma = PARAMS["mu"], jnp.exp(PARAMS["log_sigma"])
    close(
        incoming, normal_lp(z_old, PARAMS["theta0"], 1.0) - normal_lp(z_old, mu, sigma)
    )
    assert not np.allclose(incoming, incoming[0])
    for name in ("elbo", "iwae"):
        f = loss_of(functools.partial(build, loss_fn=ALL_LOSSES[name]))
        expected = functools.partial(hand, name=name)
        close(f(PARAMS), expected(PARAMS))
        close_tree(jax.grad(f)(PARAMS), jax.grad(expected)(PARAMS))


# ---------------------------------------------------------------------------
# Multi-step losses: propose(extend(p, r), compose(k, resample(propose(p0, q)))).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", MULTI_STEP)
def test_multi_step_roles_value_and_gradient(name):
    loss_fn = ALL_LOSSES[name]
    detached = name in SCORE_FUNCTION
    z_old, z_new = multi_step_values()

    recorder = Recorder(loss_fn)
    _, trace, metrics = run(multi_step(PARAMS, recorder, detach=detached))
    ((q_trace, p_trace, incoming, incremental),) = recorder.calls

    # The traces the loss saw: q has two generations of z (kernel's, newest
    # first, and the resampled initial draw); p has the target's z, the
    # observed y and the reverse kernel's auxiliary z.
    assert [s.auxiliary for s in q_trace.history("z")] == [False, False]
    assert [s.auxiliary for s in p_trace.history("z")] == [False, True]
    assert p_trace["y"].observed
    close(q_trace.history("z")[-1].value, z_old)
    close(q_trace.history("z")[0].value, z_new)
    close(p_trace.history("z")[0].value, z_new)
    close(p_trace.history("z")[1].value, z_old)
    assert list(trace) == ["z", "y"] and len(trace.history("z")) == 1

    # Per-site log densities recorded in the traces match the hand ones.
    lp = multi_step_parts(PARAMS, z_old, z_new, detached)
    close(q_trace.history("z")[-1].log_prob, lp["proposal"])
    close(q_trace.history("z")[0].log_prob, lp["forward"])
    close(p_trace["z"].log_prob + p_trace["y"].log_prob, lp["target"])
    close(p_trace.history("z")[1].log_prob, lp["reverse"])

    # Weights: incoming is log Z-hat of the resampled step (equal for all
    # particles); incremental is p(z', y) r(z | z') / (p0(z) k(z' | z)).
    assert incoming.shape == (N,)
    close(incoming, jnp.full((N,), incoming[0]))
    close(incremental, multi_step_incremental(lp))
    close(metrics.log_weight, incoming + incremental)

    # Value: metrics.loss == built-in loss on the recorded args == hand formula.
    expected = hand_multi_step(name, PARAMS, z_old, z_new)
    close(metrics.loss, loss_fn(q_trace, p_trace, incoming, incremental))
    close(metrics.loss, expected)

    # Gradient wrt every parameter (q, kernel, reverse, p0 and p).
    build = lambda params: multi_step(params, loss_fn, detach=detached)  # noqa: E731
    grad = jax.grad(loss_of(build))(PARAMS)
    hand_grad = jax.grad(lambda params: hand_multi_step(name, params, z_old, z_new))(
        PARAMS
    )
    close_tree(grad, hand_grad)


def test_multi_step_rws_wake_gradients():
    """RWS with a kernel: score-function gradients under normalised weights."""
    z_old, z_new = multi_step_values()
    build = lambda params: multi_step(params, L.rws_loss, detach=True)  # noqa: E731
    grad = jax.grad(loss_of(build))(PARAMS)
    lp = multi_step_parts(PARAMS, z_old, z_new, True)
    wbar = jax.nn.softmax(multi_step_incremental(lp))
    a, b, sk = PARAMS["a"], PARAMS["b"], jnp.exp(PARAMS["log_sk"])
    resid = (z_new - a * z_old - b) / sk**2
    # Kernel (forward) parameters: -sum wbar d log k.
    close(grad["a"], -jnp.sum(wbar * resid * z_old))
    close(grad["b"], -jnp.sum(wbar * resid))
    # Target: -sum wbar d/dtheta log p(z', y).
    close(grad["theta"], -jnp.sum(wbar * (z_new - PARAMS["theta"])))
    # Proposal site enters with a minus sign: +sum wbar d/dtheta0 log p0(z).
    close(grad["theta0"], jnp.sum(wbar * (z_old - PARAMS["theta0"])))
    # Reverse kernel and the (detached) initial proposal get no gradient.
    for name in ("c", "d", "log_sr", "mu", "log_sigma"):
        assert grad[name] == 0.0


def _hand_with_observed_intermediate(name, params, q_trace, p_trace):
    """Roles per the module docstring when the intermediate target observes y.

    Proposal sites are the oldest generation of each *re-sampled* target site
    (only ``z``); the observed ``y`` of the intermediate target, not
    re-sampled by the kernel, is a forward site.
    """
    history = q_trace.history("z")
    z_old, z_new = history[-1].value, history[0].value
    lp = multi_step_parts(params, z_old, z_new, name in SCORE_FUNCTION)
    if name in SCORE_FUNCTION:
        zo = jax.lax.stop_gradient(z_old)
    else:
        mu, sigma = params["mu"], jnp.exp(params["log_sigma"])
        zo = mu + sigma * jax.lax.stop_gradient((z_old - mu) / sigma)
    # The intermediate target is p itself: z ~ N(theta, 1), y | z observed.
    # Every target site found in q contributes its oldest generation as a
    # proposal site, so the intermediate target's y counts with its prior z.
    log_lik_old = normal_lp(Y, zo, OBS_SCALE)
    proposal_lp = normal_lp(zo, params["theta"], 1.0) + log_lik_old
    forward_lp = lp["forward"]
    inc = lp["target"] + lp["reverse"] - forward_lp - proposal_lp
    w = jax.lax.stop_gradient(jax.nn.softmax(inc))
    w1 = jnp.full((N,), 1.0 / N)
    if name == "rws":
        return -jnp.sum(w * (lp["target"] - proposal_lp + forward_lp))
    if name == "fkl":
        return -jnp.sum(w * (forward_lp + proposal_lp) - w1 * proposal_lp)
    if name == "rkl":
        v = jax.lax.stop_gradient(inc)
        return -jnp.sum(
            w1 * (inc + (1.0 + v - jnp.mean(v)) * proposal_lp) - w * lp["target"]
        )
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["rws", "fkl", "rkl"])
def test_intermediate_target_sites_in_q_are_proposal_sites(name):
    loss_fn = ALL_LOSSES[name]
    detached = name in SCORE_FUNCTION
    recorder = Recorder(loss_fn)
    build = lambda params, fn: multi_step(  # noqa: E731
        params, fn, detach=detached, first_target=target
    )
    _, _, metrics = run(build(PARAMS, recorder))
    ((q_trace, p_trace, incoming, incremental),) = recorder.calls
    # y is in q only once (from the intermediate target), never re-sampled.
    assert len(q_trace.history("y")) == 1 and q_trace["y"].observed
    close(
        metrics.loss,
        _hand_with_observed_intermediate(name, PARAMS, q_trace, p_trace),
    )
    grad = jax.grad(loss_of(lambda params: build(params, loss_fn)))(PARAMS)
    expected = jax.grad(
        lambda params: _hand_with_observed_intermediate(name, params, q_trace, p_trace)
    )(PARAMS)
    close_tree(grad, expected)


# ---------------------------------------------------------------------------
# aggregate=False, jit, discrete latents.
# ---------------------------------------------------------------------------


def _recorded_args(name):
    recorder = Recorder(ALL_LOSSES[name])
    if name in MULTI_STEP:
        run(multi_step(PARAMS, recorder, detach=name in SCORE_FUNCTION))
    else:
        run(single_step(PARAMS, recorder, detach=name in SCORE_FUNCTION))
    (args,) = recorder.calls
    return args


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_aggregate_false_gives_per_particle_terms(name):
    loss_fn = ALL_LOSSES[name]
    args = _recorded_args(name)
    terms = loss_fn(*args, aggregate=False)
    assert terms.shape == (N,)
    if name != "iwae":
        close(jnp.sum(terms), loss_fn(*args))
        return
    # iwae: -wbar_i log w_i, whose sum has the gradient of the loss.
    q_trace, p_trace, incoming, incremental = args
    lw = incoming + incremental
    close(terms, -jax.nn.softmax(lw) * lw)

    def summed(*a):
        return jnp.sum(L.iwae_loss(*a, aggregate=False))

    grad_terms = jax.grad(loss_of(lambda params: single_step(params, summed)))(PARAMS)
    grad_loss = jax.grad(loss_of(lambda params: single_step(params, L.iwae_loss)))(
        PARAMS
    )
    close_tree(grad_terms, grad_loss)


@pytest.mark.parametrize(
    "name,multi",
    [(name, False) for name in sorted(ALL_LOSSES)]
    + [(name, True) for name in MULTI_STEP],
)
def test_jit_matches_eager(name, multi):
    loss_fn = ALL_LOSSES[name]
    detached = name in SCORE_FUNCTION
    builder = multi_step if multi else single_step
    f = jax.value_and_grad(
        loss_of(lambda params: builder(params, loss_fn, detach=detached), seed=3)
    )
    value, grad = f(PARAMS)
    jit_value, jit_grad = jax.jit(f)(PARAMS)
    close(jit_value, value)
    close_tree(jit_grad, grad)


def _discrete_programs():
    def p():
        with numpyro.plate("particles", N):
            c = numpyro.sample("c", dist.Bernoulli(0.3))
            numpyro.sample("y", dist.Normal(2.0 * c, 1.0), obs=Y)

    def q():
        with numpyro.plate("particles", N):
            numpyro.sample("c", dist.Bernoulli(0.6))

    return p, q


def test_pathwise_loss_rejects_discrete_latent():
    p, q = _discrete_programs()
    with pytest.raises(ValueError, match="'c'"):
        run(combinators.propose(p, q, loss_fn=L.elbo_loss))
    for loss_fn in (L.iwae_loss, L.rkl_loss, L.avo_loss):
        with pytest.raises(ValueError, match="'c'"):
            run(combinators.propose(p, q, loss_fn=loss_fn))


def test_score_function_loss_accepts_discrete_latent():
    p, q = _discrete_programs()
    recorder = Recorder(L.rws_loss)
    _, trace, metrics = run(combinators.propose(p, q, loss_fn=recorder))
    ((q_trace, p_trace, incoming, incremental),) = recorder.calls
    c = trace["c"].value
    log_p = jnp.where(c == 1, jnp.log(0.3), jnp.log(0.7)) + normal_lp(Y, 2.0 * c, 1.0)
    log_q = jnp.where(c == 1, jnp.log(0.6), jnp.log(0.4))
    close(incremental, log_p - log_q)
    w = jax.nn.softmax(log_p - log_q)
    close(metrics.loss, -jnp.sum(w * (log_p + log_q)))
    assert np.isfinite(float(metrics.loss))
