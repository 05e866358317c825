"""APG on 2-D Gaussian mixtures: simulated data, training, evaluation, ``run``.

The model and the sampler are in :mod:`programs.gmm_apg.model`. Training
draws minibatches of simulated instances and minimises the APG loss with
Adam; evaluation reports, after each number of sweeps, the clustering
accuracy (up to relabelling), the log joint, log Z and the ESS on held-out
instances, for the learned kernels and for two references (exact Gibbs
kernels after the learned initial proposal, and from the prior).

Run it with ``python -m programs gmm_apg``.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax.scipy.stats import norm

import combinators
from combinators.flax_utils import BindModule
from combinators.train import train
from programs._report import Report, Timer
from programs.gmm_apg import model
from programs.gmm_apg.figure import plot
from programs.gmm_apg.model import (
    NOISE_SCALE,
    NUM_CLUSTERS,
    NUM_POINTS,
    PRIOR_SCALE,
    GMMKernels,
    init_params,
    plates,
    target,
)

DESCRIPTION = (
    "APG for 2-D Gaussian mixtures (Wu et al. 2020): apgs with learned Gibbs "
    "kernels (neural sufficient statistics)"
)

NUM_TRAIN = 10_000
NUM_TEST = 500
BATCH = 20  # instances per training step
NUM_SWEEPS = 5
LEARNING_RATE = 3e-3
EVAL_PARTICLES = 20
EVAL_CHUNK = 100  # test instances per evaluation call (bounds memory)
WELL_SEPARATED = 4.0  # minimum distance between true means, in units of sigma


class Data(NamedTuple):
    """Mixture instances with their true latents.

    Attributes:
      x: points, shape ``(instances, N, 2)``.
      c: true assignments, shape ``(instances, N)``.
      mu: true means, shape ``(instances, K, 2)``.
    """

    x: jax.Array
    c: jax.Array
    mu: jax.Array


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def simulate(
    key: jax.Array,
    num_instances: int,
    num_points: int = NUM_POINTS,
    num_clusters: int = NUM_CLUSTERS,
) -> Data:
    """Draws independent mixture instances from the generative model (jitted).

    Returns:
      :class:`Data` with float32 points and means and int32 assignments.
    """
    key_mu, key_c, key_noise = jax.random.split(key, 3)
    mu = PRIOR_SCALE * jax.random.normal(key_mu, (num_instances, num_clusters, 2))
    c = jax.random.randint(key_c, (num_instances, num_points), 0, num_clusters)
    loc = jnp.take_along_axis(mu, c[..., None], axis=-2)
    x = loc + NOISE_SCALE * jax.random.normal(key_noise, loc.shape)
    return Data(x=x, c=c, mu=mu)


def log_joint(x, mu, c):
    """``log p(x, mu, c)`` by hand, summed over points, clusters and dimensions.

    Args:
      x: points ``(..., N, 2)``.
      mu: means ``(..., K, 2)``.
      c: assignments ``(..., N)``.

    Returns:
      The log joint density, shape ``broadcast(...)``.
    """
    num_clusters = mu.shape[-2]
    loc = jnp.take_along_axis(mu, c[..., None], axis=-2)
    return (
        jnp.sum(norm.logpdf(mu, 0.0, PRIOR_SCALE), axis=(-2, -1))
        - c.shape[-1] * jnp.log(num_clusters)
        + jnp.sum(norm.logpdf(x, loc, NOISE_SCALE), axis=(-2, -1))
    )


# ---------------------------------------------------------------------------
# The exact Gibbs kernels: the reference the learned kernels are checked against
# ---------------------------------------------------------------------------


def exact_mean_posterior(x, c):
    """Exact ``p(mu | x, c)``: per-cluster conjugate Gaussian ``(loc, scale)``."""
    one_hot = jax.nn.one_hot(c, NUM_CLUSTERS)  # (..., N, K)
    counts = jnp.sum(one_hot, axis=-2)[..., None]  # (..., K, 1)
    sums = jnp.einsum(
        "...nk,...nd->...kd", one_hot, jnp.broadcast_to(x, c.shape + (2,))
    )
    precision = 1.0 / PRIOR_SCALE**2 + counts / NOISE_SCALE**2
    return sums / NOISE_SCALE**2 / precision, jnp.broadcast_to(
        1.0 / jnp.sqrt(precision), sums.shape
    )


def exact_assignment_logits(x, mu):
    """Exact ``p(c_n | x, mu)`` logits: ``-|x_n - mu_k|^2 / (2 sigma^2)``."""
    diff = x[..., :, None, :] - mu[..., None, :, :]  # (..., N, K, 2)
    return -0.5 * jnp.sum(diff**2, axis=-1) / NOISE_SCALE**2


def exact_kernel_mu(num_particles: int, x, mu=None, c=None, *, initial=None):
    """The exact Gibbs kernel ``p(mu | x, c)``.

    Without ``c`` it is the initial proposal: the prior, or
    ``N(initial(x))`` when a function ``initial(x) -> (loc, scale)`` is
    given (e.g. the learned set encoder).
    """
    del mu
    if c is None and initial is not None:
        loc, scale = initial(x)
    elif c is None:
        loc = jnp.zeros((x.shape[0], NUM_CLUSTERS, 2))
        scale = jnp.full(loc.shape, PRIOR_SCALE)
    else:
        loc, scale = exact_mean_posterior(x, c)
    with plates(num_particles, x.shape[0]):
        mu = numpyro.sample("mu", dist.Normal(loc, scale).to_event(2))
    return x, mu


def exact_kernel_c(num_particles: int, x, mu, c=None):
    """The exact Gibbs kernel ``p(c | x, mu)``."""
    del c
    with plates(num_particles, x.shape[0]):
        c = numpyro.sample(
            "c", dist.Categorical(logits=exact_assignment_logits(x, mu)).to_event(1)
        )
    return x, mu, c


def make_program(params, num_particles: int, num_sweeps, *, exact: bool = False):
    """The APG program of :func:`model.make_program`, or with exact Gibbs kernels.

    Args:
      params: :class:`GMMKernels` parameters, or None for the exact Gibbs
        kernels with the prior as initial proposal.
      num_particles: the size of the particle plate.
      num_sweeps: Gibbs sweeps after the initial proposal.
      exact: with ``params``, the exact Gibbs kernels for the sweeps after
        the learned initial proposal ``q(mu | x)``.

    Returns:
      The program of ``x`` ``(B, N, 2)``, as :func:`model.make_program`.
    """
    if params is not None and not exact:
        return model.make_program(params, num_particles, num_sweeps)
    network = None if params is None else BindModule(GMMKernels(), params)
    initial = None if network is None else network.initial_means
    kernels = [
        functools.partial(exact_kernel_mu, num_particles, initial=initial),
        functools.partial(exact_kernel_c, num_particles),
    ]
    p = functools.partial(target, num_particles)
    return combinators.algo.apgs(p, kernels, num_sweeps=num_sweeps)


def loss_fn(params, key, *, data, batch_size: int, num_particles: int, num_sweeps: int):
    """The APG loss per instance on a random minibatch of ``data`` ``(M, N, 2)``.

    The key is split into a minibatch key and a program key.

    Returns:
      ``(loss, metrics)``.
    """
    key_batch, key_program = jax.random.split(key)
    index = jax.random.choice(key_batch, data.shape[0], (batch_size,), replace=False)
    program = model.make_program(params, num_particles, num_sweeps)
    _, _, metrics = combinators.traced_evaluate(program, seed=key_program)(data[index])
    metrics = metrics.replace(loss=metrics.loss / batch_size)
    return metrics["loss"], metrics


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def clustering_accuracy(c_inferred, c_true):
    """Fraction of points assigned correctly, up to the best relabelling.

    All ``K!`` permutations are tried, vectorised.

    Args:
      c_inferred: inferred assignments ``(..., N)``.
      c_true: true assignments, broadcastable to ``c_inferred``.

    Returns:
      The accuracy of each instance, shape ``(...)``.
    """
    perms = np.asarray(list(itertools.permutations(range(NUM_CLUSTERS))))
    perms = jnp.asarray(perms)  # (K!, K)
    relabelled = perms[:, c_inferred]  # (K!, ..., N)
    correct = jnp.mean(relabelled == c_true, axis=-1)
    return jnp.max(correct, axis=0)


def well_separated(mu) -> np.ndarray:
    """Instances whose true means ``(B, K, 2)`` are all 4 sigma apart: ``(B,)``."""
    mu = np.asarray(mu)
    distances = [
        np.linalg.norm(mu[:, i] - mu[:, j], axis=-1)
        for i, j in itertools.combinations(range(mu.shape[1]), 2)
    ]
    return np.min(distances, axis=0) >= WELL_SEPARATED * NOISE_SCALE


def oracle_accuracy(data: Data):
    """Accuracy of assigning each point to its nearest *true* mean (a ceiling)."""
    nearest = jnp.argmax(exact_assignment_logits(data.x, data.mu), axis=-1)
    return clustering_accuracy(nearest, data.c)


def _summaries(params, key, x, c_true, num_particles, num_sweeps, exact):
    program = make_program(params, num_particles, num_sweeps, exact=exact)
    (_, mu, c), _, metrics = combinators.traced_evaluate(program, seed=key)(x)
    w = jax.nn.softmax(metrics.log_weight, axis=0)  # (P, B)
    return {
        "log_joint": jnp.sum(w * log_joint(x, mu, c), axis=0),
        "accuracy": jnp.sum(w * clustering_accuracy(c, c_true), axis=0),
        "log_Z": jax.scipy.special.logsumexp(metrics.log_weight, axis=0)
        - jnp.log(num_particles),
        "ess": 1.0 / jnp.sum(w**2, axis=0),
        "mu": mu,
        "c": c,
        "weights": w,
    }


# The number of sweeps is a traced argument (the loop becomes a while loop),
# so every number of sweeps shares one compiled function.
_summaries_jit = jax.jit(_summaries, static_argnums=(4, 6))


def evaluate(
    params,
    key: jax.Array,
    data: Data,
    *,
    num_particles: int = EVAL_PARTICLES,
    sweeps=None,
    chunk: int = EVAL_CHUNK,
    exact: bool = False,
):
    """Log joint, clustering accuracy, log Z and ESS after each number of sweeps.

    Every number of sweeps uses the same key, so the run with ``s`` sweeps
    is the first part of the run with ``s + 1``.

    Args:
      params: :class:`GMMKernels` parameters, or None for exact Gibbs.
      key: the evaluation key.
      data: the test instances.
      num_particles: particles per instance.
      sweeps: the numbers of sweeps to evaluate (default ``0..NUM_SWEEPS``).
      chunk: instances per call (the whole set is split into chunks).
      exact: exact Gibbs kernels after the learned initial proposal.

    Returns:
      ``{s: {"log_joint", "accuracy", "log_Z", "ess"}}`` with per-instance
      arrays (log joint and accuracy are weighted means over particles),
      and ``{s: (mu, c, weights)}`` for the first chunk (for plots).
    """
    results, samples = {}, {}
    for s in range(NUM_SWEEPS + 1) if sweeps is None else sweeps:
        parts = []
        for start in range(0, data.x.shape[0], chunk):
            part = _summaries_jit(
                params,
                jax.random.fold_in(key, start),
                data.x[start : start + chunk],
                data.c[start : start + chunk],
                num_particles,
                jnp.asarray(s, jnp.int32),
                exact,
            )
            if start == 0:
                samples[int(s)] = (part["mu"], part["c"], part["weights"])
            parts.append(
                {
                    k: np.asarray(part[k])
                    for k in ("log_joint", "accuracy", "log_Z", "ess")
                }
            )
        results[int(s)] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return results, samples


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def run(
    *,
    steps: int = 1000,
    particles: int = 10,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    num_sweeps: int = NUM_SWEEPS,
    batch_size: int = BATCH,
    num_train: int = NUM_TRAIN,
    num_test: int = NUM_TEST,
) -> dict[str, float]:
    """Trains APG on simulated instances, evaluates it and saves figure and metrics.

    Args:
      steps: optimisation steps (Adam).
      particles: particles per instance during training (evaluation uses
        ``max(particles, 20)``).
      seed: seeds data, initialisation, training and evaluation.
      out: output directory; ``gmm_apg.png`` and ``gmm_apg_metrics.json``.
      progress: show a progress bar; if False, training prints nothing.
      num_sweeps: Gibbs sweeps during training and the largest number
        evaluated.
      batch_size: instances per training step.
      num_train: training instances.
      num_test: held-out test instances.

    Returns:
      The final metrics as floats: test accuracy and mean log joint after 0,
      1 and ``num_sweeps`` sweeps, the accuracy on well-separated instances
      (true means at least 4 sigma apart) and the ceiling set by assigning
      each point to its nearest true mean, log Z and ESS, the same after
      ``num_sweeps`` sweeps for the two references, and the first and last
      training losses.
    """
    if steps < 1:
        raise ValueError(f"gmm_apg: steps must be at least 1, got {steps}.")
    if particles < 1:
        raise ValueError(f"gmm_apg: particles must be at least 1, got {particles}.")
    if num_sweeps < 1:
        raise ValueError(f"gmm_apg: num_sweeps must be at least 1, got {num_sweeps}.")
    report = Report(out, "gmm_apg")
    key = jax.random.key(seed)
    key_train_data, key_test_data, key_init, key_train, key_eval = jax.random.split(
        key, 5
    )
    train_data = simulate(key_train_data, num_train)
    test_data = simulate(key_test_data, num_test)
    params = init_params(key_init)

    with Timer() as train_clock:
        result = train(
            functools.partial(
                loss_fn,
                batch_size=batch_size,
                num_particles=particles,
                num_sweeps=num_sweeps,
            ),
            params,
            optax.adam(LEARNING_RATE),
            steps,
            seed=key_train,
            progress=progress,
            return_result=True,
            data=train_data.x,
        )
    losses = np.asarray(result.history["loss"])

    eval_particles = max(particles, EVAL_PARTICLES)
    sweeps = list(range(num_sweeps + 1))
    evaluate_ = functools.partial(
        evaluate,
        key=key_eval,
        data=test_data,
        num_particles=eval_particles,
        sweeps=sweeps,
    )
    tables = {"learned": evaluate_(result.params)}
    tables["exact"] = evaluate_(result.params, exact=True)
    tables["prior"] = evaluate_(None)
    separated = well_separated(test_data.mu)

    def curve(name, field, subset=None):
        table = tables[name][0]
        return [
            float(
                np.mean(table[s][field] if subset is None else table[s][field][subset])
            )
            for s in sweeps
        ]

    curves = {"sweeps": sweeps}
    for name in tables:
        prefix = "" if name == "learned" else f"{name}_"
        curves[prefix + "accuracy"] = curve(name, "accuracy")
        curves[prefix + "log_joint"] = curve(name, "log_joint")
    curves["log_Z"] = curve("learned", "log_Z")
    curves["ess"] = curve("learned", "ess")
    curves["accuracy_well_separated"] = curve("learned", "accuracy", separated)

    S = num_sweeps
    oracle = np.asarray(oracle_accuracy(test_data))
    true_log_joint = float(np.mean(log_joint(test_data.x, test_data.mu, test_data.c)))
    curves["reference_accuracy"] = float(np.mean(oracle))
    curves["reference_log_joint"] = true_log_joint

    fig = plot(
        test_data, tables["learned"][1], sorted({0, 1, num_sweeps}), curves, losses
    )
    report.save_figure(fig, dpi=90)
    metrics = {
        "test_accuracy": curves["accuracy"][S],
        "test_accuracy_0_sweeps": curves["accuracy"][0],
        "test_accuracy_1_sweep": curves["accuracy"][1],
        "test_accuracy_well_separated": curves["accuracy_well_separated"][S],
        "well_separated_fraction": float(np.mean(separated)),
        "oracle_accuracy": float(np.mean(oracle)),
        "oracle_accuracy_well_separated": float(np.mean(oracle[separated])),
        "test_log_joint": curves["log_joint"][S],
        "test_log_joint_0_sweeps": curves["log_joint"][0],
        "test_log_joint_1_sweep": curves["log_joint"][1],
        "true_latents_log_joint": true_log_joint,
        "test_log_Z": curves["log_Z"][S],
        "test_ess": curves["ess"][S],
        "exact_kernels_accuracy": curves["exact_accuracy"][S],
        "exact_kernels_log_joint": curves["exact_log_joint"][S],
        "prior_init_exact_accuracy": curves["prior_accuracy"][S],
        "prior_init_exact_log_joint": curves["prior_log_joint"][S],
        "first_train_loss": float(losses[0]),
        "last_train_loss": float(np.mean(losses[-max(len(losses) // 20, 1) :])),
        "skipped_steps": float(result.skipped),
    }
    report.write_metrics(
        metrics,
        settings={
            "steps": steps,
            "particles": particles,
            "eval_particles": eval_particles,
            "num_sweeps": num_sweeps,
            "batch_size": batch_size,
            "num_train": num_train,
            "num_test": num_test,
            "seed": seed,
        },
        timings={
            "train_seconds": train_clock.seconds,
            "compile_seconds": float(result.history["compile_seconds"][0]),
        },
        extras={"curves": curves},
    )

    table = [f"{'sweeps':>6} {'APG':>17} {'exact kernels':>17} {'exact, prior':>17}"]
    for s in sweeps:
        table.append(
            f"{s:>6d}"
            + "".join(
                f" {curves[p + 'accuracy'][s]:7.4f} {curves[p + 'log_joint'][s]:9.2f}"
                for p in ("", "exact_", "prior_")
            )
        )
    share = metrics["well_separated_fraction"]
    report.summary(
        f"gmm_apg: {steps} steps, {particles} particles, {num_sweeps} sweeps, "
        f"seed {seed}",
        [
            "accuracy and log joint by number of sweeps:",
            *table,
            (
                f"well-separated instances ({share:.0%})",
                f"accuracy {metrics['test_accuracy_well_separated']:.4f}, nearest "
                f"true mean {metrics['oracle_accuracy_well_separated']:.4f}",
            ),
            ("nearest true mean, all instances", f"{metrics['oracle_accuracy']:.4f}"),
            ("log joint at the true latents", f"{true_log_joint:.2f}"),
            (f"ESS after {S} sweeps", f"{curves['ess'][S]:.1f} / {eval_particles}"),
            ("training", f"{train_clock.seconds:.1f} s"),
        ],
        metrics,
    )
    return metrics
