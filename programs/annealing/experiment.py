"""Training and evaluating the kernels of :mod:`programs.annealing.model`.

Run it with ``python -m programs annealing``.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import combinators
from combinators.util import train
from programs._report import Report, Timer
from programs.annealing.figure import plot
from programs.annealing.model import (
    HIDDEN,
    NUM_TRANSITIONS,
    _num_transitions,
    init_params,
    loss_fn,
    make_program,
)
from programs.annealing.targets import (
    annealing_schedule,
    get_target,
    initial_distribution,
    quadrature_log_normalizer,
)

DESCRIPTION = (
    "Annealed importance sampling with learned kernels, nested VI "
    "(Zimmermann et al. 2021): 8-mode ring, Neal's funnel"
)

TRAIN_PARTICLES = 36  # as in the NVI paper's annealing benchmark
EVAL_PARTICLES = 100_000
TRAIN_STEPS = 30_000
LEARNING_RATE = 1e-3
FINAL_LEARNING_RATE_FRACTION = 0.1  # cosine decay to 10% of the initial rate


def nested_elbo(metrics, algorithm: str = "nvi_rkl") -> jax.Array:
    """``sum_k E[log w_k]``: the levels' ELBOs, estimated from one run.

    Level ``k``'s ELBO is the mean incremental log weight,
    ``E[log w_k] = log(Z_k / Z_{k-1}) - KL(gamma_{k-1} f_k || gamma_k r_k)``
    (normalised densities), so ``log Z - nested_elbo`` estimates the sum of
    the levels' reverse KL divergences, which nested VI with ``nvi_rkl``
    minimises level by level (its surrogate loss has this gradient but not
    this value). For ``nvi_rkl`` the incoming particles are resampled, so
    their log weights all equal the previous ``log Z`` estimate; for
    ``nvi_avo`` the incoming log weights are averaged.

    Args:
      metrics: the metrics of a program from :func:`make_program` (with
        its per-level history).
      algorithm: the algorithm that produced them.

    Returns:
      A scalar.
    """
    history = metrics["history"]
    mean_log_weight = history.records["mean_log_weight"]
    incoming = history.log_Z[:-1] if algorithm == "nvi_rkl" else mean_log_weight[:-1]
    return jnp.sum(mean_log_weight[1:] - incoming)


@functools.partial(
    jax.jit, static_argnames=("num_particles", "target", "algorithm", "num_shown")
)
def sample(
    params,
    key: jax.Array,
    num_particles: int,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
    num_shown: int | None = None,
):
    """Runs the sampler; returns particles, log weights and metrics.

    Args:
      params: kernel parameters.
      key: PRNG key.
      num_particles: the number of particles.
      target: the target's name.
      algorithm: ``"nvi_rkl"`` or ``"nvi_avo"``.
      num_shown: if given, the particles are resampled by their weights
        (``combinators.resample``, systematic) to this many equally
        weighted ones.

    Returns:
      ``(x, log_weight, metrics)``; ``metrics`` are the weighted program's
      (before any final resampling), with the per-level ``history``.
    """
    program = make_program(params, num_particles, target, algorithm=algorithm)
    key_run, key_resample = jax.random.split(key)
    _, trace, metrics = combinators.traced_evaluate(program, seed=key_run)()
    x, log_weight = trace["x"].value, metrics["log_weight"]
    if num_shown is not None:
        equal = combinators.resample(
            combinators.empirical((x,), trace, metrics), num_samples=num_shown
        )
        _, resampled, _ = combinators.traced_evaluate(equal, seed=key_resample)()
        x = resampled["x"].value
        log_weight = jnp.zeros(num_shown)
    return x, log_weight, metrics


def evaluate(
    params,
    key: jax.Array,
    num_particles: int = EVAL_PARTICLES,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
) -> dict[str, float]:
    """The log Z estimate and effective sample size of one run.

    Returns:
      ``{"log_Z", "true_log_Z", "log_Z_error", "ess", "ess_fraction",
      "nested_elbo", "nested_kl", "num_particles"}`` as floats. For
      ``nvi_rkl`` (which resamples before every move) the ESS is that of
      the last level's weights; for ``nvi_avo`` it is that of the whole
      annealing path's weights. ``nested_kl = true_log_Z - nested_elbo``
      estimates the sum of the levels' KL divergences.
    """
    _, _, metrics = sample(params, key, num_particles, target, algorithm)
    spec = get_target(target)
    log_Z, ess = float(metrics["log_Z"]), float(metrics["ess"])
    elbo = float(nested_elbo(metrics, algorithm))
    return {
        "log_Z": log_Z,
        "true_log_Z": spec.log_Z,
        "log_Z_error": log_Z - spec.log_Z,
        "ess": ess,
        "ess_fraction": ess / num_particles,
        "nested_elbo": elbo,
        "nested_kl": spec.log_Z - elbo,
        "num_particles": float(num_particles),
    }


def level_diagnostics(
    params,
    key: jax.Array,
    num_particles: int,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
) -> list[dict[str, float]]:
    """Each level's ``log Z_k`` estimate and ESS, from one run's history.

    Returns:
      One dict per level ``k = 1..K``: ``level``, ``beta``, ``log_Z``,
      ``true_log_Z`` (by :func:`quadrature_log_normalizer`),
      ``ess_fraction`` (that level's weights, or the path's for
      ``nvi_avo``).
    """
    spec = get_target(target)
    num_transitions = _num_transitions(params)
    betas = np.asarray(annealing_schedule(num_transitions, spec.schedule_power))
    _, _, metrics = sample(params, key, num_particles, target, algorithm)
    history = metrics["history"]
    log_Z, ess = np.asarray(history.log_Z), np.asarray(history.ess)
    rows = []
    for level in range(1, num_transitions + 1):
        beta = float(betas[level])
        rows.append(
            {
                "level": float(level),
                "beta": beta,
                "log_Z": float(log_Z[level]),
                "true_log_Z": quadrature_log_normalizer(spec, beta),
                "ess_fraction": float(ess[level]) / num_particles,
            }
        )
    return rows


class TrainingRun(NamedTuple):
    """What :func:`train_kernels` learnt and saw.

    Attributes:
      params: the trained kernel parameters.
      history: per training step, as numpy arrays: ``loss``, ``log_Z`` and
        ``ess`` of the training run's own particles.
      evaluations: periodic evaluations with more particles: arrays
        ``step``, ``log_Z``, ``ess_fraction``, ``nested_elbo``.
      train_seconds: wall-clock time of the training loop (compilation
        included).
      compile_seconds: time of the first step (compilation).
      skipped: steps skipped for a non-finite loss or gradient.
    """

    params: Any
    history: dict
    evaluations: dict
    train_seconds: float
    compile_seconds: float
    skipped: int


def train_kernels(
    key: jax.Array,
    *,
    target: str = "ring",
    algorithm: str = "nvi_rkl",
    num_steps: int = TRAIN_STEPS,
    num_particles: int = TRAIN_PARTICLES,
    learning_rate: float = LEARNING_RATE,
    num_transitions: int = NUM_TRANSITIONS,
    hidden: int = HIDDEN,
    eval_particles: int = 10_000,
    num_evaluations: int = 20,
    local_gradients: bool = True,
    init: Any = None,
    progress: bool = True,
) -> TrainingRun:
    """Trains the forward and reverse kernels with Adam.

    The learning rate decays from ``learning_rate`` to a tenth of it along
    a cosine (optax ``cosine_decay_schedule``); the loop is
    :func:`combinators.util.train` (jit-compiled, progress bar).

    Args:
      key: PRNG key; split into initialisation, training and evaluation keys.
      target: ``"ring"`` or ``"funnel"``.
      algorithm: ``"nvi_rkl"`` or ``"nvi_avo"``.
      num_steps: optimisation steps.
      num_particles: particles per training step.
      learning_rate: Adam's initial learning rate.
      num_transitions: ``K``.
      hidden: the kernels' hidden width.
      eval_particles: particles of the periodic evaluations.
      num_evaluations: how many periodic evaluations (plus one before
        training), all with the same key; 0 for none.
      local_gradients: see :func:`make_program`.
      init: initial parameters (default: :func:`init_params`).
      progress: show a progress bar; if False, nothing is printed.

    Returns:
      A :class:`TrainingRun`.
    """
    if num_steps < 1:
        raise ValueError(f"annealing: num_steps must be at least 1, got {num_steps}.")
    key_init, key_train, key_eval = jax.random.split(key, 3)
    params = (
        init_params(key_init, target, num_transitions, hidden) if init is None else init
    )
    schedule = optax.cosine_decay_schedule(
        learning_rate, num_steps, alpha=FINAL_LEARNING_RATE_FRACTION
    )
    evaluations: dict[str, list] = {
        "step": [],
        "log_Z": [],
        "ess_fraction": [],
        "nested_elbo": [],
    }

    def record(step, current, opt_state, metrics):
        del opt_state, metrics
        # The same key every time (common random numbers): the curve shows
        # changes in the kernels, not Monte Carlo noise.
        _, _, m = sample(current, key_eval, eval_particles, target, algorithm)
        evaluations["step"].append(step)
        evaluations["log_Z"].append(float(m["log_Z"]))
        evaluations["ess_fraction"].append(float(m["ess"]) / eval_particles)
        evaluations["nested_elbo"].append(float(nested_elbo(m, algorithm)))

    with Timer() as clock:
        result = train(
            functools.partial(
                loss_fn,
                num_particles=num_particles,
                target=target,
                algorithm=algorithm,
                local_gradients=local_gradients,
            ),
            params,
            optax.adam(schedule),
            num_steps,
            seed=key_train,
            eval_fn=record if num_evaluations > 0 else None,
            log_every=max(num_steps // max(num_evaluations, 1), 1),
            progress=progress,
            return_result=True,
        )
    history = {k: np.asarray(result.history[k]) for k in ("loss", "log_Z", "ess")}
    return TrainingRun(
        params=result.params,
        history=history,
        evaluations={k: np.asarray(v) for k, v in evaluations.items()},
        train_seconds=clock.seconds,
        compile_seconds=float(result.history["compile_seconds"][0]),
        skipped=int(result.skipped),
    )


def run(
    *,
    steps: int = TRAIN_STEPS,
    particles: int = TRAIN_PARTICLES,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    eval_particles: int = EVAL_PARTICLES,
    target: Literal["ring", "funnel"] = "ring",
    algorithm: Literal["nvi_rkl", "nvi_avo"] = "nvi_rkl",
) -> dict[str, float]:
    """Trains the kernels, evaluates with many particles, saves figure and metrics.

    Args:
      steps: optimisation steps.
      particles: particles per training step (36 in the NVI paper).
      seed: seeds the typed PRNG key.
      out: output directory; ``annealing_<target>.png`` and
        ``annealing_<target>_metrics.json`` are written there.
      progress: show a progress bar; if False, training prints nothing.
      eval_particles: particles of the final evaluation.
      target: ``"ring"`` or ``"funnel"``.
      algorithm: ``"nvi_rkl"`` or ``"nvi_avo"``.

    Returns:
      Final metrics as floats: ``log_Z``, ``true_log_Z``, ``log_Z_error``,
      ``ess_fraction`` and ``nested_kl`` (see :func:`evaluate`) with
      ``eval_particles`` particles, the same before training
      (``initial_*``), first and last training loss, and ``train_seconds``.
    """
    if steps < 1:
        raise ValueError(f"annealing: steps must be at least 1, got {steps}.")
    if particles < 2:
        raise ValueError(f"annealing: particles must be at least 2, got {particles}.")
    spec = get_target(target)
    report = Report(out, f"annealing_{target}", program="annealing")
    key = jax.random.key(seed)
    key_init, key_train, key_before, key_after, key_show = jax.random.split(key, 5)
    init = init_params(key_init, target)
    before = evaluate(init, key_before, eval_particles, target, algorithm)
    training = train_kernels(
        key_train,
        target=target,
        algorithm=algorithm,
        num_steps=steps,
        num_particles=particles,
        init=init,
        progress=progress,
    )
    after = evaluate(training.params, key_after, eval_particles, target, algorithm)

    num_shown = 5_000
    initial = np.asarray(initial_distribution(spec).sample(key_show, (num_shown,)))
    final, _, _ = sample(
        training.params,
        key_show,
        eval_particles,
        target,
        algorithm,
        num_shown=num_shown,
    )
    report.save_figure(plot(target, initial, np.asarray(final), training, particles))

    losses = training.history["loss"]
    metrics = {
        "log_Z": after["log_Z"],
        "true_log_Z": after["true_log_Z"],
        "log_Z_error": after["log_Z_error"],
        "ess_fraction": after["ess_fraction"],
        "nested_kl": after["nested_kl"],
        "initial_log_Z": before["log_Z"],
        "initial_log_Z_error": before["log_Z_error"],
        "initial_ess_fraction": before["ess_fraction"],
        "first_train_loss": float(losses[0]),
        "last_train_loss": float(losses[-1]),
        "train_seconds": training.train_seconds,
        "skipped_steps": float(training.skipped),
    }
    report.write_metrics(
        metrics,
        settings={
            "target": target,
            "algorithm": algorithm,
            "steps": steps,
            "particles": particles,
            "eval_particles": eval_particles,
            "num_transitions": NUM_TRANSITIONS,
            "seed": seed,
        },
        timings={"compile_seconds": training.compile_seconds},
    )
    report.summary(
        f"annealing ({target}, {algorithm}): {steps} steps, "
        f"{particles} particles, seed {seed}",
        [
            (
                "before training",
                f"log Z {before['log_Z']:.4f} (true {spec.log_Z:.4f}), "
                f"ESS {100 * before['ess_fraction']:.1f}% of {eval_particles}",
            ),
            (
                "after training",
                f"log Z {after['log_Z']:.4f} (error {after['log_Z_error']:+.4f}), "
                f"ESS {100 * after['ess_fraction']:.1f}% of {eval_particles}",
            ),
            ("training", f"{training.train_seconds:.1f} s"),
        ],
        metrics,
    )
    return metrics
