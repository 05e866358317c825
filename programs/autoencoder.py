"""A deterministic autoencoder on binarised 8x8 digits, for comparison with the VAE.

The same networks as :mod:`programs.digits_vae` (two hidden relu layers of
128 units each way, a 2-D code), but the encoder returns one code
``c = f(x)`` instead of a distribution, there is no prior and no KL term,
and the loss is the binary cross-entropy of the pixels,
``BCE(x, g(c)) = -sum_j [x_j log s_j + (1 - x_j) log(1 - s_j)]`` with
``s = sigmoid(g(c))``: the VAE's reconstruction term with ``z`` fixed at the
code. Training is a plain optax loop (``combinators.train.train``); nothing
here is probabilistic.

The figure shows the loss, reconstructions, a linear interpolation between
the codes of two test digits, decodings of random codes and the codes of
the test set coloured by digit.

Run it with ``python -m programs autoencoder``.

References:
  Hinton & Salakhutdinov (2006), "Reducing the Dimensionality of Data with
  Neural Networks", Science 313.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from combinators import plots
from combinators.train import train
from programs import data
from programs.digits_vae import HIDDEN, LATENT_DIM, Decoder

__all__ = [
    "Autoencoder",
    "DESCRIPTION",
    "bce",
    "interpolate",
    "loss_fn",
    "run",
    "train_autoencoder",
]

DESCRIPTION = (
    "Deterministic autoencoder on binarised 8x8 digits (BCE, optax loop): "
    "reconstructions, latent interpolation"
)

BATCH_SIZE = 100
LEARNING_RATE = 1e-3


class CodeEncoder(nn.Module):
    """``x -> c``: two hidden relu layers, then ``latent_dim`` outputs.

    Attributes:
      latent_dim: dimension of the code.
      hidden: hidden width.
    """

    latent_dim: int = LATENT_DIM
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x):
        """The code of ``x``."""
        h = nn.relu(nn.Dense(self.hidden)(x))
        h = nn.relu(nn.Dense(self.hidden)(h))
        return nn.Dense(self.latent_dim)(h)


class Autoencoder(nn.Module):
    """Encoder ``f`` and decoder ``g``; ``Autoencoder()(x)`` are the logits ``g(f(x))``.

    Attributes:
      latent_dim: dimension of the code.
      hidden: hidden width.
    """

    latent_dim: int = LATENT_DIM
    hidden: int = HIDDEN

    def setup(self):
        """Creates the encoder and decoder."""
        self.encoder = CodeEncoder(self.latent_dim, self.hidden)
        self.decoder = Decoder(64, self.hidden)

    def encode(self, x):
        """The code ``f(x)``."""
        return self.encoder(x)

    def decode(self, c):
        """Pixel logits ``g(c)``."""
        return self.decoder(c)

    def __call__(self, x):
        """Reconstruction logits."""
        return self.decode(self.encode(x))


def bce(logits, x) -> jax.Array:
    """Binary cross-entropy summed over pixels, averaged over images (nats)."""
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=-1))


def loss_fn(params, key: jax.Array, batch, *, network: Autoencoder):
    """``(BCE, metrics)`` of a minibatch, in :func:`combinators.train.train`'s shape.

    The key is unused: the autoencoder is deterministic.
    """
    del key
    loss = bce(network.apply(params, batch), batch)
    return loss, {"loss": loss, "bce": loss}


def interpolate(network: Autoencoder, params, c0, c1, num: int = 10) -> jax.Array:
    """Pixel means decoded along the segment from code ``c0`` to code ``c1``.

    Returns:
      Shape ``(num, 64)``: ``sigmoid(g((1 - t) c0 + t c1))`` for ``t`` in
      ``linspace(0, 1, num)``.
    """
    t = jnp.linspace(0.0, 1.0, num)[:, None]
    codes = (1.0 - t) * jnp.asarray(c0) + t * jnp.asarray(c1)
    return jax.nn.sigmoid(network.apply(params, codes, method=Autoencoder.decode))


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

    tic = time.perf_counter()
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
    seconds = time.perf_counter() - tic
    return TrainedAutoencoder(
        result.params,
        result,
        np.asarray(result.evaluations["step"]),
        np.asarray(result.evaluations["test_bce"]),
        seconds,
    )


# ---------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------


def plot(
    path,
    trained,
    originals,
    reconstructions,
    path_images,
    random_images,
    codes,
    labels,
    steps_per_epoch,
):
    """Saves five panels: BCE, reconstructions, interpolations, random codes, codes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(22, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 5, width_ratios=[1.3, 1, 1.4, 1, 1.2])

    train_bce = np.asarray(trained.result.history["bce"])
    window = max(1, min(steps_per_epoch, len(train_bce)))
    smooth = np.convolve(train_bce, np.ones(window) / window, mode="valid")
    axes[0].plot(
        np.arange(window, len(train_bce) + 1) / steps_per_epoch,
        smooth,
        lw=0.8,
        label="train minibatches (1-epoch mean)",
    )
    axes[0].plot(
        trained.epochs / steps_per_epoch,
        trained.test_bce,
        "o-",
        ms=2,
        color="C3",
        label="test set",
    )
    high = np.percentile(np.concatenate([smooth, trained.test_bce]), 98)
    axes[0].set_ylim(min(smooth.min(), trained.test_bce.min()) - 1, high + 1)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("BCE per image (nats)")
    axes[0].set_title("reconstruction loss")
    axes[0].legend(loc="upper right")

    pairs = np.stack([np.asarray(originals), np.asarray(reconstructions)], axis=1)
    grid = dict(shape=(8, 8), cmap="gray_r", vmin=0.0, vmax=1.0, max_images=None)
    plots.image_grid(pairs.reshape(-1, 64), ax=axes[1], ncols=8, **grid)
    axes[1].set_title("test images | reconstructions")
    plots.image_grid(np.asarray(path_images), ax=axes[2], ncols=10, **grid)
    axes[2].set_title("interpolations: 0-1, 3-8, 4-9, 2-7")
    plots.image_grid(np.asarray(random_images), ax=axes[3], ncols=8, **grid)
    axes[3].set_title("decoded codes c ~ N(mean, cov) of the codes")
    for ax in axes[1:4]:
        ax.set_facecolor("0.75")
    codes = np.asarray(codes)
    scatter = axes[4].scatter(codes[:, 0], codes[:, 1], c=labels, cmap="tab10", s=8)
    axes[4].set_title("test images: codes, by digit")
    fig.colorbar(scatter, ax=axes[4], ticks=range(10))
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


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
    tic = time.perf_counter()
    dataset = data.load_digits(seed=seed)
    if not 1 <= particles <= len(dataset.x_train):
        raise ValueError(
            f"autoencoder: particles (the minibatch size) must be in "
            f"1..{len(dataset.x_train)}, got {particles}."
        )
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

    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, "autoencoder.png")
    steps_per_epoch = len(dataset.x_train) // particles
    plot(
        png,
        trained,
        x_test[:32],
        reconstructions,
        path_images,
        random_images,
        codes,
        dataset.y_test,
        max(steps_per_epoch, 1),
    )

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
    elapsed = time.perf_counter() - tic
    record: dict[str, Any] = {
        "program": "autoencoder",
        "steps": steps,
        "particles": particles,
        "seed": seed,
        "elapsed_seconds": elapsed,
        "train_seconds": trained.seconds,
        "backend": jax.default_backend(),
        "metrics": metrics,
        "test_bce_per_epoch": {
            "step": trained.epochs.tolist(),
            "bce": trained.test_bce.tolist(),
        },
    }
    path = os.path.join(out, "autoencoder_metrics.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)

    finite = all(math.isfinite(v) for v in metrics.values())
    print(f"autoencoder: {steps} steps, minibatch {particles}, seed {seed}")
    print(f"  initial test BCE: {initial_bce:.3f} nats per image")
    print(f"  final test BCE:   {test_bce:.3f}")
    print(f"  code std:         {code_std[0]:.3f}, {code_std[1]:.3f}")
    print(f"  elapsed:          {elapsed:.1f} s")
    print(f"  wrote {png} and {path}" + ("" if finite else "  (non-finite metrics!)"))
    return metrics


if __name__ == "__main__":
    run()
