"""Smoke runs of the digits VAE and the autoencoder (few steps, tmp_path out).

Measured with 100 steps (7 epochs) on seeds 0-4: the VAE's test ELBO rose
from -45.3..-46.6 to -24.1..-24.9 nats per image (an improvement of 20.3 to
21.7 nats), the K = 100 IWAE bound lay 0.6 to 0.8 nats above the ELBO, and
the autoencoder's test BCE fell from 44.1..44.9 to 20.2..21.5 nats. The
margins below (15 nats) leave a quarter of the smallest improvement for other
seeds and platforms.
"""

import json
import math

import jax
import numpy as np
import pytest

from combinators.loss import iwae_loss, rws_loss
from programs import autoencoder, data, digits_vae

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_digits_vae_smoke_run_improves_the_test_elbo(tmp_path):
    out = tmp_path / "out"
    metrics = digits_vae.run(
        steps=100, particles=1, seed=0, out=str(out), progress=False, iwae_particles=100
    )
    assert (out / "digits_vae.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((out / "digits_vae_metrics.json").read_text())
    assert record["steps"] == 100 and record["particles"] == 1
    assert record["iwae_particles"] == 100
    assert record["metrics"] == pytest.approx(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["test_elbo"] > metrics["initial_test_elbo"] + 15.0
    assert metrics["test_iwae"] > metrics["test_elbo"]
    assert metrics["test_reconstruction"] == pytest.approx(
        metrics["test_elbo"] + metrics["test_kl"]
    )
    assert metrics["test_kl"] > 0
    assert metrics["skipped_steps"] == 0
    # One test ELBO per epoch (14 steps), plus the untrained one and the end.
    steps = record["test_elbo_per_epoch"]["step"]
    assert steps[:3] == [0, 14, 28] and steps[-1] == 100


def test_autoencoder_smoke_run_improves_the_test_bce(tmp_path):
    out = tmp_path / "out"
    metrics = autoencoder.run(steps=100, seed=0, out=str(out), progress=False)
    assert (out / "autoencoder.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((out / "autoencoder_metrics.json").read_text())
    assert record["metrics"] == pytest.approx(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["test_bce"] < metrics["initial_test_bce"] - 15.0
    assert metrics["skipped_steps"] == 0


@pytest.mark.parametrize("loss_fn", [iwae_loss, rws_loss], ids=["iwae", "rws"])
def test_other_losses_train_the_same_vae(loss_fn):
    # The interface takes any loss of the shared signature: IWAE (pathwise)
    # and reweighted wake-sleep (score function, detached proposal) with
    # K = 5 also raise the test ELBO within 50 steps (by 18.3 to 19.8 nats on
    # seeds 0-2, from about -45; the margin is 10).
    dataset = data.load_digits(seed=0)
    vae = digits_vae.make_vae()
    params0 = digits_vae.init_params(vae, jax.random.key(0))
    trained = digits_vae.train_vae(
        vae,
        params0,
        dataset,
        steps=50,
        particles=5,
        key=jax.random.key(1),
        loss_fn=loss_fn,
        progress=False,
    )
    assert trained.result.skipped == 0
    assert np.all(np.isfinite(trained.result.history["loss"]))
    assert trained.test_elbo[-1] > trained.test_elbo[0] + 10.0


def test_interpolation_ends_at_the_two_codes():
    network = autoencoder.Autoencoder()
    x = np.asarray(data.load_digits(seed=0).x_test[:2])
    params = network.init(jax.random.key(0), x)
    codes = network.apply(params, x, method=autoencoder.Autoencoder.encode)
    path = autoencoder.interpolate(network, params, codes[0], codes[1], num=5)
    assert path.shape == (5, 64)
    ends = jax.nn.sigmoid(network.apply(params, x))
    np.testing.assert_allclose(path[0], ends[0], rtol=1e-5)
    np.testing.assert_allclose(path[-1], ends[1], rtol=1e-5)


def test_run_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        digits_vae.run(steps=0, out=str(tmp_path))
    with pytest.raises(ValueError, match="particles"):
        autoencoder.run(steps=1, particles=0, out=str(tmp_path))
