"""Kleisli composition: ``q1 >> q2``, stack (independent copies), repeat (tied)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix
from combinators.kleisli import Kernel, ParamKernel, repeat, stack

N = 16
X = 0.7  # the observation of the little VAE below


def run(program, *args, seed=0):
    return coix.traced_evaluate(program, seed=jax.random.key(seed))(*args)


def assert_same(result_a, result_b):
    """Same outputs, trace (names, generations, values, roles) and metrics.

    Depths are compared as a replay records them (``Trace.rebased``):
    ``compose(q2, q1)`` with ``suffix=True`` records ``q1``'s sites one level
    deeper than ``>>`` does, which is the difference between the two.
    """
    (out_a, trace_a, metrics_a), (out_b, trace_b, metrics_b) = result_a, result_b
    trace_a, trace_b = trace_a.rebased(), trace_b.rebased()
    structure = jax.tree_util.tree_structure
    assert structure(trace_a) == structure(trace_b)
    for a, b in zip(
        jax.tree_util.tree_leaves((out_a, trace_a, metrics_a)),
        jax.tree_util.tree_leaves((out_b, trace_b, metrics_b)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


# A VAE with one latent per particle: prior >> decoder is p(z, x), encoder q(z | x).


def prior(x):
    with numpyro.plate("particles", N):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    return z, x


def decoder(z, x):
    with numpyro.plate("particles", N):
        x = numpyro.sample("x", dist.Normal(z, 0.5), obs=x)
    return (x,)


def encoder(x):
    with numpyro.plate("particles", N):
        z = numpyro.sample("z", dist.Normal(0.8 * x, 0.45))
    return z, x


def test_right_shift_is_compose_run_left_to_right():
    got = run(Kernel(prior) >> decoder, X)
    assert_same(got, run(coix.compose(decoder, prior), X))
    assert_same(got, run(coix.compose(decoder, prior, suffix=False), X))
    # A plain callable on the left of a Kernel (__rrshift__).
    assert_same(run(prior >> Kernel(decoder), X), got)
    _, trace, _ = got
    assert set(trace) == {"z", "x"} and trace["x"].observed


def test_generative_path_is_a_target_for_the_encoder():
    """propose(prior >> decoder, encoder): log w = log p(z) p(x | z) - log q(z | x)."""
    elbo = coix.loss.elbo_loss
    program = coix.propose(Kernel(prior) >> decoder, encoder, loss_fn=elbo)
    result = run(program, X)
    _, trace, metrics = result
    z = trace["z"].value
    log_weight = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 0.5).log_prob(X)
        - dist.Normal(0.8 * X, 0.45).log_prob(z)
    )
    np.testing.assert_allclose(metrics["log_weight"], log_weight, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], -jnp.mean(log_weight), rtol=1e-5)
    explicit = coix.propose(
        coix.compose(decoder, prior, suffix=False), encoder, loss_fn=elbo
    )
    assert_same(result, run(explicit, X))
    # Why >> does not suffix: compose's default makes the prior's z an older
    # generation, which the encoder's z cannot reach.
    with pytest.raises(ValueError, match="does not score"):
        run(coix.propose(coix.compose(decoder, prior), encoder), X)


# Two weighted stages and a kernel: a little SMC-like chain.


def q0():
    with numpyro.plate("particles", N):
        return (numpyro.sample("z", dist.Normal(0.2, 1.1)),)


def p0():
    with numpyro.plate("particles", N):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
    return (z,)


def k1(z):
    with numpyro.plate("particles", N):
        return (numpyro.sample("w", dist.Normal(z, 0.7)),)


def p1(z):
    with numpyro.plate("particles", N):
        w = numpyro.sample("w", dist.Normal(0.5 * z, 1.0))
        numpyro.sample("v", dist.Normal(w, 1.0), obs=-0.3)
    return (w,)


def k2(w):
    with numpyro.plate("particles", N):
        return (numpyro.sample("u", dist.Normal(w, 0.3)),)


STEP_1 = coix.propose(p0, q0)
STEP_2 = coix.propose(p1, k1)


def test_weights_of_two_weighted_stages_multiply():
    result = run(Kernel(STEP_1) >> STEP_2)
    assert_same(result, run(coix.compose(STEP_2, STEP_1)))
    _, trace, metrics = result
    z, w = trace["z"].value, trace["w"].value
    log_w1 = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 0.5).log_prob(1.0)
        - dist.Normal(0.2, 1.1).log_prob(z)
    )
    log_w2 = (
        dist.Normal(0.5 * z, 1.0).log_prob(w)
        + dist.Normal(w, 1.0).log_prob(-0.3)
        - dist.Normal(z, 0.7).log_prob(w)
    )
    np.testing.assert_allclose(
        metrics["log_weight"], log_w1 + log_w2, rtol=1e-5, atol=1e-5
    )


def test_associativity():
    left = (Kernel(STEP_1) >> STEP_2) >> k2
    right = Kernel(STEP_1) >> (Kernel(STEP_2) >> k2)
    assert left == right and hash(left) == hash(right)
    assert left.stages == (STEP_1, STEP_2, k2)
    compose = functools.partial(coix.compose, suffix=False)
    nested_left = compose(k2, compose(STEP_2, STEP_1))
    nested_right = compose(compose(k2, STEP_2), STEP_1)
    expected = run(nested_left)
    assert_same(run(left), expected)
    assert_same(run(right), expected)
    assert_same(run(nested_right), expected)


def test_same_under_jit():
    chain = Kernel(STEP_1) >> STEP_2 >> k2

    def evaluate(key):
        return coix.traced_evaluate(chain, seed=key)()

    key = jax.random.key(3)
    eager, jitted = evaluate(key), jax.jit(evaluate)(key)
    for a, b in zip(
        jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_name_used_twice_in_a_chain_raises():
    with pytest.raises(ValueError, match="duplicate site name 'z'"):
        run(Kernel(prior) >> (lambda z, x: encoder(x)), X)


def test_repr_names_the_stages():
    assert repr(Kernel(prior) >> decoder) == "Kernel(prior >> decoder)"


# Layers: a linear-Gaussian kernel family h' ~ N(a h + b, S^2), per particle.

S = 0.5
DIM = 3


def gaussian_layer(params, h):
    with numpyro.plate("particles", h.shape[0]):
        mean = h @ params["a"] + params["b"]
        h = numpyro.sample("h", dist.Normal(mean, S).to_event(1))
    return (h,)


def init_layer(key):
    key_a, key_b = jax.random.split(key)
    return {
        "a": 0.6 * jax.random.normal(key_a, (DIM, DIM)) / jnp.sqrt(DIM),
        "b": jax.random.normal(key_b, (DIM,)),
    }


LAYER = ParamKernel(
    init_layer, lambda params: Kernel(functools.partial(gaussian_layer, params))
)


def num_params(params):
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


def test_stack_has_n_parameter_sets_and_repeat_one():
    key = jax.random.key(0)
    one = num_params(LAYER.init(key))
    stacked = stack(LAYER, 4).init(key)
    assert num_params(stacked) == 4 * one == 48
    assert stacked["a"].shape == (4, DIM, DIM) and stacked["b"].shape == (4, DIM)
    # Initialised independently: no two copies share parameters.
    b = np.asarray(stacked["b"])
    assert len({tuple(row) for row in b}) == 4
    assert num_params(repeat(LAYER, 4).init(key)) == one


def test_copies_are_named_and_keep_the_particle_plate():
    params = stack(LAYER, 3, name="block").init(jax.random.key(1))
    _, trace, _ = run(stack(LAYER, 3, name="block").bind(params), jnp.zeros((N, DIM)))
    assert list(trace) == ["block0/h", "block1/h", "block2/h"]
    for name in trace:
        assert trace.history(name) == (trace[name],)  # one generation each
        assert trace[name].plates == (coix.Plate("particles", N, -1),)


def test_repeat_two_equals_the_composition_by_hand():
    params = LAYER.init(jax.random.key(2))
    k = LAYER.bind(params)
    by_hand = coix.compose(
        numpyro.handlers.scope(k, prefix="layer1", hide_types=["plate"]),
        numpyro.handlers.scope(k, prefix="layer0", hide_types=["plate"]),
        suffix=False,
    )
    h0 = jnp.ones((N, DIM))
    assert_same(run(repeat(LAYER, 2).bind(params), h0), run(by_hand, h0))


def test_stack_two_equals_the_composition_by_hand():
    params = stack(LAYER, 2).init(jax.random.key(2))
    first = LAYER.bind(jax.tree_util.tree_map(lambda x: x[0], params))
    second = LAYER.bind(jax.tree_util.tree_map(lambda x: x[1], params))
    scope = functools.partial(numpyro.handlers.scope, hide_types=["plate"])
    by_hand = Kernel(scope(first, prefix="layer0")) >> scope(second, prefix="layer1")
    h0 = jnp.ones((N, DIM))
    result = run(stack(LAYER, 2).bind(params), h0)
    assert_same(result, run(by_hand, h0))
    # The log densities are the layers' Gaussian densities, copy by copy.
    _, trace, _ = result
    h = [h0, trace["layer0/h"].value, trace["layer1/h"].value]
    for i in range(2):
        mean = h[i] @ params["a"][i] + params["b"][i]
        expected = dist.Normal(mean, S).to_event(1).log_prob(h[i + 1])
        np.testing.assert_allclose(trace[f"layer{i}/h"].log_prob, expected, rtol=1e-5)


@pytest.mark.parametrize("combinator", [stack, repeat])
def test_final_layer_matches_the_closed_form_marginal(combinator):
    """h_i = A_i h_{i-1} + b_i + noise: the last layer's moments within MC error."""
    n, particles = 3, 4000
    family = combinator(LAYER, n)
    params = family.init(jax.random.key(4))
    layer_params = [
        jax.tree_util.tree_map(lambda x, i=i: x[i], params)
        if combinator is stack
        else params
        for i in range(n)
    ]
    mean, cov = np.zeros(DIM), np.zeros((DIM, DIM))
    for p in layer_params:
        a = np.asarray(p["a"], np.float64)
        mean, cov = mean @ a + np.asarray(p["b"]), a.T @ cov @ a + S**2 * np.eye(DIM)
    (h,), _, _ = run(family.bind(params), jnp.zeros((particles, DIM)), seed=5)
    h = np.asarray(h, np.float64)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(h.mean(0) - mean) < 5 * sd / np.sqrt(particles))
    var_se = np.diag(cov) * np.sqrt(2.0 / (particles - 1))
    assert np.all(np.abs(h.var(0, ddof=1) - np.diag(cov)) < 5 * var_se)


def test_layer_combinators_nest():
    """A repeat of a stack and a stack of a stack are ParamKernels again."""
    key, h0 = jax.random.key(11), jnp.zeros((N, DIM))
    one = num_params(LAYER.init(key))
    nested = stack(stack(LAYER, 2), 3, name="block")
    params = nested.init(key)
    assert params["a"].shape == (3, 2, DIM, DIM) and num_params(params) == 6 * one
    _, trace, _ = run(nested.bind(params), h0)
    assert list(trace) == [f"block{i}/layer{j}/h" for i in range(3) for j in range(2)]
    block = "(layer0/partial(gaussian_layer) >> layer1/partial(gaussian_layer))"
    assert repr(nested.bind(params)) == (
        f"Kernel(block0/{block} >> block1/{block} >> block2/{block})"
    )
    # Copy (1, 0) of the stack of stacks uses parameter slice [1, 0].
    h = trace["block0/layer1/h"].value
    mean = h @ params["a"][1, 0] + params["b"][1, 0]
    expected = dist.Normal(mean, S).to_event(1).log_prob(trace["block1/layer0/h"].value)
    np.testing.assert_allclose(trace["block1/layer0/h"].log_prob, expected, rtol=1e-5)

    tied_blocks = repeat(stack(LAYER, 2), 3, name="block")
    assert num_params(tied_blocks.init(key)) == 2 * one
    _, trace, _ = run(tied_blocks.bind(tied_blocks.init(key)), h0)
    assert len(trace) == 6 and "block2/layer1/h" in trace


def test_stacks_line_up_in_propose():
    """Target and proposal stacks name their copies alike, so propose matches them."""
    target_params = stack(LAYER, 2).init(jax.random.key(6))
    proposal_params = stack(LAYER, 2).init(jax.random.key(7))
    h0 = jnp.zeros((N, DIM))
    program = coix.propose(
        stack(LAYER, 2).bind(target_params), stack(LAYER, 2).bind(proposal_params)
    )
    _, trace, metrics = run(program, h0)
    h = [h0, trace["layer0/h"].value, trace["layer1/h"].value]
    log_weight = 0.0
    for i in range(2):
        for params, sign in ((target_params, 1.0), (proposal_params, -1.0)):
            mean = h[i] @ params["a"][i] + params["b"][i]
            log_weight += sign * dist.Normal(mean, S).to_event(1).log_prob(h[i + 1])
    np.testing.assert_allclose(metrics["log_weight"], log_weight, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_copy():
    family = stack(LAYER, 3)
    params = family.init(jax.random.key(8))
    h0 = jnp.ones((N, DIM))

    def mean_output(params, key):  # pathwise: h_i = mean_i + S * noise_i
        (h,), _, _ = coix.traced_evaluate(family.bind(params), seed=key)(h0)
        return jnp.sum(jnp.mean(h, axis=0))

    key = jax.random.key(9)
    grads = jax.grad(mean_output)(params, key)
    assert grads["a"].shape == (3, DIM, DIM)
    assert np.all(np.any(np.asarray(grads["b"]) != 0.0, axis=1))  # every copy
    jitted = jax.jit(jax.grad(mean_output))(params, key)
    np.testing.assert_allclose(jitted["a"], grads["a"], rtol=1e-4, atol=1e-5)


class Dense(nn.Module):
    @nn.compact
    def __call__(self, h):
        return nn.Dense(DIM)(h)


def dense_layer(network, h):
    with numpyro.plate("particles", h.shape[0]):
        return (numpyro.sample("h", dist.Normal(network(h), S).to_event(1)),)


def test_flax_module_family():
    family = ParamKernel.from_module(Dense(), dense_layer, jnp.zeros((1, DIM)))
    params = stack(family, 2).init(jax.random.key(10))
    assert params["params"]["Dense_0"]["kernel"].shape == (2, DIM, DIM)
    _, trace, _ = run(stack(family, 2).bind(params), jnp.ones((N, DIM)))
    assert list(trace) == ["layer0/h", "layer1/h"]


def test_errors_name_the_operator_and_the_operands():
    with pytest.raises(TypeError, match=r"`>>`.*right operand.*Kernel >> int"):
        Kernel(prior) >> 3
    with pytest.raises(TypeError, match=r"`>>`.*left operand.*str >> Kernel"):
        "prior" >> Kernel(decoder)
    with pytest.raises(TypeError, match=r"Kernel >> ParamKernel.*bind it first"):
        Kernel(prior) >> LAYER
    with pytest.raises(TypeError, match="Kernel: program 1 must be a callable, got"):
        Kernel(prior, 3)
    with pytest.raises(ValueError, match="at least one program"):
        Kernel()
    with pytest.raises(AttributeError, match="immutable"):
        Kernel(prior).stages = ()


def test_layer_errors():
    with pytest.raises(TypeError, match="stack: f must be a ParamKernel"):
        stack(gaussian_layer, 2)
    with pytest.raises(ValueError, match="repeat: n must be a positive int, got 0"):
        repeat(LAYER, 0)
    with pytest.raises(ValueError, match="stack: n must be a positive int, got 1.5"):
        stack(LAYER, 1.5)
    unstacked = LAYER.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"parameter \['a'\] has shape \(3, 3\)"):
        stack(LAYER, 2).bind(unstacked)
