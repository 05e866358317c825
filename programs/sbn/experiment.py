"""The sigmoid belief network on binarised 8x8 digits: training, evaluation, ``run``.

The model is :mod:`programs.sbn.model`, the estimators are
:mod:`programs.sbn.estimators`; the data are scikit-learn's 8x8 digits
binarised at 1/2 (:func:`programs.data.load_digits`). Whatever the
estimator, the model is evaluated as the *discrete* SBN: the held-out
log-likelihood is estimated by the K = 1000 importance weighted bound of
Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders",
https://arxiv.org/abs/1509.00519, with ``q`` as proposal, and, since
``2^16`` latent states can be enumerated, computed exactly as well
(:func:`exact_log_likelihood`).

Run it with ``python -m programs sbn`` (VIMCO) or ``python -m programs.sbn
--estimator NAME``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import logsumexp

from combinators import amortized
from combinators.train import train
from programs import data
from programs._report import Report, Timer, axes
from programs.sbn.estimators import (
    FAST_COMPILE,
    Estimator,
    EstimatorName,
    init_baseline,
    make_estimator,
    proposal_gradient_moments,
    signal_to_noise,
)
from programs.sbn.model import SBN, init_params, make_sbn, pixel_logits

DESCRIPTION = (
    "Sigmoid belief network on 8x8 digits, discrete latents: REINFORCE, NVIL, VIMCO, "
    "RWS, wake-sleep or Gumbel-softmax; held-out IWAE bound (K=1000)"
)

BATCH_SIZE = 32
LEARNING_RATE = 3e-3
IWAE_PARTICLES = 1000
VARIANCE_DRAWS = 100
MAX_ENUMERATED_LATENTS = 20


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def exact_log_likelihood(sbn: SBN, p: Mapping, x, chunk: int = 4096) -> jax.Array:
    """``log p(x_n) = log sum_h p(h) p(x_n | h)`` by enumerating all ``2^H`` states.

    The states are visited ``chunk`` at a time with a running log-sum-exp,
    so memory is ``O(chunk * (N + D))``.

    Args:
      sbn: the network (``H <= 20``).
      p: the generative parameters.
      x: binary images, shape ``(N, D)``.
      chunk: states per block (a power of two; reduced to ``2^H`` if larger).

    Returns:
      Shape ``(N,)``.

    Raises:
      ValueError: for more than 20 latent units.
    """
    h_dim = sbn.num_latent
    if h_dim > MAX_ENUMERATED_LATENTS:
        raise ValueError(
            f"exact_log_likelihood: enumerating 2^{h_dim} latent states is too "
            f"expensive; use the IWAE bound (evaluate) for more than "
            f"{MAX_ENUMERATED_LATENTS} units."
        )
    return _exact_log_likelihood(sbn, p, jnp.asarray(x), min(chunk, 2**h_dim))


@functools.partial(jax.jit, static_argnames=("sbn", "chunk"))
def _exact_log_likelihood(sbn, p, x, chunk):
    h_dim = sbn.num_latent
    bits = jnp.arange(h_dim)
    prior = sbn.model.prior(p)

    def block(carry, start):
        index = start + jnp.arange(chunk)
        states = ((index[:, None] >> bits) & 1).astype(x.dtype)  # (S, H)
        logits = pixel_logits(p, states)  # (S, D)
        log_lik = x @ logits.T - jnp.sum(jax.nn.softplus(logits), axis=-1)  # (N, S)
        log_joint = prior.log_prob(states) + log_lik
        return jnp.logaddexp(carry, logsumexp(log_joint, axis=-1)), None

    starts = jnp.arange(0, 2**h_dim, chunk)
    init = jnp.full(x.shape[:1], -jnp.inf)
    total, _ = jax.lax.scan(block, init, starts)
    return total


def evaluate(
    sbn: SBN,
    params: Mapping,
    key: jax.Array,
    x,
    num_particles: int,
    *,
    exact: bool = False,
) -> dict[str, float]:
    """Held-out bounds of the discrete SBN, per image (nats).

    Args:
      sbn: the network.
      params: ``{"p", "q", ...}``.
      key: a PRNG key for the importance samples.
      x: the images, shape ``(N, D)``.
      num_particles: K of the IWAE bound.
      exact: also compute ``log p(x)`` exactly (:func:`exact_log_likelihood`).

    Returns:
      ``{"elbo", "iwae", "ess"}`` (and ``"exact"``): the mean over images of
      the K-sample ELBO estimate, of ``log (1/K) sum_k w_k`` (the IWAE bound,
      below ``log p(x)`` in expectation) and of the ESS of the K weights.
    """
    x = jnp.asarray(x)
    chunk = max(1, min(len(x), 40_000 // max(num_particles, 1) or 1))
    b = amortized.bounds(
        sbn.model,
        sbn.guide,
        amortized.AmortizedParams(p=params["p"], q=params["q"]),
        key,
        x,
        num_particles,
        batch_size=chunk,
    )
    result = {"elbo": float(b.elbo), "iwae": float(b.iwae), "ess": float(b.ess)}
    if exact:
        result["exact"] = float(jnp.mean(exact_log_likelihood(sbn, params["p"], x)))
    return result


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


class TrainedSBN(NamedTuple):
    """The outcome of :func:`train_sbn`.

    Attributes:
      params: the trained parameters.
      result: the :class:`combinators.train.TrainResult` (metric history).
      evaluations: numpy arrays at the checkpoints: ``step``, ``test_iwae``
        (the ``eval_particles``-sample bound on the test set, per image),
        ``test_elbo``, ``test_ess`` (of the ``eval_particles`` weights per
        image, averaged), ``grad_variance``, ``grad_mean_sq`` and ``grad_snr``
        (:func:`proposal_gradient_moments` and :func:`signal_to_noise` on a
        fixed training minibatch).
      train_seconds: wall-clock time of the training steps alone (the
        checkpoint evaluations excluded; compilation included).
      eval_seconds: wall-clock time of the checkpoint evaluations.
    """

    params: Any
    result: Any
    evaluations: dict
    train_seconds: float
    eval_seconds: float


def train_sbn(
    sbn: SBN,
    estimator: Estimator,
    params: Mapping,
    dataset: data.Dataset,
    *,
    steps: int,
    key: jax.Array,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    num_evals: int = 10,
    eval_particles: int = IWAE_PARTICLES,
    variance_draws: int = VARIANCE_DRAWS,
    progress: bool = True,
    fast_compile: bool = False,
) -> TrainedSBN:
    """Trains the SBN with ``estimator`` (Adam, minibatches) and checkpoints it.

    At step 0, every ``steps // num_evals`` steps and at the end, the test
    IWAE bound and the spread of the inference network's gradient (on the
    first ``batch_size`` training images, ``variance_draws`` draws) are
    recorded. Given the same ``key``, two estimators see the same initial
    parameters (the caller's), the same minibatches and the same evaluation
    keys.

    Args:
      sbn: the network.
      estimator: from :func:`make_estimator`.
      params: initial ``{"p", "q"}``; a ``"baseline"`` network is added for
        NVIL if missing (its key is folded from ``key``).
      dataset: train and test images.
      steps: optimisation steps.
      key: a PRNG key.
      batch_size: images per minibatch.
      learning_rate: Adam's step size.
      num_evals: checkpoints after step 0.
      eval_particles: K of the test IWAE bound.
      variance_draws: gradient draws per checkpoint (0 to skip).
      progress: show a progress bar; if False nothing is printed.
      fast_compile: compile the training step and the gradient draws with
        XLA's backend optimisation level 0 (faster compilation, slower
        steps: for short runs).

    Returns:
      A :class:`TrainedSBN`.
    """
    if steps < 1:
        raise ValueError(f"train_sbn: steps must be at least 1, got {steps}.")
    key_data, key_train, key_eval, key_variance, key_baseline = jax.random.split(key, 5)
    params = dict(params)
    if estimator.baseline and "baseline" not in params:
        params["baseline"] = init_baseline(key_baseline, sbn.num_pixels)
    seed = int(jax.random.randint(key_data, (), 0, 2**31 - 1))
    loader = (
        jnp.asarray(b)
        for b in data.batches(dataset.x_train, batch_size=batch_size, seed=seed)
    )
    x_test = jnp.asarray(dataset.x_test)
    x_variance = jnp.asarray(dataset.x_train[:batch_size])
    eval_every = max(steps // max(num_evals, 1), 1)
    eval_seconds = [0.0]

    def eval_fn(step, params, opt_state, metrics):
        del opt_state
        tic = time.perf_counter()
        state = estimator.init_state
        if metrics is not None:
            state = {name: metrics[name] for name in estimator.init_state}
        bounds = evaluate(sbn, params, key_eval, x_test, eval_particles)
        row = {
            "test_iwae": bounds["iwae"],
            "test_elbo": bounds["elbo"],
            "test_ess": bounds["ess"],
        }
        if variance_draws:
            variance, mean_sq = proposal_gradient_moments(
                estimator,
                params,
                state,
                key_variance,
                x_variance,
                variance_draws,
                fast_compile=fast_compile,
            )
            row["grad_variance"] = float(variance)
            row["grad_mean_sq"] = float(mean_sq)
            row["grad_snr"] = signal_to_noise(
                float(variance), float(mean_sq), variance_draws
            )
        eval_seconds[0] += time.perf_counter() - tic
        return row

    with Timer() as clock:
        result = train(
            estimator.loss_fn,
            params,
            optax.adam(learning_rate),
            steps,
            dataloader=loader,
            seed=key_train,
            eval_fn=eval_fn,
            eval_every=eval_every,
            log_every=eval_every,
            progress=progress,
            return_result=True,
            jit_compile=_fast_jit if fast_compile else True,
            **estimator.init_state,
        )
    evaluations = {name: np.asarray(v) for name, v in result.evaluations.items()}
    return TrainedSBN(
        result.params,
        result,
        evaluations,
        clock.seconds - eval_seconds[0],
        eval_seconds[0],
    )


def _fast_jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


# ---------------------------------------------------------------------------
# Figure and entry point
# ---------------------------------------------------------------------------


def plot(sbn: SBN, trained: TrainedSBN, name: str, key: jax.Array, x_test):
    """Four panels: test bound, gradient variance, samples, receptive fields."""
    ax = axes((20, 4.6), ncols=4)
    ev = trained.evaluations
    ax[0].plot(ev["step"], ev["test_iwae"], "o-", ms=3, color="C0")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("nats per image")
    ax[0].set_title(f"{name}: held-out IWAE bound")
    if "grad_variance" in ev:
        ax[1].semilogy(ev["step"], ev["grad_variance"], "o-", ms=3, color="C1")
    ax[1].set_xlabel("step")
    ax[1].set_title("variance of the inference network's gradient")

    p = trained.params["p"]
    h = sbn.model.prior(p).sample(key, (32,))
    means = jax.nn.sigmoid(pixel_logits(p, h))
    pairs = np.stack([np.asarray(x_test[:16]), np.asarray(means[:16])], axis=1)
    ax[2].imshow(data.tile_images(pairs.reshape(-1, 64), columns=8), cmap="gray_r")
    ax[2].set_title("test images | model samples (pixel means)")
    weights = np.asarray(p["W"])
    scale = float(np.max(np.abs(weights))) or 1.0
    ax[3].imshow(
        data.tile_images(weights, columns=8), cmap="RdBu_r", vmin=-scale, vmax=scale
    )
    ax[3].set_title("rows of W: each latent unit's effect on the pixel logits")
    for a in ax[2:]:
        a.set_axis_off()
    return ax


def run(
    *,
    steps: int = 10_000,
    particles: int = 5,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    estimator: EstimatorName = "vimco",
    iwae_particles: int = IWAE_PARTICLES,
    variance_draws: int = VARIANCE_DRAWS,
    fast_compile: bool = False,
) -> dict[str, float]:
    """Trains the SBN with one estimator, evaluates it, saves figure and metrics.

    Args:
      steps: optimisation steps (Adam, minibatches of 32 images).
      particles: K, samples per image in the training objective.
      seed: seeds the data split, initialisation and training.
      out: output directory; ``sbn_<estimator>.png`` and
        ``sbn_<estimator>_metrics.json`` are written there.
      progress: show a progress bar; if False, training prints nothing.
      estimator: one of :data:`ESTIMATORS`.
      iwae_particles: K of the held-out IWAE bound (1000; smaller for smoke
        runs).
      variance_draws: gradient draws per checkpoint for the variance curve.
      fast_compile: compile with XLA's optimisation level 0 (smoke runs).

    Returns:
      Final metrics as floats: the test IWAE bound, ELBO, exact
      log-likelihood and ESS after (and before) training, the gradient
      variance at the last checkpoint, and the skipped steps.
    """
    if steps < 1:
        raise ValueError(f"sbn: steps must be at least 1, got {steps}.")
    if particles < 1 or iwae_particles < 1:
        raise ValueError(
            f"sbn: particles and iwae_particles must be positive, got {particles} "
            f"and {iwae_particles}."
        )
    report = Report(out, f"sbn_{estimator}", program="sbn")
    dataset = data.load_digits(seed=seed)
    key_init, key_train, key_eval, key_plot = jax.random.split(jax.random.key(seed), 4)
    sbn = make_sbn()
    est = make_estimator(estimator, sbn, particles)
    params0 = init_params(sbn, key_init, dataset.x_train.mean(axis=0))
    x_test = jnp.asarray(dataset.x_test)
    before = evaluate(sbn, params0, key_eval, x_test, iwae_particles, exact=True)

    trained = train_sbn(
        sbn,
        est,
        params0,
        dataset,
        steps=steps,
        key=key_train,
        eval_particles=iwae_particles,
        variance_draws=variance_draws,
        progress=progress,
        fast_compile=fast_compile,
    )
    after = evaluate(sbn, trained.params, key_eval, x_test, iwae_particles, exact=True)
    report.save_figure(plot(sbn, trained, estimator, key_plot, x_test))

    ev = trained.evaluations
    metrics = {
        "test_iwae": after["iwae"],
        "test_elbo": after["elbo"],
        "test_log_likelihood": after["exact"],
        "test_ess": after["ess"],
        "initial_test_iwae": before["iwae"],
        "initial_test_elbo": before["elbo"],
        "initial_test_log_likelihood": before["exact"],
        "skipped_steps": float(trained.result.skipped),
    }
    if "grad_variance" in ev:
        metrics["final_grad_variance"] = float(ev["grad_variance"][-1])
    report.write_metrics(
        metrics,
        settings={
            "estimator": estimator,
            "steps": steps,
            "particles": particles,
            "iwae_particles": iwae_particles,
            "num_latent": sbn.num_latent,
            "seed": seed,
        },
        timings={"train_seconds": trained.train_seconds},
        extras={"checkpoints": {name: v.tolist() for name, v in ev.items()}},
    )
    report.summary(
        f"sbn ({estimator}): {steps} steps, {particles} particles, seed {seed}",
        [
            (
                f"initial test IWAE (K={iwae_particles})",
                f"{before['iwae']:.3f} nats per image",
            ),
            (f"final test IWAE (K={iwae_particles})", f"{after['iwae']:.3f}"),
            ("final test ELBO", f"{after['elbo']:.3f}"),
            ("exact test log-likelihood", f"{after['exact']:.3f}"),
        ],
        metrics,
    )
    return metrics
