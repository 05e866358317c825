"""IWAE vs VAE on digits (programs/iwae_digits): objectives, bounds, activity.

* With a decoder that ignores ``z`` (last layer's kernel 0, logits = its
  bias b), ``log p(x) = sum_j log Bernoulli(x_j; sigmoid(b_j))`` exactly.
  With ``q(z | x) = N(0, I)`` the weights are all ``p(x)``: the held-out
  ELBO and k-sample bound equal ``log p(x)`` to float precision. With
  ``q = N(0.5, 1.2^2 I)`` the ELBO is ``log p(x) - KL(q || p)`` (closed
  form) and the k-sample bound is ``log p(x) + log mean_k r_k`` with
  ``r = p(z) / q(z)`` bounded (q is wider than p), so both are checked
  within 6 standard errors estimated from the weights themselves.
* The two objectives' losses are the negated ``elbo`` and ``iwae``
  metrics, and ``iwae >= elbo`` on the same samples (Jensen).
* ``unit_activity`` is the variance over images of the encoder mean; a
  unit whose mean ignores x has zero activity and is not counted active.
* A smoke run writes its outputs and drops configurations above
  ``particles``; bad arguments are refused.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from combinators import amortized
from programs import data
from programs import iwae_digits as iw

LATENT = iw.LATENT_DIM


def _images(n=12, seed=0):
    x = data.load_digits(seed=seed, binarization=None).x_test[:n]
    return np.asarray(
        jax.random.bernoulli(jax.random.key(seed), jnp.asarray(x)), np.float32
    )


def _params_with(vae, *, decoder_bias, q_loc, q_scale, key=0):
    """Parameters whose decoder ignores z and whose q is N(q_loc, q_scale^2 I)."""
    params = iw.init_params(vae, jax.random.key(key))
    p = jax.tree_util.tree_map(lambda a: a, params.p)
    p["params"]["Dense_2"]["kernel"] = jnp.zeros_like(p["params"]["Dense_2"]["kernel"])
    p["params"]["Dense_2"]["bias"] = jnp.asarray(decoder_bias, jnp.float32)
    q = jax.tree_util.tree_map(lambda a: a, params.q)
    q["params"]["Dense_2"]["kernel"] = jnp.zeros_like(q["params"]["Dense_2"]["kernel"])
    s = math.log(math.expm1(q_scale - 1e-4))  # softplus(s) + 1e-4 = q_scale
    q["params"]["Dense_2"]["bias"] = jnp.concatenate(
        [jnp.full(LATENT, q_loc), jnp.full(LATENT, s)]
    ).astype(jnp.float32)
    return amortized.AmortizedParams(p=p, q=q)


def _exact_log_px(x, bias):
    x = np.asarray(x, np.float64)
    b = np.asarray(bias, np.float64)
    log_on = -np.logaddexp(0.0, -b)
    log_off = -np.logaddexp(0.0, b)
    return float(np.mean(np.sum(x * log_on + (1 - x) * log_off, axis=1)))


BIAS = np.linspace(-2.0, 1.5, 64)


def test_bounds_equal_log_px_when_q_is_the_prior():
    vae = iw.make_model()
    x = _images()
    params = _params_with(vae, decoder_bias=BIAS, q_loc=0.0, q_scale=1.0)
    b = iw.test_bounds(vae, params, jax.random.key(1), x, num_particles=64)
    exact = _exact_log_px(x, BIAS)
    assert float(b.elbo) == pytest.approx(exact, abs=2e-4)
    assert float(b.iwae) == pytest.approx(exact, abs=2e-4)


def test_bounds_match_closed_form_with_a_wider_shifted_q():
    vae = iw.make_model()
    x = _images()
    k = 2000
    params = _params_with(vae, decoder_bias=BIAS, q_loc=0.5, q_scale=1.2)
    exact = _exact_log_px(x, BIAS)
    s2 = 1.2**2
    kl = 0.5 * LATENT * (s2 + 0.25 - 1.0 - math.log(s2))
    b = iw.test_bounds(vae, params, jax.random.key(2), x, num_particles=k)
    # Spread of the per-sample terms, from an independent draw.
    log_w = np.asarray(
        amortized.log_weights(
            vae.model, vae.guide, params, jax.random.key(3), jnp.asarray(x), k
        ),
        np.float64,
    )
    log_px = np.asarray(
        [_exact_log_px(row[None], BIAS) for row in np.asarray(x)], np.float64
    )
    log_r = log_w - log_px[None, :]
    n = log_w.size
    assert abs(float(b.elbo) - (exact - kl)) < 6 * log_r.std() / math.sqrt(n)
    assert abs(float(b.iwae) - exact) < 6 * np.exp(log_r).std() / math.sqrt(n)
    assert float(b.iwae) > float(b.elbo) + 0.5 * kl  # the bound is far tighter


@pytest.mark.parametrize("name", ["vae_k5", "iwae_k5"])
def test_objective_losses_are_the_negated_bounds(name):
    vae = iw.make_model()
    params = iw.init_params(vae, jax.random.key(0))
    loss, metrics = jax.jit(iw.make_objective(vae, name))(
        params, jax.random.key(4), jnp.asarray(_images())
    )
    bound = metrics["elbo"] if name.startswith("vae") else metrics["iwae"]
    assert float(loss) == pytest.approx(-float(bound), rel=1e-5)
    assert float(metrics["iwae"]) >= float(metrics["elbo"])


def test_unit_activity_is_the_variance_of_the_encoder_mean():
    vae = iw.make_model()
    params = iw.init_params(vae, jax.random.key(5))
    q = jax.tree_util.tree_map(lambda a: a, params.q)
    q["params"]["Dense_2"]["kernel"] = q["params"]["Dense_2"]["kernel"].at[:, 3].set(0)
    params = amortized.AmortizedParams(p=params.p, q=q)
    x = _images(40)
    activity = np.asarray(iw.unit_activity(vae, params, x))
    means = np.asarray(vae.encoder.apply(params.q, jnp.asarray(x)))[:, :LATENT]
    np.testing.assert_allclose(activity, means.var(axis=0), rtol=1e-4, atol=1e-7)
    assert activity.shape == (LATENT,)
    assert activity[3] == pytest.approx(0.0, abs=1e-10)
    assert activity[np.arange(LATENT) != 3].min() > 0


def test_smoke_run_writes_outputs_and_drops_large_k(tmp_path):
    config = dict(iw.SMOKE_CONFIG)
    config["configurations"] = ("vae_k1", "iwae_k5", "iwae_k50")
    metrics = iw.run(**config, particles=5, out=str(tmp_path), progress=False)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert "iwae_k50_log_likelihood" not in metrics
    for name in ("vae_k1", "iwae_k5"):
        assert metrics[f"{name}_log_likelihood"] >= metrics[f"{name}_elbo"] - 1e-3
        assert 0 <= metrics[f"{name}_active_units"] <= LATENT
    record = json.loads((tmp_path / "iwae_digits_metrics.json").read_text())
    assert record["configurations"] == ["vae_k1", "iwae_k5"]
    assert len(record["runs"][0]["log_likelihood"]) == config["num_seeds"]
    assert (tmp_path / "iwae_digits.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown configuration"):
        iw.make_objective(iw.make_model(), "iwae_k7")
    with pytest.raises(ValueError, match="unknown configurations"):
        iw.run(configurations=("vae_k3",), out=str(tmp_path))
    with pytest.raises(ValueError, match="num_seeds"):
        iw.run(num_seeds=1, out=str(tmp_path))
    with pytest.raises(ValueError, match="no configuration"):
        iw.run(configurations=("iwae_k50",), particles=5, out=str(tmp_path))
