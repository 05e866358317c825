"""Combinator semantics: compose, propose, extend, resample, loops, memoize,
and the Coix-shaped surface.

Module-level tests live with their modules: test_trace.py, test_evaluate.py,
test_transforms.py, test_weights.py, test_keys.py. Exact value tests run both
eagerly and under ``jax.jit`` (the ``mode`` fixture).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import combinators as coix
from combinators import loss

N = 16


def target():
    with numpyro.plate("particles", N):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
    return (z,)


def proposal():
    with numpyro.plate("particles", N):
        z = numpyro.sample("z", dist.Normal(0.2, 1.1))
    return (z,)


def kernel(z):
    with numpyro.plate("particles", N):
        return (numpyro.sample("z", dist.Normal(0.9 * z, 0.4)),)


def reverse(z):
    with numpyro.plate("particles", N):
        numpyro.sample("z", dist.Normal(z, 0.5))
    return ()


@pytest.fixture(params=["eager", "jit"])
def mode(request):
    return request.param


def in_mode(fn, mode):
    """``fn`` itself (eager) or ``jax.jit(fn)``."""
    if mode not in ("eager", "jit"):
        raise ValueError(mode)
    return jax.jit(fn) if mode == "jit" else fn


def run(program, *args, seed=0, mode="eager"):
    """``traced_evaluate(program, seed=key(seed))(*args)``, eager or jitted."""

    def evaluate(key):
        return coix.traced_evaluate(program, seed=key)(*args)

    return in_mode(evaluate, mode)(jax.random.key(seed))


def test_names_carry_no_meaning(mode):
    """A site may be called anything, including Coix's old suffix."""

    def odd_target():
        with numpyro.plate("particles", N):
            z = numpyro.sample("z_PREV_", dist.Normal(0.0, 1.0))
            numpyro.sample("y_PREV_", dist.Normal(z, 0.5), obs=1.0)
        return (z,)

    def odd_proposal():
        with numpyro.plate("particles", N):
            return (numpyro.sample("z_PREV_", dist.Normal(0.0, 1.0)),)

    _, trace, metrics = run(
        coix.propose(odd_target, odd_proposal, loss_fn=loss.rws_loss), mode=mode
    )
    z = trace["z_PREV_"].value
    expected = dist.Normal(z, 0.5).log_prob(1.0)  # prior and proposal cancel
    np.testing.assert_allclose(metrics.log_weight, expected, rtol=1e-5)


def test_compose_keeps_superseded_values_as_generations(mode):
    program = coix.compose(kernel, coix.resample(coix.propose(target, proposal)))
    _, trace, _ = run(program, mode=mode)
    newest, older = trace.history("z")
    assert [name for name, *_ in trace.generations()].count("z") == 2
    # The kernel's new value is drawn around the resampled old one.
    assert newest.log_prob.shape == older.log_prob.shape == (N,)
    np.testing.assert_allclose(
        newest.log_prob,
        dist.Normal(0.9 * older.value, 0.4).log_prob(newest.value),
        rtol=1e-5,
    )


def test_extend_marks_kernel_sites_auxiliary_and_propose_drops_them(mode):
    _, trace, _ = run(coix.extend(target, reverse), mode=mode)
    current, auxiliary = trace.history("z")
    assert not current.auxiliary and auxiliary.auxiliary
    program = coix.propose(
        coix.extend(target, reverse),
        coix.compose(kernel, coix.propose(target, proposal)),
    )
    _, out_trace, _ = run(program, mode=mode)
    assert len(out_trace.history("z")) == 1 and not out_trace["z"].auxiliary


def test_extend_weight_uses_reverse_kernel_on_previous_value(mode):
    """w = w_in + log p(z') + log r(z | z') - log p(z) - log k(z' | z)."""
    seen = []

    def recording_loss(q_trace, p_trace, incoming, incremental):
        seen.append((q_trace, p_trace, incoming, incremental))
        return 0.0

    q = coix.compose(kernel, coix.propose(target, proposal))
    program = coix.propose(coix.extend(target, reverse), q, loss_fn=recording_loss)

    def evaluate(key):
        seen.clear()
        _, trace, metrics = coix.traced_evaluate(program, seed=key)()
        return trace, metrics, seen[0]  # returned, so jit hands back arrays

    trace, metrics, recorded = in_mode(evaluate, mode)(jax.random.key(3))
    q_trace, p_trace, incoming, incremental = recorded
    new, old = q_trace.history("z")
    np.testing.assert_allclose(trace["z"].value, new.value)
    np.testing.assert_allclose(p_trace.history("z")[1].value, old.value)

    def log_p(z):
        return dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 0.5).log_prob(1.0)

    old_weight = log_p(old.value) - dist.Normal(0.2, 1.1).log_prob(old.value)
    expected_incremental = (
        log_p(new.value)
        + dist.Normal(new.value, 0.5).log_prob(old.value)
        - log_p(old.value)
        - dist.Normal(0.9 * old.value, 0.4).log_prob(new.value)
    )
    np.testing.assert_allclose(incoming, old_weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(incremental, expected_incremental, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        metrics.log_weight, old_weight + expected_incremental, rtol=1e-4, atol=1e-4
    )


def test_shared_latent_outside_data_plate_is_weighted_once(mode):
    # mu is drawn once per particle, outside the data plate; x is observed
    # in it. The weight log p(mu) + sum_n log p(x_n | mu) - log q(mu) is one
    # number per particle: the data plate cannot be a column axis.
    num_points = 7
    x = jnp.linspace(-1.0, 1.0, num_points)

    def shared_target():
        with numpyro.plate("particles", N, dim=-2):
            mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
            with numpyro.plate("points", num_points, dim=-1):
                numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)
        return (mu,)

    def shared_proposal():
        with numpyro.plate("particles", N, dim=-2):
            return (numpyro.sample("mu", dist.Normal(0.3, 1.2)),)

    _, trace, metrics = run(coix.propose(shared_target, shared_proposal), mode=mode)
    mu = trace["mu"].value[:, 0]
    by_hand = (
        dist.Normal(0.0, 1.0).log_prob(mu)
        + jnp.sum(dist.Normal(mu[:, None], 1.0).log_prob(x), axis=-1)
        - dist.Normal(0.3, 1.2).log_prob(mu)
    )
    assert metrics.log_weight.size == N
    np.testing.assert_allclose(jnp.ravel(metrics.log_weight), by_hand, rtol=1e-5)
    np.testing.assert_allclose(
        metrics.log_Z, jax.scipy.special.logsumexp(by_hand) - jnp.log(N), rtol=1e-5
    )


def test_fori_loop_equals_unrolled_loop():
    def body(i, q):
        return coix.propose(
            coix.extend(target, reverse),
            coix.compose(kernel, coix.resample(q)),
            loss_fn=loss.rkl_loss,
        )

    looped = coix.fori_loop(0, 3, body, coix.propose(target, proposal))
    _, trace, metrics = jax.jit(lambda k: coix.traced_evaluate(looped, seed=k)())(
        jax.random.key(5)
    )
    assert metrics.log_weight.shape == (N,)
    assert jnp.isfinite(metrics.loss) and jnp.isfinite(metrics.log_Z)
    # Compiles once: the jaxpr contains a single loop, whatever the bound.
    jaxpr_3 = jax.make_jaxpr(lambda k: coix.traced_evaluate(looped, seed=k)())(
        jax.random.key(0)
    )
    looped_9 = coix.fori_loop(0, 9, body, coix.propose(target, proposal))
    jaxpr_9 = jax.make_jaxpr(lambda k: coix.traced_evaluate(looped_9, seed=k)())(
        jax.random.key(0)
    )
    assert len(str(jaxpr_3)) == len(str(jaxpr_9))
    assert "while" in str(jaxpr_3) or "scan" in str(jaxpr_3)


def test_fori_loop_matches_unrolled_loop_in_key_argument_mode():
    def keyed_target(key):
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0), rng_key=key)
            numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
        return (z,)

    def keyed_proposal(key):
        with numpyro.plate("particles", N):
            return (numpyro.sample("z", dist.Normal(0.0, 2.0), rng_key=key),)

    def step(i, q):
        return coix.propose(keyed_target, q)

    looped = coix.fori_loop(0, 1, step, coix.propose(keyed_target, keyed_proposal))
    _, _, metrics = coix.traced_evaluate(looped)(jax.random.key(2))
    assert metrics.log_weight.shape == (N,)


def test_memoize_keeps_best_distinct_samples(mode):
    def discrete_target():
        # The target scores the memory and the fresh samples together: 2 + 40.
        with numpyro.plate("particles", 42):
            k = numpyro.sample("k", dist.Categorical(probs=jnp.array([0.1, 0.2, 0.7])))
        return (k,)

    def discrete_proposal():
        with numpyro.plate("particles", 40):
            return (numpyro.sample("k", dist.Categorical(probs=jnp.ones(3) / 3)),)

    memory = {"k": jnp.array([0, 0])}
    program = coix.memoize(discrete_target, discrete_proposal, memory=memory)
    _, trace, metrics = run(program, mode=mode)
    kept = metrics["memory"]["k"]
    assert kept.shape == (2,) and kept[0] != kept[1]  # distinct
    assert jnp.all(metrics.log_weight[:-1] >= metrics.log_weight[1:])  # best first
    assert int(kept[0]) == 2  # the mode; P(never proposed) = (2/3)**40


def coix_style_vae_script(coix_module, num_steps):
    """A training script in the style of Coix's VAE tutorial."""
    from flax import linen as nn

    key = jax.random.PRNGKey(0)
    data = jax.random.normal(key, (512, 2)) * jnp.array([1.0, 0.3]) + 1.0

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.relu(nn.Dense(16)(x)))

    net = MLP()

    def prior(params, x):
        z = numpyro.sample("z", dist.Normal(0, 1).expand((2,)).to_event(1))
        return (params, z, x)

    def decoder(params, z, x=None):
        mean = net.apply(params[1], z)
        x = numpyro.sample("x", dist.Normal(mean, 1.0).to_event(1), obs=x)
        return (mean, x)

    def encoder(params, x):
        z = numpyro.sample("z", dist.Normal(net.apply(params[0], x), 0.1).to_event(1))
        return (z,)

    coix_module.set_backend("coix.numpyro")

    def plate(program):
        return numpyro.plate("particle", 128, dim=-1)(program)

    target = plate(coix_module.compose(decoder, prior, suffix=False))
    program = coix_module.propose(
        target, plate(encoder), loss_fn=coix_module.loss.elbo_loss
    )

    def loss_fn(params, key, batch):
        _, _, metrics = coix_module.traced_evaluate(program, seed=key)(params, x=batch)
        return metrics["loss"], metrics

    params = (
        net.init(key, jnp.zeros(2)),
        net.init(jax.random.PRNGKey(1), jnp.zeros(2)),
    )
    batches = iter(data.reshape(4, 128, 2)[i % 4] for i in range(num_steps))
    losses = []

    def eval_fn(step, params, opt_state, metrics):
        if metrics is not None:
            losses.append(float(metrics["loss"]))

    coix_module.util.train(
        loss_fn,
        params,
        optax.adam(1e-2),
        num_steps,
        batches,
        eval_fn=eval_fn,
        log_every=1,
    )
    return losses


def test_coix_script_runs_unchanged_and_learns(capsys):
    losses = coix_style_vae_script(coix, num_steps=60)
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5


def test_train_skips_non_finite_steps_and_keeps_params():
    def loss_fn(params, key, batch):
        value = jnp.sum((params["w"] - batch) ** 2)
        return value, {"loss": value}

    batches = iter([jnp.ones(2), jnp.full(2, jnp.nan), jnp.ones(2)])
    init = {"w": jnp.zeros(2)}
    result = coix.util.train(
        loss_fn, init, optax.sgd(0.1), 3, batches, progress=False, return_result=True
    )
    assert result.skipped == 1
    assert jnp.all(jnp.isfinite(result.params["w"]))
    assert jnp.array_equal(init["w"], jnp.zeros(2))  # caller's params untouched
    np.testing.assert_allclose(result.params["w"], 1 - 0.8**2, rtol=1e-5)


def test_detached_propose_returns_values_without_gradient_but_weights_with_it(mode):
    # propose(p, q, detach=True) hands on particles that carry no gradient to
    # q's parameters (Coix semantics), while its log weight still does.
    def scaled_proposal(scale):
        def program():
            with numpyro.plate("particles", N):
                return (numpyro.sample("z", dist.Normal(0.0, scale)),)

        return program

    def outputs_and_weights(scale, detach):
        program = coix.propose(
            target, scaled_proposal(scale), loss_fn=loss.elbo_loss, detach=detach
        )
        out, trace, metrics = coix.traced_evaluate(program, seed=jax.random.key(3))()
        return jnp.sum(out[0]), jnp.sum(trace["z"].value), jnp.sum(metrics.log_weight)

    for detach in (False, True):
        jacobian = jax.jacfwd(functools.partial(outputs_and_weights, detach=detach))
        d_out, d_value, d_weight = in_mode(jacobian, mode)(1.5)
        if detach:
            assert float(d_out) == 0.0 and float(d_value) == 0.0
        else:
            assert abs(float(d_out)) > 0.0 and abs(float(d_value)) > 0.0
        assert abs(float(d_weight)) > 0.0
