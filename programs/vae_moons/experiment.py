"""Training and evaluating the two-moons VAE of :mod:`programs.vae_moons.model`.

Each training step draws a random minibatch (the particle plate) with the
step's key; the loop is ``combinators.train.train`` (jit-compiled, with a
progress bar). Run it with ``python -m programs vae_moons``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import make_moons

from combinators.train import train
from programs._report import Report, Timer, axes
from programs.vae_moons.model import VAE, loss_fn, program_metrics

DESCRIPTION = "VAE on two moons (Kingma & Welling 2014): compose + propose + elbo_loss"

NUM_TRAIN = 10_000
NUM_TEST = 3_000
NOISE = 0.1
LEARNING_RATE = 1e-2


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


def plot(x_train, recon_before, recon_after, elbo_curve):
    """The four panels: data, reconstructions before and after, ELBO curve.

    Args:
      x_train: training points, shape ``(N, 2)``.
      recon_before: decoder means of encoded test points before training.
      recon_after: the same after training.
      elbo_curve: the minibatch ELBO at each step.

    Returns:
      The four axes.
    """
    ax = axes((16, 4), ncols=4)
    panels = [
        (x_train, "training data", "C0"),
        (recon_before, "reconstructions before training", "C1"),
        (recon_after, "reconstructions after training", "C2"),
    ]
    data = np.asarray(x_train)
    for panel, (points, title, color) in zip(ax, panels, strict=False):
        points = np.asarray(points)
        panel.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, color=color)
        panel.set_title(title)
        both = np.concatenate([data, points])
        low, high = both.min(axis=0) - 0.2, both.max(axis=0) + 0.2
        panel.set_xlim(low[0], high[0])
        panel.set_ylim(low[1], high[1])
    ax[3].plot(np.arange(1, len(elbo_curve) + 1), elbo_curve, lw=0.8, color="C3")
    ax[3].set_title("ELBO (training minibatch)")
    ax[3].set_xlabel("step")
    return ax


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
    """
    if steps < 1:
        raise ValueError(f"vae_moons: steps must be at least 1, got {steps}.")
    if not 1 <= particles <= NUM_TRAIN:
        raise ValueError(
            f"vae_moons: particles (the minibatch size) must be in 1..{NUM_TRAIN}, "
            f"got {particles}."
        )
    report = Report(out, "vae_moons")
    key_init, key_train, key_eval = jax.random.split(jax.random.key(seed), 3)
    x_train, x_test = load_data(seed)

    network = VAE()
    init_params = network.init(key_init, x_train[:1])
    before = evaluate(init_params, key_eval, x_test)
    recon_before = network.apply(init_params, x_test)
    with Timer() as train_clock:
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
    after = evaluate(result.params, key_eval, x_test)
    recon_after = network.apply(result.params, x_test)
    losses = np.asarray(result.history["loss"])
    report.save_figure(plot(x_train, recon_before, recon_after, -losses))

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
    report.write_metrics(
        metrics,
        settings={"steps": steps, "particles": particles, "seed": seed},
        timings={
            "train_seconds": train_clock.seconds,
            "compile_seconds": float(result.history["compile_seconds"][0]),
        },
    )
    report.summary(
        f"vae_moons: {steps} steps, {particles} particles, seed {seed}",
        [
            ("initial test ELBO", f"{before['elbo']:.4f}"),
            ("final test ELBO", f"{after['elbo']:.4f}   (loss {after['loss']:.4f})"),
            (
                "log Z over points",
                f"{after['log_Z']:.4f}   (log of the test points' mean evidence "
                "1/N sum_i p(x_i), one encoder draw per point: not a per-point "
                "bound, so it may exceed the ELBO)",
            ),
            (
                "ESS over points",
                f"{after['ess']:.1f} / {x_test.shape[0]}   (how unequal the "
                "points' weights p(x_i, z_i) / q(z_i | x_i) are; the points are "
                "the particle axis, so a low value is expected, not a degenerate "
                "sampler)",
            ),
        ],
        metrics,
    )
    return metrics
