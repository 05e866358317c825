"""The Bernoulli VAE on binarised 8x8 digits: data, training, evaluation, ``run``.

The model is :mod:`programs.digits_vae.model`; the data are scikit-learn's
8x8 handwritten digits binarised at 1/2 (:func:`programs.data.load_digits`).
Training is SVI on minibatches of 100 images with Adam. The test set's
ELBO is tracked every epoch; at the end the test ELBO and the K = 1000
importance weighted bound of Burda, Grosse & Salakhutdinov (2016),
"Importance Weighted Autoencoders", https://arxiv.org/abs/1509.00519, are
reported. The 2-D latent space is drawn directly (encoder means of the
test images, coloured by digit).

Run it with ``python -m programs digits_vae``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from combinators import amortized, plots
from combinators.train import train
from programs import data
from programs._report import Report, Timer, axes
from programs.digits_vae.model import (
    VAE,
    init_params,
    kl_to_prior,
    make_loss_fn,
    make_vae,
)

DESCRIPTION = (
    "Bernoulli VAE on binarised 8x8 digits (combinators.amortized + elbo_loss): "
    "test ELBO, IWAE bound, 2-D latents"
)

BATCH_SIZE = 100
LEARNING_RATE = 1e-3
EVAL_PARTICLES = 10  # per-epoch test ELBO
IWAE_PARTICLES = 1000  # final test bounds


def evaluate(
    vae: VAE,
    params: amortized.AmortizedParams,
    key: jax.Array,
    x,
    num_particles: int,
) -> dict[str, float]:
    """Test ELBO, K-sample IWAE bound, ESS and the KL term, per image (nats).

    ``reconstruction = elbo + kl`` is the expected log likelihood
    ``E_q[log p(x | z)]``.
    """
    b = amortized.bounds(
        vae.model, vae.guide, params, key, jnp.asarray(x), num_particles, batch_size=40
    )
    kl = float(kl_to_prior(vae, params, jnp.asarray(x)))
    return {
        "elbo": float(b.elbo),
        "iwae": float(b.iwae),
        "ess": float(b.ess),
        "kl": kl,
        "reconstruction": float(b.elbo) + kl,
    }


class TrainedVAE(NamedTuple):
    """The outcome of :func:`train_vae`.

    Attributes:
      params: trained parameters.
      result: the :class:`combinators.train.TrainResult` (loss history).
      epochs: step numbers at which the test ELBO was measured (0 first).
      test_elbo: the test ELBO (``EVAL_PARTICLES`` samples) at those steps.
      seconds: wall-clock training time, including the evaluations.
    """

    params: amortized.AmortizedParams
    result: Any
    epochs: np.ndarray
    test_elbo: np.ndarray
    seconds: float


def train_vae(
    vae: VAE,
    params: amortized.AmortizedParams,
    dataset: data.Dataset,
    *,
    steps: int,
    particles: int,
    key: jax.Array,
    loss_fn=None,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    progress: bool = True,
) -> TrainedVAE:
    """Trains ``vae`` by SVI (or any loss of the shared signature) on minibatches.

    The test ELBO is measured once per epoch (every ``len(x_train) //
    batch_size`` steps) through ``combinators.train.train``'s ``eval_fn``.

    Args:
      vae: the model.
      params: initial parameters.
      dataset: train and test images.
      steps: optimisation steps.
      particles: K, samples per image in the training objective.
      key: PRNG key; split into a training and an evaluation key.
      loss_fn: the loss (default ``elbo_loss``).
      batch_size: images per minibatch.
      learning_rate: Adam's step size.
      progress: ``True`` (a progress bar), ``"log"`` (a line per epoch) or
        ``False`` (silent), as in :func:`combinators.train.train`.

    Returns:
      A :class:`TrainedVAE`.
    """
    key_train, key_eval = jax.random.split(key)
    objective = make_loss_fn(vae, particles, loss_fn)
    steps_per_epoch = len(dataset.x_train) // batch_size
    seed = int(jax.random.randint(key_train, (), 0, 2**31 - 1))
    loader = (
        jnp.asarray(b)
        for b in data.batches(dataset.x_train, batch_size=batch_size, seed=seed)
    )
    x_test = jnp.asarray(dataset.x_test)

    def eval_fn(step, params, opt_state, metrics):
        del step, opt_state, metrics
        b = amortized.bounds(
            vae.model, vae.guide, params, key_eval, x_test, EVAL_PARTICLES
        )
        return {"test_elbo": b.elbo}

    with Timer() as clock:
        result = train(
            objective,
            params,
            optax.adam(learning_rate),
            steps,
            dataloader=loader,
            seed=key_train,
            eval_fn=eval_fn,
            eval_every=steps_per_epoch,
            log_every=steps_per_epoch,
            progress=progress,
            return_result=True,
        )
    return TrainedVAE(
        result.params,
        result,
        np.asarray(result.evaluations["step"]),
        np.asarray(result.evaluations["test_elbo"]),
        clock.seconds,
    )


# ---------------------------------------------------------------------------
# Figure and entry point
# ---------------------------------------------------------------------------


def plot(
    trained: TrainedVAE,
    originals,
    reconstructions,
    prior_means,
    latent_means,
    labels,
    steps_per_epoch: int,
):
    """Four panels: ELBO curves, reconstructions, prior samples, latents."""
    axes_ = axes((20, 4.8), ncols=4)
    train_elbo = np.asarray(trained.result.history["elbo"])
    window = max(1, min(steps_per_epoch, len(train_elbo)))
    smooth = np.convolve(train_elbo, np.ones(window) / window, mode="valid")
    axes_[0].plot(
        np.arange(window, len(train_elbo) + 1) / steps_per_epoch,
        smooth,
        lw=0.8,
        color="C0",
        label="train minibatches (1-epoch mean)",
    )
    axes_[0].plot(
        trained.epochs / steps_per_epoch,
        trained.test_elbo,
        "o-",
        ms=2,
        color="C3",
        label=f"test set ({EVAL_PARTICLES} samples)",
    )
    axes_[0].set_xlabel("epoch")
    axes_[0].set_ylabel("ELBO per image (nats)")
    axes_[0].set_title("ELBO")
    low = np.percentile(np.concatenate([smooth, trained.test_elbo]), 2)
    axes_[0].set_ylim(low - 1, max(smooth.max(), trained.test_elbo.max()) + 1)
    axes_[0].legend(loc="lower right")

    pairs = np.stack([np.asarray(originals), np.asarray(reconstructions)], axis=1)
    grid = dict(
        shape=(8, 8), ncols=8, cmap="gray_r", vmin=0.0, vmax=1.0, max_images=None
    )
    plots.image_grid(pairs.reshape(-1, 64), ax=axes_[1], **grid)
    axes_[1].set_title("test images | reconstructions (pixel means)")
    plots.image_grid(np.asarray(prior_means), ax=axes_[2], **grid)
    axes_[2].set_title("samples z ~ p(z): decoder means")
    for ax in axes_[1:3]:
        ax.set_facecolor("0.75")  # the gaps between images

    latent_means = np.asarray(latent_means)
    scatter = axes_[3].scatter(
        latent_means[:, 0], latent_means[:, 1], c=labels, cmap="tab10", s=8
    )
    axes_[3].set_title("test images: encoder means of z, by digit")
    axes_[3].set_xlabel("z[0]")
    axes_[3].set_ylabel("z[1]")
    axes_[3].figure.colorbar(scatter, ax=axes_[3], ticks=range(10))
    return axes_


def run(
    *,
    steps: int = 3000,
    particles: int = 1,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    iwae_particles: int = IWAE_PARTICLES,
) -> dict[str, float]:
    """Trains the VAE, evaluates it on the test set, saves figure and metrics.

    Args:
      steps: optimisation steps (minibatches of 100 images; 14 per epoch,
        so the default is about 214 epochs).
      particles: K, importance samples per image in the training ELBO.
      seed: seeds the data split, the initialisation and training.
      out: output directory; ``digits_vae.png`` and
        ``digits_vae_metrics.json`` are written there.
      progress: show a progress bar; if False, training prints nothing.
      iwae_particles: K of the final test IWAE bound.

    Returns:
      Final metrics as floats: test ELBO and IWAE bound after (and before)
      training, the KL and reconstruction terms, ESS, first and last
      training ELBO.
    """
    if steps < 1:
        raise ValueError(f"digits_vae: steps must be at least 1, got {steps}.")
    if particles < 1 or iwae_particles < 1:
        raise ValueError(
            f"digits_vae: particles and iwae_particles must be positive, got "
            f"{particles} and {iwae_particles}."
        )
    report = Report(out, "digits_vae")
    dataset = data.load_digits(seed=seed)
    key_init, key_train, key_eval, key_prior = jax.random.split(jax.random.key(seed), 4)
    vae = make_vae()
    params0 = init_params(vae, key_init)
    before = evaluate(vae, params0, key_eval, dataset.x_test, iwae_particles)

    trained = train_vae(
        vae,
        params0,
        dataset,
        steps=steps,
        particles=particles,
        key=key_train,
        progress=progress,
    )
    params = trained.params
    after = evaluate(vae, params, key_eval, dataset.x_test, iwae_particles)

    x_test = jnp.asarray(dataset.x_test)
    latent_means = vae.guide.distribution(params.q, x_test).base_dist.loc
    originals = x_test[:32]
    reconstructions = vae.model.likelihood(params.p, latent_means[:32]).base_dist.mean
    z_prior = vae.model.prior(params.p).sample(key_prior, (64,))
    prior_means = vae.model.likelihood(params.p, z_prior).base_dist.mean
    steps_per_epoch = len(dataset.x_train) // BATCH_SIZE
    figure = plot(
        trained,
        originals,
        reconstructions,
        prior_means,
        latent_means,
        dataset.y_test,
        steps_per_epoch,
    )
    report.save_figure(figure)

    train_elbo = np.asarray(trained.result.history["elbo"])
    metrics = {
        "test_elbo": after["elbo"],
        "test_iwae": after["iwae"],
        "test_kl": after["kl"],
        "test_reconstruction": after["reconstruction"],
        "test_ess": after["ess"],
        "initial_test_elbo": before["elbo"],
        "initial_test_iwae": before["iwae"],
        "first_train_elbo": float(train_elbo[0]),
        "last_epoch_train_elbo": float(np.mean(train_elbo[-steps_per_epoch:])),
        "skipped_steps": float(trained.result.skipped),
    }
    report.write_metrics(
        metrics,
        settings={
            "steps": steps,
            "particles": particles,
            "iwae_particles": iwae_particles,
            "seed": seed,
            "epochs": steps / steps_per_epoch,
        },
        timings={"train_seconds": trained.seconds},
        extras={
            "test_elbo_per_epoch": {
                "step": trained.epochs.tolist(),
                "elbo": trained.test_elbo.tolist(),
            }
        },
    )
    report.summary(
        f"digits_vae: {steps} steps, {particles} particles, seed {seed}",
        [
            ("initial test ELBO", f"{before['elbo']:.3f} nats per image"),
            ("final test ELBO", f"{after['elbo']:.3f}"),
            (f"test IWAE (K={iwae_particles})", f"{after['iwae']:.3f}"),
            ("KL term", f"{after['kl']:.3f}"),
        ],
        metrics,
    )
    return metrics
