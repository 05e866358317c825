"""Gradient estimators of ``combinators.estimators`` against exact gradients.

Each estimator is run ``M`` times with independent keys (``vmap``, compiled
once) and the mean of its gradient draws is compared, component by
component, with the exact gradient of the objective it claims to estimate:

    |mean_i - exact_i| <= C * SE_i,    SE_i = std_i / sqrt(M),

with ``C = 5`` (two-sided normal tail 6e-7 per component; a union bound over
all components of all checks leaves a false-alarm probability below 1e-3,
for any seed). Each check prints the summed per-draw gradient variance of
every parameter (``pytest -s``): the numbers a tutorial can cite.

Exact gradients:

* Discrete model, by enumeration. Two data points ``x_n`` (columns of the
  log weights), each with three binary local latents:
  ``z_nl ~ Bernoulli(sigmoid(prior_l))``, ``x_n | z_n ~ N(w . z_n, 0.7^2)``
  (``theta = (prior, w)``); amortised proposal
  ``q(z_nl | x_n) = Bernoulli(sigmoid(a_l x_n + c_l))`` (``phi = (a, c)``).
  With ``K = 3`` particles a multi-sample bound is a sum over
  ``8^3 = 512`` particle tuples per column.
* Gaussian model, by Gauss-Hermite quadrature. ``z_n ~ N(theta, 1)``,
  ``x_n | z_n ~ N(z_n, 0.8^2)``, ``q(z_n) = N(mu_n, s_n^2)``. A K-particle
  bound is a K-dimensional Gaussian integral over the noise ``eps`` with a
  smooth integrand; a 20^3-node product rule is exact to far below the
  Monte Carlo error (checked against 28 nodes and, for K = 1, against the
  closed-form ELBO), and differentiating the quadrature of the pathwise
  integrand gives the exact gradient.
* Relaxed Bernoulli model, by the trapezoid rule over the logistic noise.

Negative controls run the same check on deliberately broken estimators
(VIMCO whose baseline sees its own particle or has no score term, a
score-function ELBO without its score term) and require it to *fail*, so
the check has power.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax.scipy.special import logsumexp

import combinators as coix
from combinators import estimators as E
from combinators import loss as L
from combinators import relaxed as R
from combinators.loss._score import _leave_one_out_log_z
from combinators.loss.roles import proposal_log_prob
from combinators.train import train

C = 5.0
M = 4000
K = 3
D = 2

# ---------------------------------------------------------------------------
# Compiling, drawing, checking.
# ---------------------------------------------------------------------------

# Each compiled function here is small and run once, so compile time
# dominates; XLA's backend optimisation level 0 compiles about 3x faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(fn):
    """``jax.jit(fn)`` compiled for fast compilation, called once."""

    def run(*args):
        return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)

    return run


def keys(n, seed):
    return jax.random.split(jax.random.key(seed), n)


# Compiled computations here keep arrays below 2^15 elements: XLA's CPU
# backend in jax 0.10.2 miscomputes some fused reductions beyond that (rows
# past 10922 of ``jax.jit(lambda x, g: jnp.sum(c * x**2, 1)[:, None] * g)``
# on (n, 3) arrays with a constant ``c``; XLA_FLAGS=
# --xla_cpu_experimental_ynn_fusion_type= avoids it). Draws and quadrature
# nodes are therefore processed in chunks with ``lax.map``.
CHUNK = 200


def draws_of(fn, *, seed, num=M):
    """``fn(key)`` for ``num`` independent keys (stacked on axis 0)."""
    chunks = keys(num, seed).reshape(num // CHUNK, CHUNK)
    draws = compiled(lambda ks: jax.lax.map(jax.vmap(fn), ks))(chunks)
    return jax.tree_util.tree_map(lambda x: x.reshape((num,) + x.shape[2:]), draws)


def gradient_draws(loss_of, params, *, seed, num=M):
    """``num`` independent draws of ``grad loss_of(params, key)``."""
    return draws_of(lambda key: jax.grad(loss_of)(params, key), seed=seed, num=num)


def chunked_sum(fn, nodes, weights, chunk=1000):
    """``sum_i weights_i fn(nodes_i)`` over quadrature nodes, ``chunk`` at a time."""
    pad = (-nodes.shape[0]) % chunk
    nodes = jnp.concatenate([nodes, jnp.repeat(nodes[:1], pad, axis=0)])
    weights = jnp.concatenate([weights, jnp.zeros(pad, weights.dtype)])
    parts = jax.lax.map(
        lambda nw: jnp.sum(nw[1] * fn(nw[0])),
        (nodes.reshape((-1, chunk) + nodes.shape[1:]), weights.reshape(-1, chunk)),
    )
    return jnp.sum(parts)


def _flat(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(path).strip("[]'"): np.asarray(x) for path, x in leaves
    }


def z_scores(draws, exact):
    """Per-component ``|mean - exact| / SE``, and summed variances, per leaf."""
    draws, exact = _flat(draws), _flat(exact)
    assert draws.keys() == exact.keys()
    z, variances = {}, {}
    for name in draws:
        d = draws[name].reshape(draws[name].shape[0], -1).astype(np.float64)
        e = exact[name].reshape(-1).astype(np.float64)
        mean, var = d.mean(axis=0), d.var(axis=0, ddof=1)
        se = np.sqrt(var / d.shape[0])
        # Components without variance must agree to float32 round-off.
        floor = 1e-6 + 1e-5 * np.abs(e)
        z[name] = np.abs(mean - e) / np.maximum(se, floor)
        variances[name] = float(var.sum())
    return z, variances


def check_unbiased(name, draws, exact, c=C):
    """Asserts ``|mean - exact| <= c SE`` per component; prints the variances."""
    z, variances = z_scores(draws, exact)
    parts = ", ".join(f"{k}={v:.4g}" for k, v in variances.items())
    print(f"\n[gradient variance] {name:36s} {parts}")
    bad = {k: np.round(v, 1).tolist() for k, v in z.items() if np.any(v > c)}
    assert not bad, f"{name}: |mean - exact| / SE above {c}: {bad}"
    return variances


def max_z(draws, exact):
    z, _ = z_scores(draws, exact)
    return max(float(np.max(v)) for v in z.values())


def grad_of(fn, params, sign=1.0):
    """``sign * grad fn(params)``, compiled."""
    return compiled(
        lambda p: jax.tree_util.tree_map(lambda g: sign * g, jax.grad(fn)(p))
    )(params)


def neg_grad(fn, params):
    return grad_of(fn, params, -1.0)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def recorded_args(program, *args):
    """The arguments ``propose`` gave its loss in one run of ``program(loss_fn)``."""

    def run(key):
        calls = []

        def recording(*a, **k):
            calls.append(a)
            return jnp.zeros(())

        coix.traced_evaluate(program(recording), seed=key)(*args)
        (call,) = calls
        return call

    return compiled(run)(jax.random.key(0))


# ---------------------------------------------------------------------------
# Discrete model.
# ---------------------------------------------------------------------------

X = jnp.array([1.1, -0.6])
SIGMA = 0.7
THETA = ("prior", "w")
PHI = ("a", "c")
PARAMS = {
    "prior": jnp.array([-0.3, 0.4, 0.1]),
    "w": jnp.array([1.0, -0.8, 0.6]),
    "a": jnp.array([0.5, -0.4, 0.3]),
    "c": jnp.array([0.2, -0.1, 0.3]),
}
STATES = jnp.array(list(itertools.product([0.0, 1.0], repeat=3)))  # (8, 3)
TUPLES = jnp.array(list(itertools.product(range(8), repeat=K)))  # (512, K)


def target(params, n=K):
    """``p(z, x)``; called with ``x=None`` it dreams ``x`` (the sleep phase)."""

    def p(x):
        with numpyro.plate("particles", n, dim=-2), numpyro.plate("data", D, dim=-1):
            z = numpyro.sample("z", dist.Bernoulli(logits=params["prior"]).to_event(1))
            x = numpyro.sample("x", dist.Normal(z @ params["w"], SIGMA), obs=x)
        return (x,)

    return p


def proposal(params, n=K):
    def q(x):
        logits = x[..., None] * params["a"] + params["c"]
        with numpyro.plate("particles", n, dim=-2), numpyro.plate("data", D, dim=-1):
            numpyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))
        return ()

    return q


def discrete_program(params, loss_fn, n=K, detach_target=False):
    return coix.propose(
        target(params, n),
        coix.detach(proposal(params, n)),
        loss_fn=loss_fn,
        detach=detach_target,
    )


def run_loss(make_loss, n=K, detach_target=False):
    """``(params, key) -> loss`` of ``propose(p, detach(q), make_loss(params))``."""

    def loss_of(params, key):
        program = discrete_program(params, make_loss(params), n, detach_target)
        return coix.traced_evaluate(program, seed=key)(X)[2].loss

    return loss_of


def bernoulli_lp(z, logits):
    return jnp.sum(z * logits - jnp.logaddexp(0.0, logits), axis=-1)


def normal_lp(x, loc, scale):
    return (
        -0.5 * ((x - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * math.log(2 * math.pi)
    )


def enumerated(params):
    """``log p(x_n, s)`` and ``log q(s | x_n)`` for every state: shape (D, 8)."""
    log_prior = bernoulli_lp(STATES, params["prior"])
    log_lik = normal_lp(X[:, None], STATES @ params["w"], SIGMA)
    q_logits = X[:, None] * params["a"] + params["c"]  # (D, 3)
    log_q = jax.vmap(lambda lg: bernoulli_lp(STATES, lg))(q_logits)
    return log_prior + log_lik, log_q


def exact_elbo_per_column(params):
    log_p, log_q = enumerated(params)
    return jnp.sum(jnp.exp(log_q) * (log_p - log_q), axis=1)


def exact_elbo(params):
    return jnp.sum(exact_elbo_per_column(params))


def tuple_terms(params):
    """Per column and particle tuple: ``log P(tuple)``, ``log p``, ``log q``."""
    log_p, log_q = enumerated(params)
    lp, lq = log_p[:, TUPLES], log_q[:, TUPLES]  # (D, 512, K)
    return jnp.sum(lq, axis=-1), lp, lq


def exact_iwae(params):
    log_prob_tuple, lp, lq = tuple_terms(params)
    bound = logsumexp(lp - lq, axis=-1) - math.log(K)
    return jnp.sum(jnp.exp(log_prob_tuple) * bound)


def expected_reweighted(params, part):
    """``E[sum_k wbar_k part_k]`` with the tuple law and the weights held fixed.

    Its gradient is the expectation of the RWS wake estimator whose
    surrogate is ``sum_k wbar_k part_k`` (``part``: log p or log q).
    """
    log_prob_tuple, lp, lq = tuple_terms(params)
    prob = jax.lax.stop_gradient(jnp.exp(log_prob_tuple))
    wbar = jax.lax.stop_gradient(jax.nn.softmax(lp - lq, axis=-1))
    chosen = {"log_p": lp, "log_q": lq}[part]
    return jnp.sum(prob[..., None] * wbar * chosen)


def baseline_of(params):
    """NVIL's input-dependent baseline ``b(x_n) = psi_0 + psi_1 x_n``."""
    return params["psi"][0] + params["psi"][1] * X


def exact_nvil(params, c):
    """Negative ELBO plus the baseline's expected squared error."""
    log_p, log_q = enumerated(params)
    q = jax.lax.stop_gradient(jnp.exp(log_q))
    signal = jax.lax.stop_gradient(log_p - log_q)
    regression = jnp.sum(q * (signal - c - baseline_of(params)[:, None]) ** 2)
    return -exact_elbo(params) + regression


C_EMA = float(jnp.mean(exact_elbo_per_column(PARAMS)))  # a converged average
PSI_FITTED = jnp.linalg.solve(
    jnp.stack([jnp.ones(D), X], axis=1), exact_elbo_per_column(PARAMS) - C_EMA
)
PSI_UNFITTED = jnp.array([-1.0, 0.5])
NVIL_SCALE = 3.0
NVIL_NORMALISED = "nvil (b(x) + c) / s, fitted; times s"


def moments(mean, variance=1.0):
    return E.SignalMoments(jnp.asarray(mean), jnp.asarray(variance))


def _theta_only(grad):
    return {k: v if k in THETA else jnp.zeros_like(v) for k, v in grad.items()}


def _discrete_cases():
    """name -> (params, make_loss, detach_target, exact gradient (a thunk))."""
    elbo = lambda: neg_grad(exact_elbo, PARAMS)  # noqa: E731
    fitted = {**PARAMS, "psi": PSI_FITTED}
    unfitted = {**PARAMS, "psi": PSI_UNFITTED}
    return {
        "reinforce (no baseline)": (PARAMS, lambda p: E.reinforce_loss, False, elbo),
        "nvil (moving average c)": (
            PARAMS,
            lambda p: E.nvil_loss(moments=moments(C_EMA)),
            False,
            elbo,
        ),
        "nvil (b(x) + c), psi not fitted": (
            unfitted,
            lambda p: E.nvil_loss(baseline_of(p), moments(0.3)),
            False,
            lambda: grad_of(lambda p: exact_nvil(p, 0.3), unfitted),
        ),
        NVIL_NORMALISED: (
            fitted,
            lambda p: E.nvil_loss(
                baseline_of(p), moments(C_EMA, NVIL_SCALE**2), normalize=True
            ),
            False,
            lambda: grad_of(lambda p: exact_nvil(p, C_EMA), fitted),
        ),
        "vimco": (
            PARAMS,
            lambda p: E.vimco_loss,
            False,
            lambda: neg_grad(exact_iwae, PARAMS),
        ),
        "rws wake-theta": (
            PARAMS,
            lambda p: E.rws_wake_theta_loss,
            True,
            lambda: neg_grad(lambda p: expected_reweighted(p, "log_p"), PARAMS),
        ),
        "rws wake-phi (score function)": (
            PARAMS,
            lambda p: E.rws_wake_phi_loss,
            False,
            lambda: neg_grad(lambda p: expected_reweighted(p, "log_q"), PARAMS),
        ),
        "wake-theta (classic)": (
            PARAMS,
            lambda p: E.wake_theta_loss,
            True,
            lambda: _theta_only(elbo()),
        ),
    }


DISCRETE = _discrete_cases()


@functools.cache
def discrete_draws(name):
    params, make_loss, detach_target, _ = DISCRETE[name]
    seed = sorted(DISCRETE).index(name)
    draws = gradient_draws(
        run_loss(make_loss, detach_target=detach_target), params, seed=seed
    )
    if name == NVIL_NORMALISED:
        # Normalisation divides the proposal's gradient by s; undo it.
        draws = {k: v * NVIL_SCALE if k in PHI else v for k, v in draws.items()}
    return draws


def test_enumeration_matches_the_program():
    q_trace, p_trace, incoming, incremental = recorded_args(
        lambda fn: discrete_program(PARAMS, fn), X
    )
    z = q_trace["z"].value
    log_p = bernoulli_lp(z, PARAMS["prior"]) + normal_lp(X, z @ PARAMS["w"], SIGMA)
    log_q = bernoulli_lp(z, X[:, None] * PARAMS["a"] + PARAMS["c"])
    np.testing.assert_allclose(
        incoming + incremental, log_p - log_q, rtol=1e-5, atol=1e-5
    )
    assert incremental.shape == (K, D)


@pytest.mark.parametrize("name", sorted(DISCRETE))
def test_discrete_estimator_is_unbiased(name):
    check_unbiased(name, discrete_draws(name), DISCRETE[name][3]())


def test_vimco_estimates_the_bound_not_the_elbo():
    assert max_z(discrete_draws("vimco"), neg_grad(exact_elbo, PARAMS)) > C


def test_nvil_baselines_reduce_the_proposal_variance():
    plain = discrete_draws("reinforce (no baseline)")
    averaged = discrete_draws("nvil (moving average c)")
    for name in PHI:
        assert np.sum(np.var(averaged[name], 0)) < 0.5 * np.sum(np.var(plain[name], 0))


def test_nvil_baseline_regression_gradient_is_nonzero_when_unfitted():
    exact = DISCRETE["nvil (b(x) + c), psi not fitted"][3]()
    assert np.all(np.abs(np.asarray(exact["psi"])) > 0.1)


def test_wake_terms_train_only_their_own_side():
    theta, phi = (
        discrete_draws("rws wake-theta"),
        discrete_draws("rws wake-phi (score function)"),
    )
    classic = discrete_draws("wake-theta (classic)")
    for name in PHI:
        assert np.all(theta[name] == 0) and np.all(classic[name] == 0)
    for name in THETA:
        assert np.all(phi[name] == 0)


def test_rws_wake_terms_add_up_to_rws_loss():
    def both(*args, **kwargs):
        return E.rws_wake_theta_loss(*args, **kwargs) + E.rws_wake_phi_loss(
            *args, **kwargs
        )

    def values(params, key):
        split = jax.value_and_grad(run_loss(lambda p: both))(params, key)
        joint = jax.value_and_grad(run_loss(lambda p: L.rws_loss))(params, key)
        return split, joint

    (va, ga), (vb, gb) = compiled(values)(PARAMS, jax.random.key(11))
    np.testing.assert_allclose(va, vb, rtol=1e-6)
    assert_trees_close(ga, gb)


def test_vimco_value_and_leave_one_out_baseline_by_hand():
    args = recorded_args(lambda fn: discrete_program(PARAMS, fn), X)
    lw = np.asarray(args[2] + args[3], dtype=np.float64)
    log_z = logsumexp(lw, axis=0) - math.log(K)
    value, loo = compiled(
        lambda *a: (E.vimco_loss(*a), _leave_one_out_log_z(a[2] + a[3]))
    )(*args)
    np.testing.assert_allclose(value, -np.sum(log_z), rtol=1e-5)
    for k in range(K):
        replaced = lw.copy()
        replaced[k] = np.delete(lw, k, axis=0).mean(axis=0)
        np.testing.assert_allclose(
            loo[k], logsumexp(replaced, axis=0) - math.log(K), rtol=1e-5
        )


def test_nvil_training_feeds_the_moments_back_through_train():
    def loss_fn(params, key, moments):
        b = baseline_of(params)
        program = discrete_program(params, E.nvil_loss(b, moments, normalize=True))
        _, _, metrics = coix.traced_evaluate(program, seed=key)(X)
        signal = metrics.log_weight - b
        metrics["moments"] = E.update_signal_moments(moments, signal)
        metrics["signal_mean"] = jnp.mean(signal)
        return metrics.loss, metrics

    steps = 20
    result = train(
        loss_fn,
        {**PARAMS, "psi": jnp.zeros(2)},
        optax.adam(1e-2),
        steps,
        progress=False,
        log_every=1000,
        return_result=True,
        jit_compile=lambda f: jax.jit(f, compiler_options=FAST_COMPILE),
        moments=E.init_signal_moments(),
    )
    assert result.skipped == 0 and np.all(np.isfinite(result.history["loss"]))
    # Each step saw the previous step's moments: the final mean is the
    # moving average of the per-step signal means.
    expected = 0.0
    for signal_mean in result.history["signal_mean"]:
        expected = 0.9 * expected + 0.1 * signal_mean
    final = result.metrics["moments"]
    assert isinstance(final, E.SignalMoments)
    np.testing.assert_allclose(final.mean, expected, rtol=1e-5)


def test_update_signal_moments_is_a_moving_average():
    state = moments(1.0, 2.0)
    signal = jnp.array([[1.0, 3.0], [5.0, 7.0]])
    new = E.update_signal_moments(state, signal, decay=0.75)
    np.testing.assert_allclose(new.mean, 0.75 * 1.0 + 0.25 * 4.0)
    np.testing.assert_allclose(new.variance, 0.75 * 2.0 + 0.25 * 5.0)
    with pytest.raises(ValueError, match="decay"):
        E.update_signal_moments(state, signal, decay=1.0)


@pytest.mark.parametrize(
    "loss_fn",
    [E.reinforce_loss, E.nvil_loss(0.5), E.wake_theta_loss, E.rws_wake_phi_loss],
)
def test_aggregate_false_terms_sum_to_the_loss(loss_fn):
    args = recorded_args(lambda fn: discrete_program(PARAMS, fn), X)
    terms = loss_fn(*args, aggregate=False)
    assert terms.shape == (K, D)
    np.testing.assert_allclose(jnp.sum(terms), loss_fn(*args), rtol=1e-6)


# Negative controls: broken estimators must fail the same check.


def _broken_vimco(own_particle):
    def loss(q_trace, p_trace, incoming, incremental, aggregate=True):
        lw = incoming + incremental
        _, log_q = proposal_log_prob(q_trace, p_trace)
        fixed = jax.lax.stop_gradient(lw)
        if own_particle:  # baseline L_k that depends on z_k itself
            signal = (logsumexp(fixed, 0) - math.log(K)) - fixed
        else:  # no score term
            signal = jnp.zeros_like(fixed)
        log_z = jnp.sum(logsumexp(lw, axis=0) - math.log(K))
        return -log_z - jnp.sum(signal * (log_q - jax.lax.stop_gradient(log_q)))

    return loss


def _no_score_elbo(q_trace, p_trace, incoming, incremental, aggregate=True):
    return -jnp.sum(incremental) / K


@pytest.mark.parametrize(
    "broken,exact_fn",
    [
        pytest.param(_broken_vimco(True), exact_iwae, id="vimco_baseline_sees_z_k"),
        pytest.param(
            _broken_vimco(False),
            exact_iwae,
            id="vimco_no_score",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            _no_score_elbo, exact_elbo, id="reinforce_no_score", marks=pytest.mark.slow
        ),
    ],
)
def test_negative_control_broken_estimator_fails_the_check(broken, exact_fn):
    draws = gradient_draws(run_loss(lambda p: broken), PARAMS, seed=99, num=2000)
    z = max_z(
        {k: draws[k] for k in PHI},
        {k: v for k, v in neg_grad(exact_fn, PARAMS).items() if k in PHI},
    )
    print(f"\n[negative control] max z = {z:.1f}")
    assert z > 3 * C


# Sleep phase.

GH_NODES, GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(40)
GH_WEIGHTS = GH_WEIGHTS / math.sqrt(2 * math.pi)


def exact_sleep(params):
    """``-D E_{z, x ~ p}[log q(z | x)]`` with the law of the dreams held fixed."""
    fixed = jax.lax.stop_gradient(params)
    prior = jnp.exp(bernoulli_lp(STATES, fixed["prior"]))  # (8,)
    x = (STATES @ fixed["w"])[:, None] + SIGMA * GH_NODES  # (8, G)
    log_q = bernoulli_lp(STATES[:, None, :], x[..., None] * params["a"] + params["c"])
    return -D * jnp.sum(prior[:, None] * GH_WEIGHTS * log_q)


def sleep_loss(params, key):
    return E.sleep_phi(target(params), proposal(params), seed=key)(None).loss


def test_sleep_phi_is_unbiased_and_trains_only_the_proposal():
    draws = gradient_draws(sleep_loss, PARAMS, seed=13)
    check_unbiased("sleep-phi", draws, grad_of(exact_sleep, PARAMS))
    for name in THETA:
        assert np.all(draws[name] == 0)


def test_sleep_phi_value_by_hand():
    sleep = compiled(
        lambda key: E.sleep_phi(target(PARAMS), proposal(PARAMS), seed=key)(None)
    )(jax.random.key(14))
    z, x = sleep.model_trace["z"].value, sleep.model_trace["x"].value
    assert z.shape == (K, D, 3) and x.shape == (K, D)
    log_q = bernoulli_lp(z, x[..., None] * PARAMS["a"] + PARAMS["c"])
    np.testing.assert_allclose(sleep.loss, -jnp.sum(log_q) / K, rtol=1e-5)
    np.testing.assert_allclose(sleep.proposal_trace["z"].value, z)


# ---------------------------------------------------------------------------
# Gaussian model: DReG and Rényi bounds against quadrature.
# ---------------------------------------------------------------------------

XG = jnp.array([0.9, -0.5])
SIGMA_G = 0.8
G_PHI = ("log_s", "mu")
GPARAMS = {
    "theta": jnp.asarray(0.2),
    "mu": jnp.array([0.3, -0.4]),
    "log_s": jnp.array([-0.3, 0.1]),
}


def gauss_target(params, n=K):
    def p(x):
        with numpyro.plate("particles", n, dim=-2), numpyro.plate("data", D, dim=-1):
            z = numpyro.sample("z", dist.Normal(params["theta"], 1.0))
            numpyro.sample("x", dist.Normal(z, SIGMA_G), obs=x)
        return (z,)

    return p


def gauss_proposal(params, n=K):
    def q(x):
        del x
        with numpyro.plate("particles", n, dim=-2), numpyro.plate("data", D, dim=-1):
            z = numpyro.sample("z", dist.Normal(params["mu"], jnp.exp(params["log_s"])))
        return (z,)

    return q


def gauss_run(build):
    """``(params, key) -> loss`` of ``build(target, proposal)`` at ``XG``."""

    def loss_of(params, key):
        program = build(gauss_target(params), gauss_proposal(params))
        return coix.traced_evaluate(program, seed=key)(XG)[2].loss

    return loss_of


def with_loss(loss_fn, transform=None, **kwargs):
    def build(p, q):
        return coix.propose(
            p, transform(q) if transform else q, loss_fn=loss_fn, **kwargs
        )

    return build


def quadrature_grid(k, nodes):
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / math.sqrt(2 * math.pi)
    eps = np.array(list(itertools.product(x, repeat=k)), dtype=np.float32)
    weight = np.prod(np.array(list(itertools.product(w, repeat=k))), axis=1)
    return jnp.asarray(eps), jnp.asarray(weight, dtype=jnp.float32)


GRID = quadrature_grid(K, 20)


def gauss_log_weights(params, eps):
    """Log densities (P, D, K) at ``z = mu + s eps`` for nodes ``eps`` (P, K)."""
    s = jnp.exp(params["log_s"])[:, None]
    mu = params["mu"][:, None]
    z = mu + s * eps[:, None, :]
    log_p = normal_lp(z, params["theta"], 1.0) + normal_lp(XG[:, None], z, SIGMA_G)
    return log_p, normal_lp(z, mu, s), z


def quadrature_bound(params, alpha=0.0, grid=GRID):
    """The K-particle Rényi bound (IWAE at alpha = 0), summed over columns."""
    k = grid[0].shape[1]

    def at(eps):
        log_p, log_q, _ = gauss_log_weights(params, eps)
        scaled = (1.0 - alpha) * (log_p - log_q)
        return jnp.sum((logsumexp(scaled, axis=-1) - math.log(k)) / (1.0 - alpha), -1)

    return chunked_sum(at, *grid)


def quadrature_rws(params):
    """Expected RWS wake surrogate ``sum_k wbar_k (log p + log q)``; z, wbar fixed."""
    fixed = jax.lax.stop_gradient(params)

    def at(eps):
        log_p0, log_q0, z = gauss_log_weights(fixed, eps)
        wbar = jax.nn.softmax(log_p0 - log_q0, axis=-1)
        log_p = normal_lp(z, params["theta"], 1.0) + normal_lp(XG[:, None], z, SIGMA_G)
        log_q = normal_lp(z, params["mu"][:, None], jnp.exp(params["log_s"])[:, None])
        return jnp.sum(wbar * (log_p + log_q), axis=(-2, -1))

    return chunked_sum(at, *GRID)


def closed_form_elbo(params):
    mu, s = params["mu"], jnp.exp(params["log_s"])
    log_2pi = math.log(2 * math.pi)
    e_log_prior = -0.5 * ((mu - params["theta"]) ** 2 + s**2) - 0.5 * log_2pi
    e_log_lik = (
        -0.5 * ((XG - mu) ** 2 + s**2) / SIGMA_G**2 - math.log(SIGMA_G) - 0.5 * log_2pi
    )
    entropy = 0.5 * (log_2pi + 1.0) + jnp.log(s)
    return jnp.sum(e_log_prior + e_log_lik + entropy)


def _gauss_cases():
    """name -> (build, exact gradient (a thunk))."""
    iwae = lambda: neg_grad(quadrature_bound, GPARAMS)  # noqa: E731
    rws = lambda: neg_grad(quadrature_rws, GPARAMS)  # noqa: E731
    return {
        "iwae (pathwise)": (with_loss(L.iwae_loss), iwae),
        "iwae dreg": (E.dreg_iwae, iwae),
        "rws (score-function wake-phi)": (with_loss(L.rws_loss, coix.detach), rws),
        "rws dreg": (E.dreg_rws, rws),
        "renyi alpha=0.5": (
            with_loss(E.renyi_loss(0.5)),
            lambda: neg_grad(lambda p: quadrature_bound(p, 0.5), GPARAMS),
        ),
        "renyi alpha=-1": (
            with_loss(E.renyi_loss(-1.0)),
            lambda: neg_grad(lambda p: quadrature_bound(p, -1.0), GPARAMS),
        ),
    }


GAUSS = _gauss_cases()
GAUSS_SLOW = {"iwae (pathwise)", "renyi alpha=-1"}


@functools.cache
def gauss_draws(name):
    return gradient_draws(
        gauss_run(GAUSS[name][0]), GPARAMS, seed=100 + sorted(GAUSS).index(name)
    )


def test_quadrature_is_exact():
    # K = 1: the bound is the ELBO, in closed form.
    one_particle = quadrature_grid(1, 20)
    np.testing.assert_allclose(
        compiled(lambda p: quadrature_bound(p, 0.0, one_particle))(GPARAMS),
        closed_form_elbo(GPARAMS),
        rtol=1e-5,
    )
    # 28 nodes per axis change the gradients by < 1e-3, against Monte Carlo
    # standard errors of about 1e-2 below.
    fine = quadrature_grid(K, 28)

    def gradients(params):
        return [
            (
                jax.grad(quadrature_bound)(params, a),
                jax.grad(quadrature_bound)(params, a, fine),
            )
            for a in (0.0, 0.5)
        ]

    for coarse_g, fine_g in compiled(gradients)(GPARAMS):
        assert_trees_close(coarse_g, fine_g, rtol=0.0, atol=1e-3)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in GAUSS_SLOW else n
        for n in sorted(GAUSS)
    ],
)
def test_gaussian_estimator_is_unbiased(name):
    check_unbiased(name, gauss_draws(name), GAUSS[name][1]())


def test_dreg_lowers_the_proposal_variance():
    # Against the plain estimators of the same quantities (1000 draws each
    # for the plain IWAE gradient; the RWS draws are shared).
    plain_iwae = gradient_draws(
        gauss_run(with_loss(L.iwae_loss)), GPARAMS, seed=7, num=1000
    )
    dreg, rws, dreg_rws = (
        gauss_draws(n)
        for n in ("iwae dreg", "rws (score-function wake-phi)", "rws dreg")
    )
    for name in G_PHI:
        assert np.sum(np.var(dreg[name], 0)) < 0.5 * np.sum(np.var(plain_iwae[name], 0))
        assert np.sum(np.var(dreg_rws[name], 0)) < 0.6 * np.sum(np.var(rws[name], 0))


def test_renyi_bounds_are_ordered_in_alpha():
    # The K-sample bound decreases in alpha (Li & Turner 2016, Theorem 1 and
    # its K-sample analogue): alpha = -1 > 0 (IWAE) > 0.5 > 1 (the ELBO).
    bounds = compiled(lambda p: [quadrature_bound(p, a) for a in (-1.0, 0.0, 0.5)])(
        GPARAMS
    )
    values = [float(v) for v in bounds] + [float(closed_form_elbo(GPARAMS))]
    assert all(a > b for a, b in zip(values[:-1], values[1:], strict=True)), values


def gauss_args():
    return recorded_args(
        lambda fn: coix.propose(
            gauss_target(GPARAMS), gauss_proposal(GPARAMS), loss_fn=fn
        ),
        XG,
    )


def test_renyi_is_per_data_column_with_both_limits():
    args = gauss_args()
    lw = np.asarray(args[2] + args[3], dtype=np.float64)
    assert lw.shape == (K, D)  # one column per data point
    for alpha in (0.5, -1.0, 2.0):
        per_column = (logsumexp((1 - alpha) * lw, axis=0) - math.log(K)) / (1 - alpha)
        np.testing.assert_allclose(
            E.renyi_loss(alpha)(*args), -per_column.sum(), rtol=1e-5
        )
        # Pooling the columns into one importance-sampling problem differs.
        pooled = (logsumexp((1 - alpha) * lw.sum(1)) - math.log(K)) / (1 - alpha)
        assert abs(per_column.sum() - pooled) > 1e-3
    # alpha = 0 is the IWAE bound, alpha = 1 the ELBO, alpha -> 1 tends to it.
    np.testing.assert_allclose(E.renyi_loss(0.0)(*args), L.iwae_loss(*args), rtol=1e-6)
    np.testing.assert_allclose(E.renyi_loss(1.0)(*args), L.elbo_loss(*args), rtol=1e-6)
    near = E.renyi_loss(1.0 - 1e-3)(*args)
    np.testing.assert_allclose(near, L.elbo_loss(*args), rtol=1e-3, atol=1e-3)


def test_a_latent_shared_by_the_data_couples_the_columns():
    # A global latent g (per particle, outside the data plate) couples the
    # data points: one importance-sampling problem, one column.
    def p(x):
        with numpyro.plate("particles", K, dim=-2):
            g = numpyro.sample("g", dist.Normal(0.0, 1.0))
            with numpyro.plate("data", D, dim=-1):
                z = numpyro.sample("z", dist.Normal(g, 1.0))
                numpyro.sample("x", dist.Normal(z, SIGMA_G), obs=x)
        return ()

    def q(x):
        with numpyro.plate("particles", K, dim=-2):
            numpyro.sample("g", dist.Normal(0.1, 1.2))
            with numpyro.plate("data", D, dim=-1):
                numpyro.sample("z", dist.Normal(0.2, 0.9))
        return ()

    args = recorded_args(lambda fn: coix.propose(p, q, loss_fn=fn), XG)
    q_trace, _, incoming, incremental = args
    g, z = q_trace["g"].value[:, 0], q_trace["z"].value
    lw = (
        normal_lp(g, 0.0, 1.0)
        + jnp.sum(normal_lp(z, g[:, None], 1.0) + normal_lp(XG, z, SIGMA_G), axis=1)
        - normal_lp(g, 0.1, 1.2)
        - jnp.sum(normal_lp(z, 0.2, 0.9), axis=1)
    )
    np.testing.assert_allclose((incoming + incremental)[:, 0], lw, rtol=1e-5)
    alpha = 0.5
    renyi, vimco = compiled(lambda *a: (E.renyi_loss(alpha)(*a), E.vimco_loss(*a)))(
        *args
    )
    pooled = (logsumexp((1 - alpha) * lw) - math.log(K)) / (1 - alpha)
    np.testing.assert_allclose(renyi, -pooled, rtol=1e-5)
    np.testing.assert_allclose(vimco, -(logsumexp(lw) - math.log(K)), rtol=1e-5)


def test_renyi_limits_have_the_iwae_and_elbo_gradients():
    def grads(params, key):
        return [
            jax.grad(gauss_run(with_loss(fn)))(params, key)
            for fn in (E.renyi_loss(0.0), L.iwae_loss, E.renyi_loss(1.0), L.elbo_loss)
        ]

    r0, iwae, r1, elbo = compiled(grads)(GPARAMS, jax.random.key(3))
    assert_trees_close(r0, iwae)
    assert_trees_close(r1, elbo)


def test_aggregate_false_terms_have_the_loss_gradient():
    def summed(fn):
        def loss(*args):
            return jnp.sum(fn(*args, aggregate=False))

        loss.pathwise = getattr(fn, "pathwise", False)
        return loss

    stl = coix.stick_the_landing
    cases = [
        (E.renyi_loss(0.5), {}),
        (E.renyi_loss(1.0), {}),
        (E.vimco_loss, {"transform": coix.detach}),
        (E.iwae_dreg_loss, {"transform": stl, "detach": True}),
        (E.rws_dreg_loss, {"transform": stl, "detach": True}),
    ]

    def grads(params, key):
        return [
            (
                jax.grad(gauss_run(with_loss(summed(fn), **kw)))(params, key),
                jax.grad(gauss_run(with_loss(fn, **kw)))(params, key),
            )
            for fn, kw in cases
        ]

    for a, b in compiled(grads)(GPARAMS, jax.random.key(5)):
        assert_trees_close(a, b)


# ---------------------------------------------------------------------------
# Relaxations.
# ---------------------------------------------------------------------------


def test_concrete_with_two_categories_is_numpyros_relaxed_bernoulli():
    y = jnp.linspace(0.02, 0.98, 9)
    logits = jnp.array([0.4, -0.7])

    def both(t):
        two = R.RelaxedOneHotCategorical(t, logits=logits).log_prob(
            jnp.stack([1 - y, y], -1)
        )
        return two, dist.RelaxedBernoulliLogits(t, logits[1] - logits[0]).log_prob(y)

    for t in (0.3, 1.0, 2.5):
        np.testing.assert_allclose(*compiled(both)(t), rtol=1e-4, atol=1e-5)


def test_exp_concrete_density_is_the_concrete_density_in_log_space():
    probs = jnp.array([0.2, 0.5, 0.3])

    def densities(key):
        simplex = R.RelaxedOneHotCategorical(0.6, probs=probs)
        logs = R.ExpRelaxedOneHotCategorical(0.6, probs=probs)
        x = logs.sample(key, (5,))
        return x, logs.log_prob(x), simplex.log_prob(jnp.exp(x))

    x, log_density, simplex_density = compiled(densities)(jax.random.key(0))
    np.testing.assert_allclose(jnp.sum(jnp.exp(x), -1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(log_density, simplex_density + jnp.sum(x, -1), rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_concrete_density_integrates_to_one(temperature):
    # Over the 2-simplex: y1 = u, y2 = (1 - u) v, Jacobian (1 - u).
    nodes, w = np.polynomial.legendre.leggauss(100)
    u, wu = (nodes + 1) / 2, w / 2
    uu, vv = np.meshgrid(u, u, indexing="ij")
    y = np.stack([uu, (1 - uu) * vv, (1 - uu) * (1 - vv)], axis=-1)
    log_prob = compiled(
        lambda v: R.RelaxedOneHotCategorical(
            temperature, logits=jnp.array([0.3, -0.5, 1.0])
        ).log_prob(v)
    )
    density = np.exp(np.asarray(log_prob(jnp.asarray(y, dtype=jnp.float32))))
    total = np.sum(density * (1 - uu) * np.outer(wu, wu))
    np.testing.assert_allclose(total, 1.0, atol=2e-3)


def test_concrete_argmax_is_exactly_categorical():
    probs = np.array([0.2, 0.5, 0.3])
    n = 10000
    for t in (0.1, 3.0):
        concrete = R.RelaxedOneHotCategorical(t, probs=jnp.asarray(probs))
        y = compiled(lambda key, d=concrete: d.sample(key, (n,)))(jax.random.key(1))
        freq = np.bincount(np.asarray(jnp.argmax(y, -1)), minlength=3) / n
        assert np.all(np.abs(freq - probs) <= C * np.sqrt(probs * (1 - probs) / n)), (
            t,
            freq,
        )


def test_concrete_sampler_and_density_agree():
    # grad E[f(y)] two ways: pathwise through the sampler, and by the score
    # function of the density. Paired on the same draws, their difference
    # has mean zero only if log_prob is the density of the sampler's output.
    coef = jnp.array([1.0, -2.0, 0.5])
    logits = jnp.array([0.3, -0.2, 0.6])

    def f(y):
        return jnp.sum(coef * y**2, -1)

    def difference(key):
        def sample(lg):
            return R.RelaxedOneHotCategorical(0.7, logits=lg).sample(key)

        y = jax.lax.stop_gradient(sample(logits))
        pathwise = jax.grad(lambda lg: f(sample(lg)))(logits)
        log_q = lambda lg: R.RelaxedOneHotCategorical(0.7, logits=lg).log_prob(y)  # noqa: E731
        return pathwise - f(y) * jax.grad(log_q)(logits)

    diff = draws_of(difference, seed=2, num=20000)
    check_unbiased("concrete: pathwise - score", {"d": diff}, {"d": jnp.zeros(3)})


# Relaxed-Bernoulli model: one relaxed bit per data column.
RB_PARAMS = {
    "prior": jnp.asarray(0.3),
    "phi": jnp.array([0.5, -0.8]),
    "w": jnp.asarray(1.5),
}


def relaxed_target(params, t):
    def p(x):
        with numpyro.plate("particles", K, dim=-2), numpyro.plate("data", D, dim=-1):
            y = numpyro.sample("y", dist.RelaxedBernoulliLogits(t, params["prior"]))
            numpyro.sample("x", dist.Normal(params["w"] * y, SIGMA), obs=x)
        return ()

    return p


def relaxed_proposal(params, t):
    def q(x):
        del x
        with numpyro.plate("particles", K, dim=-2), numpyro.plate("data", D, dim=-1):
            numpyro.sample("y", dist.RelaxedBernoulliLogits(t, params["phi"]))
        return ()

    return q


def logistic_grid(num):
    """Trapezoid nodes and weights for the standard logistic law on [-40, 40]."""
    grid = jnp.linspace(-40.0, 40.0, num)
    density = jnp.exp(-jnp.abs(grid)) / (1 + jnp.exp(-jnp.abs(grid))) ** 2
    return grid, density * (grid[1] - grid[0])


def relaxed_elbo_quadrature(params, t):
    """The relaxed ELBO by the trapezoid rule over the logistic noise."""

    def at(noise):
        y = jax.nn.sigmoid((params["phi"] + noise[:, None]) / t)  # (G, D)
        log_p = dist.RelaxedBernoulliLogits(t, params["prior"]).log_prob(y)
        log_p = log_p + normal_lp(X, params["w"] * y, SIGMA)
        log_q = dist.RelaxedBernoulliLogits(t, params["phi"]).log_prob(y)
        return jnp.sum(log_p - log_q, axis=-1)

    return chunked_sum(at, *logistic_grid(16001))


def test_relaxed_elbo_gradient_is_unbiased_for_the_relaxed_objective():
    t = 1.0

    def loss_of(params, key):
        program = coix.propose(
            relaxed_target(params, t), relaxed_proposal(params, t), loss_fn=L.elbo_loss
        )
        return coix.traced_evaluate(program, seed=key)(X)[2].loss

    draws = gradient_draws(loss_of, RB_PARAMS, seed=30)
    exact = neg_grad(lambda p: relaxed_elbo_quadrature(p, t), RB_PARAMS)
    check_unbiased("relaxed bernoulli elbo, t=1", draws, exact)


def test_relaxed_gradient_converges_to_the_discrete_one_as_temperature_falls():
    # The likelihood term E_q[f(y)], f(y) = log N(x; w y, sigma^2), with
    # y ~ RelaxedBernoulli(phi, t) versus y ~ Bernoulli(sigmoid(phi)). Exact
    # in both cases (trapezoid rule fine enough for t = 0.03; enumeration).
    def f(y):
        return normal_lp(X, RB_PARAMS["w"] * y, SIGMA)

    grid = logistic_grid(160001)

    def relaxed(phi, t):
        return chunked_sum(
            lambda noise: jnp.sum(f(jax.nn.sigmoid((phi + noise[:, None]) / t)), -1),
            *grid,
        )

    def discrete(phi):
        prob = jax.nn.sigmoid(phi)
        return jnp.sum(prob * f(1.0) + (1 - prob) * f(0.0))

    exact = jax.grad(discrete)(RB_PARAMS["phi"])
    temperatures = (1.0, 0.3, 0.1, 0.03)
    grads = compiled(lambda phi: [jax.grad(relaxed)(phi, t) for t in temperatures])(
        RB_PARAMS["phi"]
    )
    errors = [float(jnp.max(jnp.abs(g - exact))) for g in grads]
    print(
        f"\n[relaxation bias] max |grad relaxed - grad discrete| "
        f"at t={temperatures}: {errors}"
    )
    assert all(a > b for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    assert errors[-1] < 0.05 * float(jnp.max(jnp.abs(exact)))


def test_relaxed_proposals_are_accepted_by_pathwise_losses():
    logits = jnp.array([0.2, -0.3, 0.4])

    def p(x):
        with numpyro.plate("particles", K, dim=-2), numpyro.plate("data", D, dim=-1):
            y = numpyro.sample(
                "y", R.RelaxedOneHotCategorical(0.5, logits=jnp.zeros(3))
            )
            numpyro.sample(
                "x", dist.Normal(y @ jnp.array([-1.0, 0.0, 1.0]), SIGMA), obs=x
            )
        return ()

    def q(x):
        with numpyro.plate("particles", K, dim=-2), numpyro.plate("data", D, dim=-1):
            numpyro.sample("y", R.RelaxedOneHotCategorical(0.5, logits=logits))
        return ()

    for loss_fn in (L.elbo_loss, L.iwae_loss, E.renyi_loss(0.5)):
        _, trace, metrics = jax.eval_shape(
            lambda fn=loss_fn: coix.traced_evaluate(
                coix.propose(p, q, loss_fn=fn), seed=jax.random.key(0)
            )(X)
        )
        assert trace["y"].value.shape == (K, D, 3) and metrics.loss.shape == ()
    # The discrete Bernoulli is refused, and the error points to a relaxation.
    t = 0.5

    def q_discrete(x):
        with numpyro.plate("particles", K, dim=-2), numpyro.plate("data", D, dim=-1):
            numpyro.sample("y", dist.Bernoulli(logits=RB_PARAMS["phi"]))
        return ()

    with pytest.raises(ValueError, match="'y'.*relaxation"):
        trace_only(
            coix.propose(relaxed_target(RB_PARAMS, t), q_discrete, loss_fn=L.elbo_loss),
            X,
        )


def test_straight_through_is_hard_forward_soft_backward():
    y = jnp.array([0.2, 0.5, 0.3])
    np.testing.assert_array_equal(R.straight_through_one_hot(y), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(jax.jacobian(R.straight_through_one_hot)(y), np.eye(3))
    b = jnp.array([0.3, 0.7])
    np.testing.assert_array_equal(R.straight_through_bernoulli(b), [0.0, 1.0])
    np.testing.assert_allclose(
        jax.grad(lambda v: jnp.sum(R.straight_through_bernoulli(v)))(b), 1.0
    )


# ---------------------------------------------------------------------------
# Misuse: errors are raised at trace time, so tracing suffices.
# ---------------------------------------------------------------------------


def trace_only(program, *args):
    return jax.eval_shape(
        lambda: coix.traced_evaluate(program, seed=jax.random.key(0))(*args)
    )


def test_vimco_needs_two_particles():
    with pytest.raises(ValueError, match=r"vimco_loss.*at least 2 particles.*\(1, 2\)"):
        trace_only(discrete_program(PARAMS, E.vimco_loss, n=1), X)

    def p(x):
        z = numpyro.sample("z", dist.Bernoulli(0.3))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def q(x):
        numpyro.sample("z", dist.Bernoulli(0.6))

    with pytest.raises(ValueError, match=r"vimco_loss.*shape \(\)"):
        trace_only(E.vimco(p, q), 1.0)


def test_nvil_errors_name_the_loss_and_shapes():
    with pytest.raises(ValueError, match=r"nvil_loss.*shape \(3,\).*\(3, 2\)"):
        trace_only(discrete_program(PARAMS, E.nvil_loss(jnp.zeros(3))), X)
    with pytest.raises(ValueError, match="nvil_loss.*moments"):
        trace_only(discrete_program(PARAMS, E.nvil_loss(normalize=True)), X)
    with pytest.raises(TypeError, match="SignalMoments"):
        E.nvil_loss(moments=(0.0, 1.0))


@pytest.mark.parametrize(
    "loss_fn,name",
    [
        (E.renyi_loss(0.5), "renyi_loss"),
        (E.iwae_dreg_loss, "iwae_dreg_loss"),
        (E.rws_dreg_loss, "rws_dreg_loss"),
    ],
)
def test_pathwise_estimators_refuse_discrete_latents(loss_fn, name):
    program = coix.propose(target(PARAMS), proposal(PARAMS), loss_fn=loss_fn)
    with pytest.raises(ValueError, match=f"{name}.*'z'"):
        trace_only(program, X)


def test_renyi_rejects_bad_alpha():
    for alpha in (float("nan"), float("inf"), "half"):
        with pytest.raises(ValueError, match="renyi_loss"):
            E.renyi_loss(alpha)


def test_dreg_rejects_kernels():
    def kernel(z):
        with numpyro.plate("particles", K, dim=-2), numpyro.plate("data", D, dim=-1):
            numpyro.sample("z", dist.Normal(z, 0.5))
        return ()

    q = coix.compose(kernel, gauss_proposal(GPARAMS))
    p = coix.extend(gauss_target(GPARAMS), kernel)
    with pytest.raises(ValueError, match="iwae_dreg_loss.*single propose"):
        trace_only(E.dreg_iwae(p, q), XG)


def test_sleep_phi_errors():
    with pytest.raises(ValueError, match="sleep_phi.*PRNG key"):
        E.sleep_phi(target(PARAMS), proposal(PARAMS))(None)

    def greedy(x):
        proposal(PARAMS)(x)
        with numpyro.plate("particles", K, dim=-2), numpyro.plate("data", D, dim=-1):
            numpyro.sample("extra", dist.Normal(0.0, 1.0))
        return ()

    with pytest.raises(ValueError, match="sleep_phi.*'extra'"):
        jax.eval_shape(
            lambda: (
                E.sleep_phi(target(PARAMS), greedy, seed=jax.random.key(0))(None).loss
            )
        )


def test_relaxed_distribution_errors():
    with pytest.raises(ValueError, match="exactly one"):
        R.RelaxedOneHotCategorical(0.5, logits=jnp.zeros(3), probs=jnp.ones(3) / 3)
    with pytest.raises(ValueError, match="at least 2 categories"):
        R.RelaxedOneHotCategorical(0.5, logits=jnp.zeros(1))


if __name__ == "__main__":
    # The variance table: every check, slow ones included, with its prints.
    raise SystemExit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"]))
