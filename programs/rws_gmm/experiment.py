"""The GMM experiment of Le et al. (2019): six estimators, four particle counts.

For each estimator of :mod:`programs.rws_gmm.estimators` and each number
of particles K, :func:`train_sweep` trains the model of
:mod:`programs.rws_gmm.model` from the authors' starting point on a fresh
minibatch of ``B`` points from the true model at every step (Adam), for
several seeds at once (one ``lax.scan`` over steps with the seeds
``vmap``-ed inside, one compilation per estimator and K). At evenly spaced checkpoints
it records, per seed:

* the p-error ``|| softmax(0.5 theta) - pi* ||_2``;
* the q-error ``mean_b || q_phi(. | x_b) - p_theta*(. | x_b) ||_2`` over a
  fixed set of test points drawn from the true model, with the exact
  posterior by enumeration of the 20 components (the paper's measure);
* as a diagnostic, the same distance to the current model's posterior
  ``p_theta(. | x_b)`` (``q_error_model``), which separates how well
  ``q`` tracks its model from how far the model is from the truth;
* the spread of the estimator's gradient in ``phi``: ``grad_draws``
  independent gradient draws on the test points, the standard deviation of
  each of the 644 entries across draws, averaged over entries (the
  authors' measure, with ``ddof=1`` here).

The claim under test: RWS's inference network improves as K grows, while
those of the IWAE-based estimators (REINFORCE, VIMCO, Concrete) get worse.

Run it with ``python -m programs rws_gmm`` (``--help`` lists the options:
``--num-seeds``, ``--estimators``, ``--particle-counts``, ``--smoke``, ...).

References:
  Le, Kosiorek, Siddharth, Teh & Wood (2019), "Revisiting Reweighted
  Wake-Sleep for Models with Stochastic Control Flow", UAI,
  https://arxiv.org/abs/1805.10469; Rainforth et al. (2018), "Tighter
  Variational Bounds are Not Necessarily Better",
  https://arxiv.org/abs/1802.04537.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.ticker import NullLocator

from programs._report import Report, Timer, axes
from programs.rws_gmm.estimators import (
    ESTIMATORS,
    LABELS,
    make_objective,
)
from programs.rws_gmm.model import (
    init_phi,
    initial_theta,
    p_error,
    q_error,
    sample_data,
    true_theta,
)

DESCRIPTION = (
    "Le et al. (2019) 20-component GMM: wake-sleep, RWS, defensive RWS vs "
    "REINFORCE, VIMCO, Concrete; p-error, q-error and phi-gradient sd as K grows"
)

PARTICLE_COUNTS = (2, 5, 10, 20)
BATCH_SIZE = 100
LEARNING_RATE = 1e-3
NUM_SEEDS = 5
NUM_CHECKPOINTS = 20
GRAD_DRAWS = 10
CONCRETE_TEMPERATURES = (3.0, 1.0)  # linear anneal, start -> end (authors' code)
METRICS = ("p_error", "q_error", "q_error_model", "grad_sd")
CURVE_METRICS = ("p_error", "q_error", "grad_sd")
TITLES = {
    "p_error": "p-error",
    "q_error": "q-error",
    "q_error_model": "q-error to p_theta(c|x)",
    "grad_sd": "sd of phi-grad",
}

#: Tiny sizes for tests and the smoke notebook (``run(**SMOKE_CONFIG, out=...)``).
SMOKE_CONFIG = {
    "steps": 20,
    "particles": 5,
    "num_seeds": 2,
    "num_checkpoints": 2,
    "grad_draws": 3,
    "batch_size": 20,
    "fast_compile": True,
}


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def temperature_at(step, steps: int, temperatures=CONCRETE_TEMPERATURES):
    """The Concrete temperature after ``step`` of ``steps`` (linear anneal)."""
    start, end = temperatures
    return start + (end - start) * step / steps


def schedule(num_segments: int, segment_steps: int, grad_draws: int) -> np.ndarray:
    """The iterations of one training run, as rows ``(step, checkpoint, draw)``.

    Checkpoint ``c`` (after ``c * segment_steps`` steps) is ``grad_draws``
    gradient draws at fixed parameters (``draw`` from 0), followed, but for
    the last checkpoint, by ``segment_steps`` Adam steps (``draw = -1``).
    ``step`` is the number of Adam steps taken before the iteration.
    """
    rows = []
    for c in range(num_segments + 1):
        step = c * segment_steps
        rows += [(step, c, r) for r in range(grad_draws)]
        if c < num_segments:
            rows += [(step + i, c, -1) for i in range(segment_steps)]
    return np.asarray(rows, dtype=np.int32)


def _train_seeds_fn(
    keys,
    *,
    name: str,
    num_particles: int,
    num_segments: int,
    segment_steps: int,
    batch_size: int,
    learning_rate: float,
    grad_draws: int,
    temperatures: tuple[float, float],
):
    """Trains every seed: metrics ``(S, checkpoints)`` and skipped steps ``(S,)``.

    One ``lax.scan`` runs :func:`schedule`: every iteration computes one
    gradient of the estimator's objective per seed (``vmap`` over seeds),
    with its own key folded from the seed's key and the iteration, on a
    fresh minibatch for a training step, on the seed's fixed ``B`` test
    points for a gradient draw. Training steps apply Adam (a step with a
    non-finite gradient is skipped); draws update a running mean and
    variance of the ``phi`` gradient (Welford), and the last draw of a
    checkpoint records the metrics of :data:`METRICS`. The branch
    conditions are unbatched (the ``vmap`` is inside), so each
    ``lax.cond`` runs one branch, and the program holds a single copy of
    the gradient computation, which keeps the compile time down.
    """
    steps = num_segments * segment_steps
    theta_star = true_theta()
    objective = make_objective(name, num_particles)
    optimizer = optax.adam(learning_rate)

    def setup(key):
        key_init, key_test, key_run = jax.random.split(key, 3)
        params = {"p": initial_theta(), "q": init_phi(key_init)}
        x_test = sample_data(key_test, theta_star, batch_size)
        return params, optimizer.init(params), x_test, key_run

    params, opt_state, x_test, run_keys = jax.vmap(setup)(keys)

    def gradient(params, x_test, key_run, index, row):
        step, draw = row[0], row[2]
        key_data, key_loss = jax.random.split(jax.random.fold_in(key_run, index))
        x = jnp.where(draw >= 0, x_test, sample_data(key_data, theta_star, batch_size))
        temperature = temperature_at(step, steps, temperatures)
        return jax.grad(lambda p: objective(p, key_loss, x, temperature)[0])(params)

    def adam(params, opt_state, grads):
        leaves = jax.tree_util.tree_leaves(grads)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
        updates, new_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = functools.partial(jnp.where, finite)
        params = jax.tree_util.tree_map(keep, new_params, params)
        opt_state = jax.tree_util.tree_map(keep, new_state, opt_state)
        return params, opt_state, 1 - finite.astype(jnp.int32)

    def welford(moments, grads, draw):
        count, mean, m2 = moments
        g = jnp.concatenate([v.ravel() for v in jax.tree_util.tree_leaves(grads["q"])])
        fresh = draw == 0
        count = jnp.where(fresh, 0, count) + 1
        mean = jnp.where(fresh, 0.0, mean)
        m2 = jnp.where(fresh, 0.0, m2)
        delta = g - mean
        mean = mean + delta / count
        return count, mean, m2 + delta * (g - mean)

    def record(params, x_test, moments):
        count, _, m2 = moments
        return jnp.stack(
            [
                p_error(params["p"], theta_star),
                q_error(params["q"], theta_star, x_test),
                q_error(params["q"], params["p"], x_test),
                jnp.mean(jnp.sqrt(m2 / (count - 1))),
            ]
        )

    def body(carry, inputs):
        index, row = inputs
        params, opt_state, moments, table, skipped = carry
        grads = jax.vmap(gradient, in_axes=(0, 0, 0, None, None))(
            params, x_test, run_keys, index, row
        )

        def train(operands):
            params, opt_state, moments, table, skipped = operands
            params, opt_state, skip = jax.vmap(adam)(params, opt_state, grads)
            return params, opt_state, moments, table, skipped + skip

        def draw(operands):
            params, opt_state, moments, table, skipped = operands
            moments = jax.vmap(welford, in_axes=(0, 0, None))(moments, grads, row[2])

            def store(table):
                rows = jax.vmap(record)(params, x_test, moments)
                return table.at[:, row[1]].set(rows)

            table = jax.lax.cond(row[2] == grad_draws - 1, store, lambda tb: tb, table)
            return params, opt_state, moments, table, skipped

        carry = jax.lax.cond(row[2] < 0, train, draw, carry)
        return carry, None

    num_seeds = keys.shape[0]
    num_phi = sum(v.size for v in jax.tree_util.tree_leaves(params["q"])) // num_seeds
    moments = (
        jnp.zeros((num_seeds,), jnp.int32),
        jnp.zeros((num_seeds, num_phi)),
        jnp.zeros((num_seeds, num_phi)),
    )
    table = jnp.zeros((num_seeds, num_segments + 1, len(METRICS)))
    skipped = jnp.zeros((num_seeds,), jnp.int32)
    rows = jnp.asarray(schedule(num_segments, segment_steps, grad_draws))
    carry = (params, opt_state, moments, table, skipped)
    inputs = (jnp.arange(rows.shape[0]), rows)
    (_, _, _, table, skipped), _ = jax.lax.scan(body, carry, inputs)
    return {m: table[..., i] for i, m in enumerate(METRICS)}, skipped


_STATIC = (
    "name",
    "num_particles",
    "num_segments",
    "segment_steps",
    "batch_size",
    "learning_rate",
    "grad_draws",
    "temperatures",
)
#: XLA options of the sweep: backend optimisation level 1 and no expensive
#: LLVM passes halve the compile time (about 8 s of CPU per estimator and
#: K) against the defaults, for steps at most ~15% slower; level 0 compiles
#: in 6 s but runs 15 times slower.
COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 1,
    "xla_llvm_disable_expensive_passes": True,
}
#: For tiny runs (tests, the smoke notebook): compiles a quarter faster,
#: runs an order of magnitude slower.
FAST_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
_train_seeds = jax.jit(
    _train_seeds_fn, static_argnames=_STATIC, compiler_options=COMPILER_OPTIONS
)
_train_seeds_fast = jax.jit(
    _train_seeds_fn, static_argnames=_STATIC, compiler_options=FAST_COMPILER_OPTIONS
)


def checkpoint_layout(steps: int, num_checkpoints: int) -> tuple[int, int]:
    """``(num_segments, segment_steps)``: the most checkpoints that divide ``steps``.

    At most ``num_checkpoints`` segments of equal length cover the steps.
    """
    n = max(1, min(num_checkpoints, steps))
    while steps % n:
        n -= 1
    return n, steps // n


def train_sweep(
    name: str,
    num_particles: int,
    keys: jax.Array,
    *,
    steps: int,
    num_checkpoints: int = NUM_CHECKPOINTS,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    grad_draws: int = GRAD_DRAWS,
    temperatures: tuple[float, float] = CONCRETE_TEMPERATURES,
    fast_compile: bool = False,
) -> dict[str, np.ndarray]:
    """Trains one estimator at one K for every seed key, in one compiled call.

    Args:
      name: an estimator of :data:`programs.rws_gmm.estimators.ESTIMATORS`.
      num_particles: K.
      keys: one PRNG key per seed, shape ``(S,)``; each seeds the network's
        initialisation, the test points, the minibatches and the gradient
        draws.
      steps: Adam steps.
      num_checkpoints: evaluations after step 0 (reduced to a divisor of
        ``steps``).
      batch_size: B, fresh points from the true model per step; each seed
        also draws B fixed test points for the q-error and the gradient
        draws (the authors use 100 of each).
      learning_rate: Adam's step size.
      grad_draws: gradient draws per checkpoint (at least 2).
      temperatures: the Concrete temperature's linear schedule (start, end).
      fast_compile: compile with :data:`FAST_COMPILER_OPTIONS` (tiny runs).

    Returns:
      ``{"step": (C,), "p_error", "q_error", "q_error_model", "grad_sd":
      (S, C), "skipped": (S,)}`` as numpy arrays, with ``C`` the checkpoints
      including step 0.
    """
    if grad_draws < 2:
        raise ValueError(f"train_sweep: grad_draws must be >= 2, got {grad_draws}.")
    if steps < 1:
        raise ValueError(f"train_sweep: steps must be positive, got {steps}.")
    num_segments, segment_steps = checkpoint_layout(steps, num_checkpoints)
    train_fn = _train_seeds_fast if fast_compile else _train_seeds
    curves, skipped = train_fn(
        keys,
        name=name,
        num_particles=num_particles,
        num_segments=num_segments,
        segment_steps=segment_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        grad_draws=grad_draws,
        temperatures=tuple(float(t) for t in temperatures),
    )
    result = {m: np.asarray(v) for m, v in curves.items()}
    result["step"] = segment_steps * np.arange(num_segments + 1)
    result["skipped"] = np.asarray(skipped)
    return result


# ---------------------------------------------------------------------------
# Summaries and figure
# ---------------------------------------------------------------------------


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error over the first axis (seeds)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    se = values.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else 0.0 * values[0]
    return values.mean(axis=0), se


def final_table(results: dict) -> dict[str, float]:
    """Final-checkpoint means and standard errors, ``<est>_K<k>_<metric>[_se]``."""
    table = {}
    for (name, k), curves in results.items():
        for m in METRICS:
            mean, se = mean_se(curves[m][:, -1])
            table[f"{name}_K{k}_{m}"] = float(mean)
            table[f"{name}_K{k}_{m}_se"] = float(se)
    return table


def load_results(path: str) -> tuple[dict, dict]:
    """The record written by :func:`run` and its curves keyed by ``(estimator, K)``.

    Args:
      path: ``<out>/rws_gmm_metrics.json``.

    Returns:
      ``(record, results)``: the JSON record, and numpy curves in the layout
      of :func:`train_sweep`'s result, as :func:`plot` takes them.
    """
    with open(path) as f:
        record = json.load(f)
    results = {}
    for name in record["estimators"]:
        for k in record["particle_counts"]:
            curves = record["curves"][f"{name}_K{k}"]
            results[(name, k)] = {m: np.asarray(v) for m, v in curves.items()}
    return record, results


def compare_extremes(
    metrics: dict, name: str, particle_counts: Sequence[int], metric: str = "q_error"
) -> tuple[float, float, str]:
    """How a final metric changes from the smallest to the largest K.

    Args:
      metrics: :func:`run`'s result (final means and standard errors).
      name: the estimator.
      particle_counts: the K that were run.
      metric: one of :data:`METRICS`.

    Returns:
      ``(difference, se, verdict)``: the mean at the largest K minus the
      mean at the smallest, its standard error (independent seeds per K),
      and ``"lower"`` or ``"higher"`` when the difference is beyond two
      standard errors, else ``"no clear change"``.
    """
    k_min, k_max = min(particle_counts), max(particle_counts)
    low, high = f"{name}_K{k_min}_{metric}", f"{name}_K{k_max}_{metric}"
    difference = metrics[high] - metrics[low]
    se = math.hypot(metrics[f"{high}_se"], metrics[f"{low}_se"])
    if difference < -2 * se:
        verdict = "lower"
    elif difference > 2 * se:
        verdict = "higher"
    else:
        verdict = "no clear change"
    return difference, se, verdict


def plot(results: dict, estimators: Sequence[str], particle_counts: Sequence[int]):
    """Curves per K (rows: p-error, q-error, grad sd) and final values against K.

    Each curve is the mean over seeds with a band of one standard error;
    the last row has the final checkpoint's means with standard-error bars,
    the q-error to the current model's posterior included.
    """
    ncols = max(len(particle_counts), len(METRICS))
    ax = axes((4.2 * ncols, 13.5), nrows=4, ncols=ncols, squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(ESTIMATORS)}
    for col in range(ncols):
        if col >= len(particle_counts):
            for row in range(len(CURVE_METRICS)):
                ax[row, col].set_axis_off()
            continue
        k = particle_counts[col]
        for row, m in enumerate(CURVE_METRICS):
            a = ax[row, col]
            for name in estimators:
                curves = results[(name, k)]
                mean, se = mean_se(curves[m])
                a.plot(curves["step"], mean, color=colors[name], label=LABELS[name])
                a.fill_between(
                    curves["step"], mean - se, mean + se, color=colors[name], alpha=0.2
                )
            a.set_yscale("log")
            a.set_title(f"{TITLES[m]}, K = {k}")
            a.set_xlabel("iteration")
    ax[0, 0].legend(fontsize=8)
    for col, m in enumerate(METRICS):
        a = ax[3, col]
        for name in estimators:
            finals = np.stack([results[(name, k)][m][:, -1] for k in particle_counts])
            mean, se = mean_se(finals.T)
            a.errorbar(
                particle_counts,
                mean,
                yerr=se,
                marker="o",
                capsize=3,
                color=colors[name],
                label=LABELS[name],
            )
        a.set_xscale("log")
        a.set_yscale("log")
        a.xaxis.set_minor_locator(NullLocator())
        a.set_xticks(list(particle_counts), [str(k) for k in particle_counts])
        a.set_xlabel("K (particles)")
        a.set_ylabel("final value (mean ± SE)")
        a.set_title(f"final {TITLES[m]}")
    for col in range(len(METRICS), ncols):
        ax[3, col].set_axis_off()
    return ax


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _particle_counts(particles: int, particle_counts) -> tuple[int, ...]:
    if particle_counts is not None:
        counts = tuple(int(k) for k in particle_counts)
    else:
        counts = tuple(k for k in PARTICLE_COUNTS if k <= particles)
        if particles not in counts:
            counts = (*counts, particles)
    if not counts or min(counts) < 1:
        raise ValueError(f"rws_gmm: particle counts must be positive, got {counts}.")
    return tuple(sorted(set(counts)))


def run(
    *,
    steps: int = 12_000,
    particles: int = 20,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    estimators: Sequence[str] = ESTIMATORS,
    particle_counts: Sequence[int] | None = None,
    num_seeds: int = NUM_SEEDS,
    num_checkpoints: int = NUM_CHECKPOINTS,
    grad_draws: int = GRAD_DRAWS,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    fast_compile: bool = False,
) -> dict[str, float]:
    """Trains every estimator at every K for several seeds; writes figure and JSON.

    Args:
      steps: Adam steps per run (the paper: 100,000).
      particles: the largest K; the sweep runs the K of (2, 5, 10, 20) up to
        it (and ``particles`` itself).
      seed: the base seed; run ``s`` uses the ``s``-th key split from it.
      out: output folder for ``rws_gmm.png`` and ``rws_gmm_metrics.json``.
      progress: print a line per estimator and K.
      estimators: which of :data:`ESTIMATORS` to run.
      particle_counts: the K to run, overriding ``particles``.
      num_seeds: independent runs per estimator and K (error bars).
      num_checkpoints: evaluations after step 0.
      grad_draws: gradient draws per checkpoint for the gradient's sd.
      batch_size: B, fresh points per step (and fixed test points).
      learning_rate: Adam's step size.
      fast_compile: compile for tiny runs (see :func:`train_sweep`).

    Returns:
      The final checkpoint's metrics as floats, ``<estimator>_K<k>_<metric>``
      (mean over seeds) and ``..._se`` (standard error), metric one of
      ``p_error``, ``q_error``, ``q_error_model``, ``grad_sd``; and
      ``skipped_steps``.
    """
    if steps < 1:
        raise ValueError(f"rws_gmm: steps must be positive, got {steps}.")
    if num_seeds < 1:
        raise ValueError(f"rws_gmm: num_seeds must be positive, got {num_seeds}.")
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"rws_gmm: unknown estimators {unknown}; use {ESTIMATORS}.")
    counts = _particle_counts(particles, particle_counts)
    if "vimco" in estimators and min(counts) < 2:
        raise ValueError("rws_gmm: VIMCO needs K >= 2; drop K = 1 or VIMCO.")
    report = Report(out, "rws_gmm")
    cpu_start = time.process_time()
    keys = jax.random.split(jax.random.key(seed), num_seeds)
    settings = {
        "steps": steps,
        "num_checkpoints": num_checkpoints,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "grad_draws": grad_draws,
    }
    results, seconds = {}, {}
    for name in estimators:
        for k in counts:
            with Timer() as clock:
                results[(name, k)] = train_sweep(
                    name, k, keys, **settings, fast_compile=fast_compile
                )
            seconds[f"{name}_K{k}"] = clock.seconds
            if progress:
                curves = results[(name, k)]
                print(
                    f"  {LABELS[name]:>14} K={k:<3} q-error "
                    f"{np.mean(curves['q_error'][:, -1]):.4f}  p-error "
                    f"{np.mean(curves['p_error'][:, -1]):.4f}  "
                    f"({clock.seconds:.1f} s)",
                    flush=True,
                )
    cpu_seconds = time.process_time() - cpu_start
    report.save_figure(plot(results, list(estimators), counts))
    metrics = final_table(results)
    skipped = sum(int(c["skipped"].sum()) for c in results.values())
    metrics["skipped_steps"] = float(skipped)
    report.write_metrics(
        metrics,
        settings={
            **settings,
            "estimators": list(estimators),
            "particle_counts": list(counts),
            "num_seeds": num_seeds,
            "seed": seed,
            "concrete_temperatures": list(CONCRETE_TEMPERATURES),
        },
        timings={
            "cpu_seconds": cpu_seconds,
            "seconds_per_run": seconds,
        },
        extras={
            "curves": {
                f"{name}_K{k}": {m: np.asarray(v).tolist() for m, v in c.items()}
                for (name, k), c in results.items()
            }
        },
    )
    rows = [
        (
            f"{LABELS[name]}, K={k}",
            f"q-error {metrics[f'{name}_K{k}_q_error']:.4f} ± "
            f"{metrics[f'{name}_K{k}_q_error_se']:.4f}, p-error "
            f"{metrics[f'{name}_K{k}_p_error']:.4f}",
        )
        for name in estimators
        for k in counts
    ]
    rows.append(("CPU time of the sweep", f"{cpu_seconds:.0f} s"))
    report.summary(
        f"rws_gmm: {steps} steps, K in {list(counts)}, {num_seeds} seeds from {seed}",
        rows,
        metrics,
    )
    return metrics
