"""A variational autoencoder on the two-moons data, as importance sampling.

The VAE of Kingma & Welling (2014), "Auto-Encoding Variational Bayes",
https://arxiv.org/abs/1312.6114, written as three programs and two
combinators:

* the prior ``z ~ N(0, I)`` (2-D latent) and the decoder (likelihood)
  ``x ~ N(decoder(z), I)`` are composed into the target ``p(x, z)``;
* the encoder ``q(z | x) = N(encoder(x), 0.01^2 I)`` is the proposal;
* ``propose(target, encoder, loss_fn=elbo_loss)`` weights each proposed
  ``z`` by ``p(x, z) / q(z | x)`` and reports the negative ELBO as its loss.

The particle plate is the data batch: particle ``i`` is the latent of data
point ``i``, so ``--particles`` is the minibatch size. Each training step
draws a random minibatch with the step's key; the loop is
``combinators.train.train`` (jit-compiled, with a progress bar).

Run it with ``python -m programs vae_moons``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from sklearn.datasets import make_moons

import combinators
from combinators.flax_utils import BindModule
from combinators.train import train

__all__ = [
    "DESCRIPTION",
    "VAE",
    "decoder",
    "encoder",
    "evaluate",
    "in_particle_plate",
    "load_data",
    "loss_fn",
    "make_program",
    "prior",
    "run",
]

DESCRIPTION = "VAE on two moons (Kingma & Welling 2014): compose + propose + elbo_loss"

NUM_TRAIN = 10_000
NUM_TEST = 3_000
NOISE = 0.1
HIDDEN = 32
LATENT_DIM = 2
ENCODER_SCALE = 0.01
LEARNING_RATE = 1e-2


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_data(
    seed: int, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST
) -> tuple[jax.Array, jax.Array]:
    """Draws the two-moons train and test sets.

    Args:
      seed: the data seed; the train set uses ``random_state=seed`` and the
        test set ``random_state=seed + 1``, so they are independent draws.
      num_train: number of training points.
      num_test: number of test points.

    Returns:
      ``(x_train, x_test)``, float32 arrays of shape ``(n, 2)``.
    """
    x_train, _ = make_moons(num_train, noise=NOISE, random_state=seed)
    x_test, _ = make_moons(num_test, noise=NOISE, random_state=seed + 1)
    return jnp.asarray(x_train, jnp.float32), jnp.asarray(x_test, jnp.float32)


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    """``Dense(hidden) - relu - Dense(features)``.

    Attributes:
      features: output width.
      hidden: hidden width.
    """

    features: int = LATENT_DIM
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x):
        """Applies the network to the last axis of ``x``."""
        return nn.Dense(self.features)(nn.relu(nn.Dense(self.hidden)(x)))


class VAE(nn.Module):
    """Encoder and decoder networks of the VAE (Kingma & Welling, 2014).

    ``VAE()(x)`` is the reconstruction ``decoder(encoder(x))`` (means only);
    the programs call ``encoder`` and ``decoder`` separately through
    :class:`combinators.flax_utils.BindModule`.

    References:
      Kingma & Welling (2014), https://arxiv.org/abs/1312.6114.
    """

    def setup(self):
        """Creates the two MLPs."""
        self.encoder = MLP(features=LATENT_DIM)
        self.decoder = MLP(features=2)

    def __call__(self, x):
        """Decoder mean of the encoder mean of ``x``."""
        return self.decoder(self.encoder(x))


# ---------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------


def prior(x):
    """The prior program: ``z ~ N(0, I)`` in two dimensions.

    Args:
      x: the data, passed through to the decoder.

    Returns:
      ``(z, x)``, the arguments of :func:`decoder`.

    References:
      Kingma & Welling (2014), https://arxiv.org/abs/1312.6114.
    """
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT_DIM]).to_event(1))
    return z, x


def decoder(network, z, x):
    """The likelihood program: ``x ~ N(decoder(z), I)``, observed.

    Args:
      network: a bound :class:`VAE` (``network.decoder`` is called).
      z: the latents, shape ``(particles, 2)``.
      x: the observed data, shape ``(particles, 2)``.

    Returns:
      ``(x,)``.

    References:
      Kingma & Welling (2014), https://arxiv.org/abs/1312.6114.
    """
    mean = network.decoder(z)
    x = numpyro.sample("x", dist.Normal(mean, 1.0).to_event(1), obs=x)
    return (x,)


def encoder(network, x):
    """The proposal program: ``z ~ q(z | x) = N(encoder(x), 0.01^2 I)``.

    Args:
      network: a bound :class:`VAE` (``network.encoder`` is called).
      x: the data, shape ``(particles, 2)``.

    Returns:
      ``(z,)``.

    References:
      Kingma & Welling (2014), https://arxiv.org/abs/1312.6114.
    """
    loc = network.encoder(x)
    z = numpyro.sample("z", dist.Normal(loc, ENCODER_SCALE).to_event(1))
    return (z,)


def in_particle_plate(program, num_particles: int):
    """Wraps ``program`` in ``numpyro.plate("particle", num_particles, dim=-1)``.

    A plate used as a decorator stores the function it wraps, so each
    program needs a fresh plate.

    Args:
      program: the program to wrap.
      num_particles: the plate's size.

    Returns:
      The wrapped program.
    """
    return numpyro.plate("particle", num_particles, dim=-1)(program)


def make_program(network, num_particles: int):
    """The VAE as an importance sampler: ``propose(p(x, z), q(z | x))``.

    The target is ``compose(decoder, prior)``; the encoder proposes ``z``.
    Both programs sample inside ``numpyro.plate("particle", num_particles,
    dim=-1)``, whose particles are the data points of the batch. The plate
    wraps the target and the proposal themselves (not only the result of
    ``propose``), so that every sample statement is inside it.

    Args:
      network: a bound :class:`VAE`.
      num_particles: the batch size (one particle per data point).

    Returns:
      A weighted program of the data ``x`` whose ``loss`` metric is the
      negative ELBO averaged over the batch.

    References:
      Kingma & Welling (2014), https://arxiv.org/abs/1312.6114.
    """
    target = in_particle_plate(
        combinators.compose(functools.partial(decoder, network), prior, suffix=False),
        num_particles,
    )
    proposal = in_particle_plate(functools.partial(encoder, network), num_particles)
    return combinators.propose(target, proposal, loss_fn=combinators.loss.elbo_loss)


def program_metrics(params, key: jax.Array, x: jax.Array):
    """Runs the VAE program on a batch and returns its metrics.

    Args:
      params: the :class:`VAE` parameters.
      key: a PRNG key for the encoder's samples.
      x: the batch, shape ``(n, 2)``; ``n`` is the number of particles.

    Returns:
      The program's :class:`combinators.Metrics` (``loss`` = negative ELBO).
    """
    program = make_program(BindModule(VAE(), params), x.shape[0])
    _, _, metrics = combinators.traced_evaluate(program, seed=key)(x)
    return metrics


def loss_fn(params, key: jax.Array, *, data: jax.Array, batch_size: int):
    """Negative ELBO of a random minibatch (the training objective).

    Args:
      params: the :class:`VAE` parameters.
      key: the step's key; split into a minibatch key and a program key.
      data: the whole training set, shape ``(N, 2)``.
      batch_size: the minibatch size (= particles).

    Returns:
      ``(loss, metrics)`` as :func:`combinators.train.train` expects.

    References:
      Kingma & Welling (2014), https://arxiv.org/abs/1312.6114.
    """
    key_batch, key_program = jax.random.split(key)
    index = jax.random.choice(key_batch, data.shape[0], (batch_size,), replace=False)
    metrics = program_metrics(params, key_program, data[index])
    return metrics["loss"], metrics


def evaluate(params, key: jax.Array, x: jax.Array) -> dict[str, float]:
    """ELBO, log Z estimate and ESS of the program on a data set.

    Args:
      params: the :class:`VAE` parameters.
      key: a PRNG key for the encoder's samples.
      x: the data set; all of it is one batch (one particle per point).

    Returns:
      ``{"elbo", "loss", "log_Z", "ess"}`` as floats. ``elbo`` is the mean
      per-point ELBO (``-loss``). ``log_Z`` and ``ess`` are the library's
      estimates over the particle axis, which here runs over the data
      points: ``log_Z = log(1/N sum_i w_i)`` estimates the log of the
      *average* evidence ``1/N sum_i p(x_i)``, not ``sum_i log p(x_i)``, and
      the ESS measures how unequal the points' weights are.
    """
    metrics = jax.jit(program_metrics)(params, key, x)
    loss = float(metrics["loss"])
    return {
        "elbo": -loss,
        "loss": loss,
        "log_Z": float(metrics["log_Z"]),
        "ess": float(metrics["ess"]),
    }


# ---------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------


def plot(path: str, x_train, recon_before, recon_after, elbo_curve) -> None:
    """Saves the four-panel figure (data, reconstructions, ELBO curve).

    Uses matplotlib's object-oriented API with the Agg canvas, so no global
    backend is set and no window opens.

    Args:
      path: the PNG file to write.
      x_train: training points, shape ``(N, 2)``.
      recon_before: decoder means of encoded test points before training.
      recon_after: the same after training.
      elbo_curve: the minibatch ELBO at each step.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    panels = [
        (x_train, "training data", "C0"),
        (recon_before, "reconstructions before training", "C1"),
        (recon_after, "reconstructions after training", "C2"),
    ]
    data = np.asarray(x_train)
    for ax, (points, title, color) in zip(axes, panels, strict=False):
        points = np.asarray(points)
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, color=color)
        ax.set_title(title)
        both = np.concatenate([data, points])
        low, high = both.min(axis=0) - 0.2, both.max(axis=0) + 0.2
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
    axes[3].plot(np.arange(1, len(elbo_curve) + 1), elbo_curve, lw=0.8, color="C3")
    axes[3].set_title("ELBO (training minibatch)")
    axes[3].set_xlabel("step")
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def run(
    *,
    steps: int = 1000,
    particles: int = 300,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
) -> dict[str, float]:
    """Trains the VAE, evaluates it on the test set and saves figure and metrics.

    Args:
      steps: optimisation steps (Adam, learning rate 1e-2).
      particles: the minibatch size, i.e. the size of the particle plate.
      seed: seeds the data (``random_state``) and the typed PRNG key.
      out: output directory; ``vae_moons.png`` and ``vae_moons_metrics.json``
        are written there.
      progress: show a progress bar; if False, training prints nothing.

    Returns:
      The final metrics as floats: test ELBO, loss, log Z and ESS, the same
      before training, and the first and last training losses.

    References:
      Kingma & Welling (2014), https://arxiv.org/abs/1312.6114.
    """
    if steps < 1:
        raise ValueError(f"vae_moons: steps must be at least 1, got {steps}.")
    if not 1 <= particles <= NUM_TRAIN:
        raise ValueError(
            f"vae_moons: particles (the minibatch size) must be in 1..{NUM_TRAIN}, "
            f"got {particles}."
        )
    tic = time.perf_counter()
    key = jax.random.key(seed)
    key_init, key_train, key_eval = jax.random.split(key, 3)
    x_train, x_test = load_data(seed)

    network = VAE()
    init_params = network.init(key_init, x_train[:1])
    before = evaluate(init_params, key_eval, x_test)
    recon_before = network.apply(init_params, x_test)

    # train() prints step lines when its bar is off; progress=False is silent.
    silent = (
        contextlib.nullcontext()
        if progress
        else contextlib.redirect_stdout(io.StringIO())
    )
    train_tic = time.perf_counter()
    with silent:
        result = train(
            functools.partial(loss_fn, batch_size=particles),  # static under jit
            init_params,
            optax.adam(LEARNING_RATE),
            steps,
            seed=key_train,
            progress=progress,
            return_result=True,
            data=x_train,
        )
    train_seconds = time.perf_counter() - train_tic

    after = evaluate(result.params, key_eval, x_test)
    recon_after = network.apply(result.params, x_test)
    losses = np.asarray(result.history["loss"])

    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, "vae_moons.png")
    plot(png, x_train, recon_before, recon_after, -losses)

    metrics = {
        "test_elbo": after["elbo"],
        "test_loss": after["loss"],
        "test_log_Z": after["log_Z"],
        "test_ess": after["ess"],
        "initial_test_elbo": before["elbo"],
        "initial_test_loss": before["loss"],
        "initial_test_log_Z": before["log_Z"],
        "first_train_loss": float(losses[0]),
        "last_train_loss": float(losses[-1]),
        "skipped_steps": float(result.skipped),
    }
    elapsed = time.perf_counter() - tic
    record: dict[str, Any] = {
        "program": "vae_moons",
        "steps": steps,
        "particles": particles,
        "seed": seed,
        "elapsed_seconds": elapsed,
        "train_seconds": train_seconds,
        "compile_seconds": float(result.history["compile_seconds"][0]),
        "backend": jax.default_backend(),
        "metrics": metrics,
    }
    path = os.path.join(out, "vae_moons_metrics.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)

    finite = all(math.isfinite(v) for v in metrics.values())
    print(f"vae_moons: {steps} steps, {particles} particles, seed {seed}")
    print(f"  initial test ELBO: {before['elbo']:.4f}")
    print(f"  final test ELBO:   {after['elbo']:.4f}   (loss {after['loss']:.4f})")
    print(f"  log Z:             {after['log_Z']:.4f}")
    print(f"  ESS:               {after['ess']:.1f} / {x_test.shape[0]}")
    print(f"  elapsed:           {elapsed:.1f} s")
    print(f"  wrote {png} and {path}" + ("" if finite else "  (non-finite metrics!)"))
    return metrics
