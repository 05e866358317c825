"""The deterministic autoencoder on binarised 8x8 digits: training, figure, ``run``.

The model is :mod:`programs.autoencoder.model`; the data are scikit-learn's
8x8 digits binarised at 1/2 (:func:`programs.data.load_digits`). The
figure shows the loss, reconstructions, a linear interpolation between
the codes of two test digits, decodings of random codes and the codes of
the test set coloured by digit.

Run it with ``python -m programs autoencoder``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from combinators import plots
from combinators.train import train
from programs import data
from programs._report import Report, Timer, axes
from programs.autoencoder.model import Autoencoder, bce, interpolate, loss_fn

DESCRIPTION = (
    "Deterministic autoencoder on binarised 8x8 digits (BCE, optax loop): "
    "reconstructions, latent interpolation"
)

BATCH_SIZE = 100
LEARNING_RATE = 1e-3


class TrainedAutoencoder(NamedTuple):
    """The outcome of :func:`train_autoencoder`.

    Attributes:
      params: trained parameters.
      result: the :class:`combinators.train.TrainResult`.
      epochs: steps at which the test BCE was measured (0 first).
      test_bce: the test BCE at those steps.
      seconds: training time, including the evaluations.
    """

    params: Any
    result: Any
    epochs: np.ndarray
    test_bce: np.ndarray
    seconds: float


def train_autoencoder(
    network: Autoencoder,
    params,
    dataset: data.Dataset,
    *,
    steps: int,
    key: jax.Array,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    progress: bool = True,
) -> TrainedAutoencoder:
    """Minimises the BCE with Adam on shuffled minibatches; test BCE per epoch."""
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    loader = (
        jnp.asarray(b)
        for b in data.batches(dataset.x_train, batch_size=batch_size, seed=seed)
    )
    x_test = jnp.asarray(dataset.x_test)
    test_loss = jax.jit(lambda p: bce(network.apply(p, x_test), x_test))
    steps_per_epoch = max(len(dataset.x_train) // batch_size, 1)

    def eval_fn(step, params, opt_state, metrics):
        del step, opt_state, metrics
        return {"test_bce": test_loss(params)}

    def objective(params, key, batch):
        return loss_fn(params, key, batch, network=network)

    with Timer() as clock:
        result = train(
            objective,
            params,
            optax.adam(learning_rate),
            steps,
            dataloader=loader,
            seed=key,
            eval_fn=eval_fn,
            eval_every=steps_per_epoch,
            log_every=steps_per_epoch,
            progress=progress,
            return_result=True,
        )
    return TrainedAutoencoder(
        result.params,
        result,
        np.asarray(result.evaluations["step"]),
        np.asarray(result.evaluations["test_bce"]),
        clock.seconds,
    )


# ---------------------------------------------------------------------------
# Figure and entry point
# ---------------------------------------------------------------------------


def plot(
    trained,
    originals,
    reconstructions,
    path_images,
    random_images,
    codes,
    labels,
    steps_per_epoch,
):
    """Five panels: BCE, reconstructions, interpolations, random codes, codes."""
    axes_ = axes((22, 4.8), ncols=5, width_ratios=[1.3, 1, 1.4, 1, 1.2])
    train_bce = np.asarray(trained.result.history["bce"])
    window = max(1, min(steps_per_epoch, len(train_bce)))
    smooth = np.convolve(train_bce, np.ones(window) / window, mode="valid")
    axes_[0].plot(
        np.arange(window, len(train_bce) + 1) / steps_per_epoch,
        smooth,
        lw=0.8,
        label="train minibatches (1-epoch mean)",
    )
    axes_[0].plot(
        trained.epochs / steps_per_epoch,
        trained.test_bce,
        "o-",
        ms=2,
        color="C3",
        label="test set",
    )
    high = np.percentile(np.concatenate([smooth, trained.test_bce]), 98)
    axes_[0].set_ylim(min(smooth.min(), trained.test_bce.min()) - 1, high + 1)
    axes_[0].set_xlabel("epoch")
    axes_[0].set_ylabel("BCE per image (nats)")
    axes_[0].set_title("reconstruction loss")
    axes_[0].legend(loc="upper right")

    pairs = np.stack([np.asarray(originals), np.asarray(reconstructions)], axis=1)
    grid = dict(shape=(8, 8), cmap="gray_r", vmin=0.0, vmax=1.0, max_images=None)
    plots.image_grid(pairs.reshape(-1, 64), ax=axes_[1], ncols=8, **grid)
    axes_[1].set_title("test images | reconstructions")
    plots.image_grid(np.asarray(path_images), ax=axes_[2], ncols=10, **grid)
    axes_[2].set_title("interpolations: 0-1, 3-8, 4-9, 2-7")
    plots.image_grid(np.asarray(random_images), ax=axes_[3], ncols=8, **grid)
    axes_[3].set_title("decoded codes c ~ N(mean, cov) of the codes")
    for ax in axes_[1:4]:
        ax.set_facecolor("0.75")
    codes = np.asarray(codes)
    scatter = axes_[4].scatter(codes[:, 0], codes[:, 1], c=labels, cmap="tab10", s=8)
    axes_[4].set_title("test images: codes, by digit")
    axes_[4].figure.colorbar(scatter, ax=axes_[4], ticks=range(10))
    return axes_


def best_of_class(labels, scores, digit: int) -> int:
    """Index of the image of ``digit`` with the lowest score (e.g. its BCE)."""
    candidates = np.flatnonzero(np.asarray(labels) == digit)
    return int(candidates[np.argmin(np.asarray(scores)[candidates])])


def run(
    *,
    steps: int = 3000,
    particles: int = BATCH_SIZE,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
) -> dict[str, float]:
    """Trains the autoencoder, evaluates the test BCE, saves figure and metrics.

    Args:
      steps: optimisation steps (Adam, learning rate 1e-3).
      particles: the minibatch size. A deterministic autoencoder has no
        latent particles; as in ``vae_moons``, the option sets the batch.
      seed: seeds the data split, the initialisation and the shuffling.
      out: output directory; ``autoencoder.png`` and
        ``autoencoder_metrics.json`` are written there.
      progress: show a progress bar; if False, training prints nothing.

    Returns:
      Final metrics as floats: test BCE after and before training, first and
      last training BCE, and the spread of the test codes.
    """
    if steps < 1:
        raise ValueError(f"autoencoder: steps must be at least 1, got {steps}.")
    dataset = data.load_digits(seed=seed)
    if not 1 <= particles <= len(dataset.x_train):
        raise ValueError(
            f"autoencoder: particles (the minibatch size) must be in "
            f"1..{len(dataset.x_train)}, got {particles}."
        )
    report = Report(out, "autoencoder")
    key_init, key_train, key_random = jax.random.split(jax.random.key(seed), 3)
    network = Autoencoder()
    x_test = jnp.asarray(dataset.x_test)
    params0 = network.init(key_init, x_test[:1])
    initial_bce = float(bce(network.apply(params0, x_test), x_test))

    trained = train_autoencoder(
        network,
        params0,
        dataset,
        steps=steps,
        key=key_train,
        batch_size=particles,
        progress=progress,
    )
    params = trained.params
    test_bce = float(bce(network.apply(params, x_test), x_test))

    codes = network.apply(params, x_test, method=Autoencoder.encode)
    logits = network.apply(params, x_test)
    reconstructions = jax.nn.sigmoid(logits[:32])
    # Interpolate between the best-reconstructed test image of each digit.
    per_image = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x_test), axis=-1)
    pairs = [(0, 1), (3, 8), (4, 9), (2, 7)]
    ends = [
        [best_of_class(dataset.y_test, per_image, digit) for digit in pair]
        for pair in pairs
    ]
    path_images = jnp.concatenate(
        [interpolate(network, params, codes[a], codes[b]) for a, b in ends]
    )
    mean, cov = jnp.mean(codes, axis=0), jnp.cov(codes.T)
    random_codes = jax.random.multivariate_normal(key_random, mean, cov, (32,))
    random_images = jax.nn.sigmoid(
        network.apply(params, random_codes, method=Autoencoder.decode)
    )
    steps_per_epoch = len(dataset.x_train) // particles
    figure = plot(
        trained,
        x_test[:32],
        reconstructions,
        path_images,
        random_images,
        codes,
        dataset.y_test,
        max(steps_per_epoch, 1),
    )
    report.save_figure(figure)

    train_bce = np.asarray(trained.result.history["bce"])
    code_std = np.asarray(jnp.std(codes, axis=0))
    metrics = {
        "test_bce": test_bce,
        "initial_test_bce": initial_bce,
        "first_train_bce": float(train_bce[0]),
        "last_epoch_train_bce": float(np.mean(train_bce[-max(steps_per_epoch, 1) :])),
        "code_std_0": float(code_std[0]),
        "code_std_1": float(code_std[1]),
        "skipped_steps": float(trained.result.skipped),
    }
    report.write_metrics(
        metrics,
        settings={"steps": steps, "particles": particles, "seed": seed},
        timings={"train_seconds": trained.seconds},
        extras={
            "test_bce_per_epoch": {
                "step": trained.epochs.tolist(),
                "bce": trained.test_bce.tolist(),
            }
        },
    )
    report.summary(
        f"autoencoder: {steps} steps, minibatch {particles}, seed {seed}",
        [
            ("initial test BCE", f"{initial_bce:.3f} nats per image"),
            ("final test BCE", f"{test_bce:.3f}"),
            ("code std", f"{code_std[0]:.3f}, {code_std[1]:.3f}"),
        ],
        metrics,
    )
    return metrics
