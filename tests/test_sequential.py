"""Sequential building blocks: weighted composition, adaptive resampling, scan.

Model used throughout: a Gaussian random walk observed in noise,

    x_0 ~ N(0, 1),  x_t | x_{t-1} ~ N(A x_{t-1}, 1),  y_t | x_t ~ N(x_t, R^2),

whose exact log p(y_{0:T-1}) comes from a Kalman filter written in numpy.
An SMC step is ``compose(propose(p_t, k_t), resample(q))``: ``p_t`` scores
only what step t adds, so the weights multiply (nested importance sampling).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix

A, R = 0.8, 0.7
YS = jnp.array([0.3, -0.5, 1.2, 0.8, -0.2, 0.1, 1.5, 0.4])


def kalman_log_likelihood(ys):
    mean, var, total = 0.0, 1.0, 0.0
    for t, y in enumerate(np.asarray(ys, dtype=np.float64)):
        if t:
            mean, var = A * mean, A * A * var + 1.0
        s = var + R * R
        total += -0.5 * (np.log(2 * np.pi * s) + (y - mean) ** 2 / s)
        gain = var / s
        mean, var = mean + gain * (y - mean), (1 - gain) * var
    return total


def first_target(n):
    def p():
        with numpyro.plate("particles", n):
            x = numpyro.sample("x", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(x, R), obs=YS[0])
        return (x,)

    return p


def first_proposal(n):
    def k():
        with numpyro.plate("particles", n):
            return (numpyro.sample("x", dist.Normal(0.0, 1.0)),)

    return k


def step_target(t, n):
    def p(x_prev):
        with numpyro.plate("particles", n):
            x = numpyro.sample("x", dist.Normal(A * x_prev, 1.0))
            numpyro.sample("y", dist.Normal(x, R), obs=YS[t])
        return (x,)

    return p


def step_proposal(t, n):
    def k(x_prev):
        with numpyro.plate("particles", n):
            return (numpyro.sample("x", dist.Normal(A * x_prev, 1.0)),)

    return k


def smc_program(n, num_steps, ess_threshold=None, unroll=False, record=None):
    def step(t, q):
        increment = coix.propose(step_target(t, n), step_proposal(t, n))
        return coix.compose(increment, coix.resample(q, ess_threshold=ess_threshold))

    first = coix.propose(first_target(n), first_proposal(n))
    return coix.scan(1, num_steps, step, first, record=record, unroll=unroll)


@pytest.fixture(params=["eager", "jit"])
def mode(request):
    return request.param


def run(program, *args, seed=0, mode="eager"):
    """``traced_evaluate(program, seed=key(seed))(*args)``, eager or jitted."""

    def evaluate(key):
        return coix.traced_evaluate(program, seed=key)(*args)

    if mode == "jit":
        evaluate = jax.jit(evaluate)
    return evaluate(jax.random.key(seed))


def log_z_hats(program, num_runs, seed=0):
    def one(key):
        return coix.traced_evaluate(program, seed=key)()[2].log_Z

    keys = jax.random.split(jax.random.key(seed), num_runs)
    return np.asarray(jax.jit(jax.vmap(one))(keys), dtype=np.float64)


def assert_unbiased(log_z_hat, log_z, num_se=4.5):
    ratio = np.exp(log_z_hat - log_z)
    se = ratio.std(ddof=1) / np.sqrt(len(ratio))
    assert abs(ratio.mean() - 1.0) < num_se * se, (ratio.mean(), se)


# ---------------------------------------------------------------------------
# Weighted programs compose by multiplying their weights.
# ---------------------------------------------------------------------------


def test_composed_weighted_programs_add_log_weights_exactly(mode):
    # Exact posterior proposals: each propose's weight is its own Z for every
    # particle, so the composition's weight must be log Z1 + log Z2.
    n = 5

    def target(name, obs):
        def p(*_):
            with numpyro.plate("particles", n):
                z = numpyro.sample(name, dist.Normal(0.0, 1.0))
                numpyro.sample(name + "_y", dist.Normal(z, 1.0), obs=obs)
            return (z,)

        return p

    def posterior(name, obs):
        def q(*_):
            with numpyro.plate("particles", n):
                return (numpyro.sample(name, dist.Normal(obs / 2, np.sqrt(0.5))),)

        return q

    def log_z(obs):
        return float(dist.Normal(0.0, np.sqrt(2.0)).log_prob(obs))

    program = coix.compose(
        coix.propose(target("b", -1.0), posterior("b", -1.0)),
        coix.propose(target("a", 2.0), posterior("a", 2.0)),
    )
    _, trace, metrics = run(program, seed=3, mode=mode)
    np.testing.assert_allclose(
        metrics["log_weight"], np.full(n, log_z(2.0) + log_z(-1.0)), rtol=1e-5
    )
    assert set(trace) == {"a", "a_y", "b", "b_y"}


def test_smc_step_form_gives_unbiased_z_against_kalman():
    program = smc_program(n=16, num_steps=len(YS))
    assert_unbiased(log_z_hats(program, 3000), kalman_log_likelihood(YS))


def test_smc_log_z_is_consistent_for_many_particles():
    program = smc_program(n=20_000, num_steps=len(YS))
    log_z_hat = log_z_hats(program, 8)
    # log Z-hat has standard deviation O(1/sqrt(N)); 20k particles give ~0.01.
    assert abs(log_z_hat.mean() - kalman_log_likelihood(YS)) < 0.03


def test_per_step_target_inside_propose_raises_with_the_step_form_hint():
    n = 4
    first = coix.propose(first_target(n), first_proposal(n))
    # Coix's form: the target receives the proposal's outputs (chain=True)
    # and scores only x_1 and y_1; x_0 in the proposal is left unscored.
    wrong = coix.propose(
        step_target(1, n),
        coix.compose(step_proposal(1, n), coix.resample(first)),
        chain=True,
    )
    with pytest.raises(
        ValueError, match=r"compose\(propose\(p_t, k_t\), resample\(q\)\)"
    ):
        coix.traced_evaluate(wrong, seed=jax.random.key(0))()


# ---------------------------------------------------------------------------
# Adaptive resampling.
# ---------------------------------------------------------------------------


def test_adaptive_resampling_keeps_z_unbiased_and_resamples_sometimes():
    program = smc_program(n=16, num_steps=len(YS), ess_threshold=0.5)
    assert_unbiased(log_z_hats(program, 3000), kalman_log_likelihood(YS))
    history = coix.traced_evaluate(program, seed=jax.random.key(1))()[2]["history"]
    resampled = np.asarray(history.resampled)
    assert not resampled[0]  # the initial program has nothing to resample
    assert 0 < resampled[1:].sum() < len(YS) - 1, resampled


def test_adaptive_resampling_that_never_triggers_is_sequential_importance_sampling(
    mode,
):
    # With a threshold no ESS can fall below, particles and weights are
    # carried forward: log Z-hat is log mean exp of the summed increments.
    n, steps = 16, len(YS)

    def record(out, trace, metrics):
        return {"x": trace["x"].value, "log_weight": metrics.log_weight}

    program = smc_program(n, steps, ess_threshold=1e-9, record=record)
    _, trace, metrics = run(program, seed=2, mode=mode)
    history = metrics["history"]
    assert not np.any(history.resampled)
    xs = np.asarray(history.records["x"], dtype=np.float64)  # (steps, n)
    log_weight = np.asarray(dist.Normal(xs, R).log_prob(np.asarray(YS)[:, None])).sum(0)
    expected = np.logaddexp.reduce(log_weight) - np.log(n)
    np.testing.assert_allclose(metrics["log_Z"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["log_weight"], log_weight, rtol=1e-5)


def test_adaptive_resampling_decides_per_column(mode):
    # Column 0: one particle holds all the weight (ESS 1); column 1: uniform.
    n = 6
    log_weight = jnp.stack([jnp.array([0.0] + [-60.0] * (n - 1)), jnp.zeros(n)], axis=1)
    values = jnp.arange(2 * n, dtype=jnp.float32).reshape(n, 2)

    def weighted():
        with numpyro.plate("batch", 2, dim=-1):
            with numpyro.plate("particles", n, dim=-2):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        return (z,)

    trace = coix.traced_evaluate(
        weighted, latents={"z": values}, seed=jax.random.key(0)
    )()[1]
    metrics = coix.Metrics(log_weight, None, None, jnp.zeros(()), jnp.zeros(()))
    program = coix.resample(
        coix.empirical((values,), trace, metrics), ess_threshold=0.5
    )
    out, new_trace, new_metrics = run(program, seed=1, mode=mode)
    z = np.asarray(new_trace["z"].value)
    np.testing.assert_array_equal(z[:, 0], np.full(n, values[0, 0]))
    np.testing.assert_array_equal(z[:, 1], values[:, 1])
    np.testing.assert_array_equal(np.asarray(out[0]), z)
    lw = np.asarray(new_metrics["log_weight"])
    np.testing.assert_allclose(lw[:, 0], np.full(n, 0.0 - np.log(n)), atol=1e-5)
    np.testing.assert_array_equal(lw[:, 1], np.zeros(n))
    assert bool(new_metrics["resampled"])


def test_resampling_keeps_shared_observed_values_unbroadcast(mode):
    n = 5
    program = coix.resample(coix.propose(first_target(n), first_proposal(n)))
    _, trace, _ = run(program, mode=mode)
    assert trace["y"].value.shape == ()
    assert trace["y"].log_prob.shape == (n,)
    assert trace["x"].value.shape == (n,)


@pytest.mark.parametrize("bad", [0.0, 1.5, -1.0, "half"])
def test_ess_threshold_must_be_a_fraction(bad):
    with pytest.raises(ValueError, match="resample: ess_threshold"):
        coix.resample(first_target(2), ess_threshold=bad)


def test_adaptive_resampling_keeps_the_particle_count():
    with pytest.raises(ValueError, match="num_samples must be None"):
        coix.resample(first_target(2), 3, ess_threshold=0.5)


# ---------------------------------------------------------------------------
# scan: per-step history, compiled once.
# ---------------------------------------------------------------------------


def test_scan_history_is_stacked_per_step_and_increments_sum_to_log_z(mode):
    n, steps = 16, len(YS)

    def filtering_mean(out, trace, metrics):
        return jnp.sum(jax.nn.softmax(metrics.log_weight) * trace["x"].value)

    program = smc_program(n, steps, record=filtering_mean)
    _, _, metrics = run(program, seed=4, mode=mode)
    history = metrics["history"]
    for field in (
        history.ess,
        history.log_Z,
        history.log_Z_increment,
        history.resampled,
    ):
        assert np.shape(field) == (steps,)
    assert np.shape(history.records) == (steps,)
    assert np.all(np.asarray(history.resampled[1:]))  # resample at every step
    np.testing.assert_allclose(
        np.sum(history.log_Z_increment), metrics["log_Z"], rtol=1e-5
    )
    np.testing.assert_allclose(history.log_Z[-1], metrics["log_Z"], rtol=1e-6)
    assert np.all(
        (np.asarray(history.ess) >= 1) & (np.asarray(history.ess) <= n + 1e-3)
    )


def test_scan_traces_the_step_a_fixed_number_of_times():
    calls = []

    def counted(n, num_steps):
        def step(t, q):
            calls.append(t)
            increment = coix.propose(step_target(t, n), step_proposal(t, n))
            return coix.compose(increment, coix.resample(q))

        first = coix.propose(first_target(n), first_proposal(n))
        return coix.scan(1, num_steps, step, first)

    for steps in (3, len(YS)):
        calls.clear()
        coix.traced_evaluate(counted(4, steps), seed=jax.random.key(0))()
        assert len(calls) == 1  # one lax.scan trace, checked as it is traced


def test_unrolled_scan_equals_compiled_scan(mode):
    compiled = smc_program(16, 4)
    unrolled = smc_program(16, 4, unroll=True)
    a = run(compiled, seed=5, mode=mode)[2]
    b = run(unrolled, seed=5, mode=mode)[2]
    np.testing.assert_allclose(a["log_Z"], b["log_Z"], rtol=1e-5)
    np.testing.assert_allclose(a["history"].ess, b["history"].ess, rtol=1e-4)


def test_scan_body_that_changes_the_sites_raises_with_both_structures():
    n = 4

    def step(t, q):
        def grows(x_prev):
            with numpyro.plate("particles", n):
                x = numpyro.sample("x", dist.Normal(x_prev, 1.0))
                numpyro.sample("extra", dist.Normal(x, 1.0), obs=0.0)
            return (x,)

        return coix.compose(coix.propose(grows, step_proposal(t, n)), coix.resample(q))

    program = coix.scan(1, 3, step, coix.propose(first_target(n), first_proposal(n)))
    with pytest.raises(
        ValueError, match="(?s)scan: the body's program changes.*initial:.*body:"
    ):
        coix.traced_evaluate(program, seed=jax.random.key(0))()


def test_newest_keeps_one_generation_and_the_metrics(mode):
    n = 3

    def kernel(x):
        with numpyro.plate("particles", n):
            return (numpyro.sample("x", dist.Delta(x + 1.0)),)

    weighted = coix.propose(first_target(n), first_proposal(n))
    program = coix.compose(kernel, weighted)
    out, full, m_full = run(program, mode=mode)
    replay = coix.empirical(out, full, m_full)
    _, kept, m_kept = run(coix.newest(replay), mode=mode)
    assert len(full.history("x")) == 2 and len(kept.history("x")) == 1
    np.testing.assert_array_equal(kept["x"].value, full["x"].value)
    np.testing.assert_array_equal(m_kept["log_weight"], m_full["log_weight"])
