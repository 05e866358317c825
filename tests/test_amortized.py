"""combinators.amortized: log densities, weights and bounds by hand; training.

The reference model is linear-Gaussian with a closed-form posterior:

    z ~ N(mu, 1),   x | z ~ N(w z + c, sigma^2 I_2),

so p(z | x) = N(m(x), 1 / lam) with lam = 1 + |w|^2 / sigma^2 and
m(x) = (mu + w . (x - c) / sigma^2) / lam, and x ~ N(w mu + c, sigma^2 I + w w^T).
The inference network q(z | x) = N(A . x + b, exp(s)^2) contains the exact
posterior (A = w / (sigma^2 lam), b = (mu - w . c / sigma^2) / lam,
exp(s) = lam^(-1/2)).
"""

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from jax.scipy.special import logsumexp

import combinators
from combinators import amortized as am
from combinators.loss import elbo_loss, iwae_loss, rws_loss
from combinators.train import train

W = jnp.array([1.0, -0.5])
C = jnp.array([0.3, 0.1])
SIGMA = 0.7
LOG_2PI = math.log(2 * math.pi)
STEPS_RWS = int(os.environ.get("STEPS_RWS", 1000))


def normal_lpdf(x, loc, scale):
    """log N(x; loc, scale^2), written out."""
    return -0.5 * ((x - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * LOG_2PI


def linear_gaussian():
    model = am.GenerativeModel(
        lambda p: dist.Normal(p["mu"], 1.0).expand([1]).to_event(1),
        lambda p, z: dist.Normal(z * W + C, SIGMA).to_event(1),
    )
    guide = am.InferenceNetwork(
        lambda q, x: dist.Normal(
            x @ q["A"][:, None] + q["b"], jnp.exp(q["s"])
        ).to_event(1)
    )
    return model, guide


def exact_posterior(mu):
    lam = 1.0 + jnp.sum(W**2) / SIGMA**2
    return {
        "A": W / (SIGMA**2 * lam),
        "b": jnp.asarray((mu - jnp.dot(W, C) / SIGMA**2) / lam),
        "s": jnp.asarray(-0.5 * jnp.log(lam)),
    }


def log_evidence(x, mu):
    """log N(x; w mu + c, sigma^2 I + w w^T) per row of x."""
    cov = SIGMA**2 * jnp.eye(2) + jnp.outer(W, W)
    return jax.scipy.stats.multivariate_normal.logpdf(x, W * mu + C, cov)


def hand_log_weight(params, x, z):
    """log p(x, z) - log q(z | x) from the formulas, z of shape (K, B, 1)."""
    zs = z[..., 0]
    mu, q = params.p["mu"], params.q
    log_p = normal_lpdf(zs, mu, 1.0) + jnp.sum(
        normal_lpdf(x, zs[..., None] * W + C, SIGMA), axis=-1
    )
    log_q = normal_lpdf(zs, x @ q["A"] + q["b"], jnp.exp(q["s"]))
    return log_p - log_q


def some_params(mu=0.4):
    return am.AmortizedParams(
        p={"mu": jnp.asarray(mu)},
        q={"A": jnp.array([0.2, -0.1]), "b": jnp.asarray(0.1), "s": jnp.asarray(-0.4)},
    )


def data(key, n=16, mu=0.4):
    cov = SIGMA**2 * jnp.eye(2) + jnp.outer(W, W)
    return jax.random.multivariate_normal(key, W * mu + C, cov, (n,))


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6))
def run_program(model, guide, params, key, x, num_particles, loss_fn=None):
    """The z site and metrics of make_program, compiled (eager numpyro is slow)."""
    program = am.make_program(model, guide, params, num_particles, loss_fn=loss_fn)
    _, trace, metrics = combinators.traced_evaluate(program, seed=key)(x)
    return trace["z"], metrics


jit_log_weights = jax.jit(am.log_weights, static_argnums=(0, 1, 5))


# ---------------------------------------------------------------------------
# (a) exact equality with hand computations
# ---------------------------------------------------------------------------


def test_log_probs_match_the_formulas():
    model, guide = linear_gaussian()
    params = some_params()
    x = data(jax.random.key(0), n=5)

    @jax.jit
    def densities(params, key):
        z = guide.sample(params.q, key, x, num_particles=3)
        return z, guide.log_prob(params.q, x, z), model.log_prob(params.p, x, z)

    z, log_q, log_p = densities(params, jax.random.key(1))
    assert z.shape == (3, 5, 1)
    q = params.q
    by_hand_q = normal_lpdf(z[..., 0], x @ q["A"] + q["b"], jnp.exp(q["s"]))
    np.testing.assert_allclose(log_q, by_hand_q, rtol=1e-5)
    np.testing.assert_allclose(
        log_p, hand_log_weight(params, x, z) + by_hand_q, rtol=1e-5
    )


def test_bernoulli_and_categorical_heads_match_the_formulas():
    key_l, key_x, key_c = jax.random.split(jax.random.key(2), 3)
    logits = jax.random.normal(key_l, (4, 6))
    x = jax.random.bernoulli(key_x, 0.5, (4, 6)).astype(jnp.float32)
    classes = jax.random.randint(key_c, (4,), 0, 6)
    value = jnp.ones((4, 3))

    @jax.jit
    def densities(logits):
        return (
            am.bernoulli_logits(logits).log_prob(x),
            am.categorical_logits(logits).log_prob(classes),
            am.diagonal_normal(logits).log_prob(value),
        )

    bernoulli, categorical, normal = densities(logits)
    by_hand = jnp.sum(
        x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits), -1
    )
    np.testing.assert_allclose(bernoulli, by_hand, rtol=1e-5)
    np.testing.assert_allclose(
        categorical, jax.nn.log_softmax(logits)[jnp.arange(4), classes], rtol=1e-5
    )
    scale = jax.nn.softplus(logits[:, 3:]) + 1e-4
    np.testing.assert_allclose(
        normal, jnp.sum(normal_lpdf(value, logits[:, :3], scale), -1), rtol=1e-5
    )


@pytest.mark.parametrize("num_particles", [1, 7])
def test_program_weights_losses_and_bounds_equal_the_hand_computation(num_particles):
    model, guide = linear_gaussian()
    params = some_params()
    x = data(jax.random.key(3), n=6)
    key = jax.random.key(4)
    site, metrics = run_program(model, guide, params, key, x, num_particles, elbo_loss)
    z = site.value
    assert z.shape == (num_particles, 6, 1)
    assert [p.name for p in site.plates] == ["particles", "data"]
    log_w = hand_log_weight(params, x, z)
    np.testing.assert_allclose(metrics["log_weight"], log_w, rtol=1e-5)

    neg_elbo = -jnp.sum(jnp.mean(log_w, axis=0))  # summed over the batch
    iwae = jnp.sum(logsumexp(log_w, axis=0) - jnp.log(num_particles))
    np.testing.assert_allclose(metrics["loss"], neg_elbo, rtol=1e-5)
    np.testing.assert_allclose(metrics["log_Z"], iwae, rtol=1e-5)

    # make_loss_fn with the same key draws the same z; its loss is per image.
    for loss_fn, expected in [(elbo_loss, neg_elbo), (iwae_loss, -iwae)]:
        objective = am.make_loss_fn(
            model, guide, num_particles=num_particles, loss_fn=loss_fn
        )
        loss, aux = jax.jit(objective)(params, key, x)
        np.testing.assert_allclose(loss, expected / 6, rtol=1e-5)
        np.testing.assert_allclose(aux["elbo"], -neg_elbo / 6, rtol=1e-5)
        np.testing.assert_allclose(aux["iwae"], iwae / 6, rtol=1e-5)

    # bounds evaluates chunk i with the weights of fold_in(key, i).
    bounds = am.bounds(model, guide, params, key, x, num_particles, batch_size=3)
    lw = jnp.concatenate(
        [
            jit_log_weights(
                model, guide, params, jax.random.fold_in(key, 0), x[:3], num_particles
            ),
            jit_log_weights(
                model, guide, params, jax.random.fold_in(key, 1), x[3:], num_particles
            ),
        ],
        axis=1,
    )
    np.testing.assert_allclose(bounds.elbo, jnp.mean(lw), rtol=1e-5)
    np.testing.assert_allclose(
        bounds.iwae, jnp.mean(logsumexp(lw, axis=0) - jnp.log(num_particles)), rtol=1e-5
    )


def test_exact_posterior_makes_every_weight_the_evidence():
    # q = p(z | x): log w = log p(x) for every particle, whatever z is drawn.
    model, guide = linear_gaussian()
    mu = 0.4
    params = am.AmortizedParams(p={"mu": jnp.asarray(mu)}, q=exact_posterior(mu))
    x = data(jax.random.key(5), n=6)
    lw = jit_log_weights(model, guide, params, jax.random.key(6), x, 11)
    np.testing.assert_allclose(
        lw, jnp.broadcast_to(log_evidence(x, mu), (11, 6)), atol=2e-5
    )
    b = am.bounds(model, guide, params, jax.random.key(7), x, 11, batch_size=4)
    np.testing.assert_allclose(b.elbo, jnp.mean(log_evidence(x, mu)), atol=2e-5)
    np.testing.assert_allclose(b.iwae, b.elbo, atol=2e-5)
    np.testing.assert_allclose(b.ess, 11.0, rtol=1e-4)


def test_rws_gradients_are_the_self_normalised_score_function_by_hand():
    # rws_loss with the (default) detached proposal: the gradient in phi is
    # -sum wbar grad log q(z | x), in theta -sum wbar grad log p(x, z), z fixed.
    model, guide = linear_gaussian()
    params = some_params()
    x = data(jax.random.key(8), n=4)
    key = jax.random.key(9)
    objective = am.make_loss_fn(model, guide, num_particles=5, loss_fn=rws_loss)
    grads = jax.jit(jax.grad(lambda p: objective(p, key, x)[0]))(params)
    z = run_program(model, guide, params, key, x, 5, rws_loss)[0].value
    wbar = jax.nn.softmax(hand_log_weight(params, x, z), axis=0)

    def surrogate(p):
        log_q = guide.log_prob(p.q, x, z)
        log_p = model.log_prob(p.p, x, z)
        return -jnp.sum(wbar * (log_p + log_q)) / 4

    expected = jax.grad(surrogate)(params)
    for got, want in zip(
        jax.tree_util.tree_leaves(grads),
        jax.tree_util.tree_leaves(expected),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# (b) statistical tests against closed forms
# ---------------------------------------------------------------------------


def test_bounds_estimate_the_closed_form_elbo_and_approach_log_evidence():
    model, guide = linear_gaussian()
    mu = 0.4
    params = some_params(mu)
    x = data(jax.random.key(10), n=50, mu=mu)
    q = params.q
    # Closed-form ELBO = log p(x) - KL(q(z|x) || p(z|x)) for Gaussians.
    post = exact_posterior(mu)
    m_p, s_p = x @ post["A"] + post["b"], jnp.exp(post["s"])
    m_q, s_q = x @ q["A"] + q["b"], jnp.exp(q["s"])
    kl = jnp.log(s_p / s_q) + (s_q**2 + (m_q - m_p) ** 2) / (2 * s_p**2) - 0.5
    elbo = jnp.mean(log_evidence(x, mu) - kl)
    log_px = jnp.mean(log_evidence(x, mu))

    k = 1000
    key = jax.random.key(11)
    b = am.bounds(model, guide, params, key, x, k, batch_size=25)
    lw = jnp.concatenate(  # the same weights, as bounds draws them chunk by chunk
        [
            jax.jit(am.log_weights, static_argnums=(0, 1, 5))(
                model,
                guide,
                params,
                jax.random.fold_in(key, i),
                x[25 * i : 25 * (i + 1)],
                k,
            )
            for i in range(2)
        ],
        axis=1,
    )
    # ELBO estimate: a mean of K * B independent log weights; 5 standard errors
    # (the per-datum variances differ, so the SE pools the within-datum ones).
    se_elbo = jnp.sqrt(jnp.mean(jnp.var(lw, axis=0)) / (k * x.shape[0]))
    assert abs(b.elbo - elbo) < 5 * se_elbo
    # IWAE_K: log of a mean of K weights, biased low by about
    # Var(w) / (2 K E[w]^2) (delta method), with SE sqrt(Var(w) / K) / E[w]
    # per datum; both estimated from the weights.
    w = jnp.exp(lw - jnp.max(lw, axis=0))
    rel_var = jnp.var(w, axis=0) / jnp.mean(w, axis=0) ** 2
    bias = jnp.mean(rel_var) / (2 * k)
    se_iwae = jnp.sqrt(jnp.mean(rel_var) / k / x.shape[0])
    assert abs(b.iwae - (log_px - bias)) < 5 * se_iwae + bias
    # The gap to log p(x) closes: IWAE_1000 recovers most of the KL.
    assert log_px - b.iwae < 0.05 * (log_px - elbo)
    b10 = am.bounds(model, guide, params, jax.random.key(12), x, 10)
    assert b.elbo < b10.iwae < b.iwae


def test_training_the_conjugate_model_reaches_the_exact_posterior_and_mle():
    # Learn the prior mean mu (theta) and the guide (phi) by SVI on 256 points.
    # The optimum is the maximum-likelihood mu (generalised least squares)
    # with q equal to the exact posterior under it. The final iterate moves
    # with the gradient noise: over seeds 0-9 the largest error of any
    # parameter was 0.0094 (typically 0.003), and of the final ELBO against
    # log p(x) 0.0004 nats; the tolerances are 4x and 12x those.
    model, guide = linear_gaussian()
    key_data, key_train = jax.random.split(jax.random.key(13))
    x = data(key_data, n=256, mu=1.0)
    params0 = am.AmortizedParams(
        p={"mu": jnp.asarray(0.0)},
        q={"A": jnp.zeros(2), "b": jnp.asarray(0.0), "s": jnp.asarray(0.0)},
    )
    steps = 1000
    result = train(
        am.make_loss_fn(model, guide, num_particles=1),
        params0,
        optax.adam(optax.cosine_decay_schedule(0.05, steps, 0.02)),
        steps,
        dataloader=iter(lambda: x, None),
        seed=key_train,
        progress=False,
        return_result=True,
        log_every=steps,
    )
    cov_inv = jnp.linalg.inv(SIGMA**2 * jnp.eye(2) + jnp.outer(W, W))
    mu_hat = (W @ cov_inv @ (jnp.mean(x, 0) - C)) / (W @ cov_inv @ W)
    assert abs(result.params.p["mu"] - mu_hat) < 0.04
    exact = exact_posterior(mu_hat)
    for name in ("A", "b", "s"):
        np.testing.assert_allclose(result.params.q[name], exact[name], atol=0.04)
    assert result.skipped == 0
    assert result.history["loss"].shape == (steps,)
    # The final ELBO is the exact log evidence (the KL gap is closed).
    final = am.bounds(model, guide, result.params, jax.random.key(14), x, 100)
    assert abs(final.elbo - jnp.mean(log_evidence(x, mu_hat))) < 0.005


def test_discrete_latent_mixture_is_learnt_with_rws():
    # z ~ Categorical(pi), x | z ~ N(means[z], 1). The exact posterior's logits
    # log pi_k + means_k x - means_k^2 / 2 are linear in x, so the guide
    # Categorical(a x + b) contains it. RWS (score-function gradients) learns
    # pi and the guide; the reference is the EM fixed point (the MLE of pi).
    means = jnp.array([-2.0, 0.0, 2.5])
    model = am.GenerativeModel(
        lambda p: dist.Categorical(logits=p["logits"]),
        lambda p, z: dist.Normal(means[z][..., None], 1.0).to_event(1),
    )
    guide = am.InferenceNetwork(
        lambda q, x: dist.Categorical(logits=x * q["a"] + q["b"])
    )
    key_z, key_x, key_train = jax.random.split(jax.random.key(15), 3)
    z = jax.random.categorical(key_z, jnp.log(jnp.array([0.5, 0.2, 0.3])), shape=(500,))
    x = (means[z] + jax.random.normal(key_x, (500,)))[:, None]
    params0 = am.AmortizedParams(
        p={"logits": jnp.zeros(3)}, q={"a": jnp.zeros(3), "b": jnp.zeros(3)}
    )
    with pytest.raises(ValueError, match="not reparameterisable"):
        objective = am.make_loss_fn(model, guide, num_particles=2, loss_fn=elbo_loss)
        jax.eval_shape(objective, params0, key_train, x)
    steps = STEPS_RWS
    result = train(
        am.make_loss_fn(model, guide, num_particles=10, loss_fn=rws_loss),
        params0,
        optax.adam(optax.cosine_decay_schedule(0.1, steps, 0.01)),
        steps,
        dataloader=iter(lambda: x, None),
        seed=key_train,
        progress=False,
        return_result=True,
        log_every=steps,
    )
    pi = np.full(3, 1 / 3)
    xs, mean_np = np.asarray(x[:, 0]), np.asarray(means)
    for _ in range(2000):  # EM for the weights, means known
        r = pi * np.exp(-0.5 * (xs[:, None] - mean_np) ** 2)
        pi = (r / r.sum(1, keepdims=True)).mean(0)
    # Over seeds 0-9 the largest errors were 0.0022 (pi) and 0.009 (posterior
    # probabilities); the tolerances are about 10x and 3x those.
    np.testing.assert_allclose(jax.nn.softmax(result.params.p["logits"]), pi, atol=0.02)
    grid = jnp.linspace(-4, 4, 17)[:, None]
    q_probs = jax.nn.softmax(grid * result.params.q["a"] + result.params.q["b"], -1)
    exact = jax.nn.softmax(jnp.log(pi) - 0.5 * (grid - means) ** 2, -1)
    np.testing.assert_allclose(q_probs, exact, atol=0.03)


def test_bernoulli_latents_weights_by_hand():
    # A vector of binary latents; decoder linear in z.
    w_dec = jnp.linspace(-1, 1, 12).reshape(3, 4)
    model = am.GenerativeModel(
        lambda p: dist.Bernoulli(probs=jnp.full(3, 0.3)).to_event(1),
        lambda p, z: am.bernoulli_logits(z.astype(jnp.float32) @ p["w"]),
    )
    guide = am.InferenceNetwork(
        am.from_apply(lambda q, x: x @ q["v"], am.bernoulli_logits)
    )
    params = am.AmortizedParams(p={"w": w_dec}, q={"v": jnp.ones((4, 3)) * 0.5})
    x = jnp.array([[1.0, 0, 1, 1], [0, 0, 1, 0]])
    site, metrics = run_program(
        model, guide, params, jax.random.key(16), x, 6, rws_loss
    )
    z = site.value.astype(jnp.float32)
    assert z.shape == (6, 2, 3)

    def bern(v, logits):
        return jnp.sum(
            v * jax.nn.log_sigmoid(logits) + (1 - v) * jax.nn.log_sigmoid(-logits), -1
        )

    log_w = (
        jnp.sum(z * jnp.log(0.3) + (1 - z) * jnp.log(0.7), -1)
        + bern(x, z @ w_dec)
        - bern(z, x @ params.q["v"])
    )
    np.testing.assert_allclose(metrics["log_weight"], log_w, rtol=1e-5)
    assert np.isfinite(metrics["loss"])


# ---------------------------------------------------------------------------
# (c) jit and network libraries
# ---------------------------------------------------------------------------


def test_loss_is_the_same_with_and_without_jit():
    model, guide = linear_gaussian()
    params = some_params()
    x = data(jax.random.key(17), n=8)
    objective = am.make_loss_fn(model, guide, num_particles=3, loss_fn=iwae_loss)
    eager = objective(params, jax.random.key(18), x)
    compiled = jax.jit(objective)(params, jax.random.key(18), x)
    for a, b in zip(
        jax.tree_util.tree_leaves(eager),
        jax.tree_util.tree_leaves(compiled),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_flax_linen_and_nnx_networks_give_the_same_loss():
    nnx = pytest.importorskip("flax.nnx")
    encoder, decoder = nn.Dense(4), nn.Dense(6)
    key = jax.random.key(19)
    x = jax.random.bernoulli(key, 0.5, (5, 6)).astype(jnp.float32)
    linen_params = am.AmortizedParams(
        p=decoder.init(jax.random.key(20), jnp.zeros((1, 2))),
        q=encoder.init(jax.random.key(21), x),
    )
    linen_model = am.GenerativeModel(
        am.standard_normal(2), am.from_apply(decoder.apply, am.bernoulli_logits)
    )
    linen_guide = am.InferenceNetwork(am.from_apply(encoder.apply, am.diagonal_normal))

    nnx_encoder, nnx_decoder = (
        nnx.Linear(6, 4, rngs=nnx.Rngs(0)),
        nnx.Linear(2, 6, rngs=nnx.Rngs(1)),
    )
    for module, p in ((nnx_encoder, linen_params.q), (nnx_decoder, linen_params.p)):
        module.kernel[...] = p["params"]["kernel"]
        module.bias[...] = p["params"]["bias"]
    graph_q, state_q = nnx.split(nnx_encoder)
    graph_p, state_p = nnx.split(nnx_decoder)
    nnx_model = am.GenerativeModel(
        am.standard_normal(2), am.from_apply(am.nnx_apply(graph_p), am.bernoulli_logits)
    )
    nnx_guide = am.InferenceNetwork(
        am.from_apply(am.nnx_apply(graph_q), am.diagonal_normal)
    )
    nnx_params = am.AmortizedParams(p=state_p, q=state_q)

    linen_loss = am.make_loss_fn(linen_model, linen_guide, num_particles=3)
    nnx_loss = am.make_loss_fn(nnx_model, nnx_guide, num_particles=3)
    a, _ = jax.jit(linen_loss)(linen_params, key, x)
    b, _ = jax.jit(nnx_loss)(nnx_params, key, x)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # NNX state trains with the library's loop (linen: tests/test_digits.py).
    result = train(
        nnx_loss,
        nnx_params,
        optax.adam(1e-2),
        30,
        dataloader=iter(lambda: x, None),
        progress=False,
        return_result=True,
    )
    assert result.history["loss"][-1] < result.history["loss"][0]


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_errors_name_the_problem():
    model, guide = linear_gaussian()
    params = some_params()
    x = data(jax.random.key(22), n=3)
    no_event = am.InferenceNetwork(
        lambda q, x: dist.Normal(x[:, :1], 1.0)
    )  # batch (3, 1)
    with pytest.raises(
        ValueError, match=r"batch shape \(3, 1\).*expected batch shape \(3,\)"
    ):
        no_event.sample(None, jax.random.key(0), x, 2)
    with pytest.raises(ValueError, match="leading data"):
        guide.sample(params.q, jax.random.key(0), x[0, 0], 2)
    with pytest.raises(ValueError, match="num_particles"):
        guide.sample(params.q, jax.random.key(0), x, 0)
    with pytest.raises(ValueError, match="num_particles"):
        am.make_loss_fn(model, guide, num_particles=2.0)
    batched_prior = am.GenerativeModel(
        lambda p: dist.Normal(jnp.zeros(2), 1.0), model.likelihood_fn
    )
    with pytest.raises(ValueError, match="prior_fn.*expected batch shape \\(\\)"):
        batched_prior.sample(params.p, jax.random.key(0), 4)
    flat_likelihood = am.GenerativeModel(
        model.prior_fn, lambda p, z: dist.Normal(z * W + C, SIGMA)
    )
    with pytest.raises(ValueError, match="likelihood_fn.*to_event"):
        flat_likelihood.log_prob(params.p, x, jnp.zeros((3, 1)))
    with pytest.raises(TypeError, match="numpyro distribution"):
        am.InferenceNetwork(lambda q, x: x).sample(None, jax.random.key(0), x, 1)
    renamed = am.InferenceNetwork(guide.distribution_fn, latent="h")
    with pytest.raises(ValueError, match="'h' but the model's latent is 'z'"):
        am.make_program(model, renamed, params, 2)
    with pytest.raises(ValueError, match="even width"):
        am.diagonal_normal(jnp.zeros((2, 3)))
