"""IWAE vs VAE on 8x8 digits: training several seeds, the held-out measures, ``run``.

Reproduces the comparison of Burda, Grosse & Salakhutdinov (2016),
"Importance Weighted Autoencoders", https://arxiv.org/abs/1509.00519
(their Table 1 and Section 5.2), on scikit-learn's 8x8 digits: every
configuration of :data:`~.model.CONFIGURATIONS` (VAE with k = 1, 5, 50
samples averaged; IWAE with k = 5, 50) trains the model of :mod:`.model`
from ``num_seeds`` initialisations with *dynamic binarisation* (each
minibatch is a fresh Bernoulli draw of the grey levels, as in the paper);
then the held-out log-likelihood is estimated with the k = 5000 bound on a
test set binarised once, and the active units are counted.

The paper's claims (MNIST): IWAE's test log-likelihood is higher than
VAE's at the same k and improves with k, while averaging more samples in
the VAE's ELBO helps little; IWAE uses more active latent units.

Within a replicate every configuration starts from the same parameters and
sees the same minibatches and binarisations (common random numbers), so
differences between configurations are paired by replicate. The replicates
of one configuration train together, vectorised with ``jax.vmap``, in one
compiled ``lax.scan``.

Run it with ``python -m programs iwae_digits``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from combinators.train import make_step
from programs import data
from programs._replicates import scan_replicates
from programs._report import Report, axes, standard_error
from programs.iwae_digits.model import (
    ACTIVITY_THRESHOLD,
    CONFIGURATIONS,
    EVAL_PARTICLES,
    init_params,
    make_model,
    make_objective,
    test_bounds,
    unit_activity,
)

DESCRIPTION = (
    "Burda et al. (2016): IWAE vs VAE on 8x8 digits, k in {1, 5, 50}, held-out "
    "k=5000 bound and active units, several seeds"
)

STEPS = 20_000
NUM_SEEDS = 5
#: The paper's minibatch size and Adam settings (its step-size schedule is
#: replaced by a constant step size).
BATCH_SIZE = 20
LEARNING_RATE = 1e-3
ADAM_EPS = 1e-4
#: The training curve is recorded as this many segment means.
NUM_SEGMENTS = 20

#: Tiny sizes for tests (``run(**SMOKE_CONFIG, out=...)``).
SMOKE_CONFIG = {
    "steps": 20,
    "num_seeds": 2,
    "configurations": ("vae_k1", "iwae_k5"),
    "eval_particles": 50,
    "num_test": 20,
    "fast_compile": True,
}


class ConfigResult(NamedTuple):
    """One configuration trained from ``num_seeds`` replicates.

    Attributes:
      name: the configuration (a key of ``CONFIGURATIONS``).
      log_likelihood: held-out ``k = 5000`` bound per image, ``(S,)``.
      elbo: held-out ELBO per image, ``(S,)``.
      activity: per-unit ``Cov_x(E_q[z_u])``, ``(S, latent_dim)``.
      train_bound: the k-sample bound ``log mean_i w_i`` per training image
        (for the VAE configurations too), averaged over each segment of
        training, ``(S, segments)``.
      skipped: steps skipped for a non-finite gradient, ``(S,)``.
      seconds: wall-clock seconds of compilation and training.
    """

    name: str
    log_likelihood: np.ndarray
    elbo: np.ndarray
    activity: np.ndarray
    train_bound: np.ndarray
    skipped: np.ndarray
    seconds: float

    @property
    def active_units(self) -> np.ndarray:
        """Active units per replicate, ``(S,)``."""
        return np.sum(self.activity > ACTIVITY_THRESHOLD, axis=1)


def train_replicates(
    name: str,
    intensities,
    keys: jax.Array,
    steps: int,
    *,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    fast_compile: bool = False,
):
    """Trains configuration ``name`` once per key (vmapped), dynamically binarised.

    Each key is split into an initialisation key and a training key; the
    training key draws, per step, the minibatch indices (without
    replacement), the binarisation ``x ~ Bernoulli(intensities)`` and the
    objective's samples. A step whose gradient is not finite leaves the
    parameters unchanged (:func:`combinators.train.make_step`).

    Args:
      name: a key of :data:`~programs.iwae_digits.model.CONFIGURATIONS`.
      intensities: training grey levels in [0, 1], ``(N, 64)``.
      keys: one key per replicate, ``(S,)``.
      steps: optimisation steps.
      batch_size: images per minibatch.
      learning_rate: Adam's step size.
      fast_compile: compile with XLA's backend optimisation level 0.

    Returns:
      ``(params, train_bound, skipped)``: the trained parameters (leading
      axis ``S``), the per-segment means ``(S, segments)`` of the k-sample
      bound on the minibatches, and the skipped steps ``(S,)``.
    """
    vae = make_model()
    intensities = jnp.asarray(intensities)
    num_train = intensities.shape[0]
    optimizer = optax.adam(learning_rate, eps=ADAM_EPS)
    step = make_step(make_objective(vae, name), optimizer)

    def init(key):
        params = init_params(vae, key)
        return params, optimizer.init(params)

    def body(carry, key):
        params, opt_state = carry
        key_batch, key_binary, key_step = jax.random.split(key, 3)
        index = jax.random.choice(key_batch, num_train, (batch_size,), replace=False)
        x = jax.random.bernoulli(key_binary, intensities[index]).astype(jnp.float32)
        params, opt_state, metrics = step(params, opt_state, key_step, x)
        history = {"bound": metrics["iwae"], "skipped": metrics["skipped"]}
        return (params, opt_state), history

    carry, means, totals = scan_replicates(
        init,
        body,
        keys,
        steps,
        num_segments=NUM_SEGMENTS,
        fast_compile=fast_compile,
    )
    return carry[0], means["bound"], totals["skipped"]


def evaluate_replicates(
    params, key: jax.Array, x_test, eval_particles: int = EVAL_PARTICLES
):
    """Held-out bounds and unit activity of every replicate in ``params``.

    Returns:
      ``(log_likelihood (S,), elbo (S,), activity (S, latent_dim))``, the
      first being the ``eval_particles``-sample bound per image.
    """
    vae = make_model()
    num_seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    rows = []
    for s in range(num_seeds):
        replicate = jax.tree_util.tree_map(lambda leaf, s=s: leaf[s], params)
        bounds = test_bounds(
            vae, replicate, jax.random.fold_in(key, s), x_test, eval_particles
        )
        activity = unit_activity(vae, replicate, x_test)
        rows.append((float(bounds.iwae), float(bounds.elbo), np.asarray(activity)))
    log_likelihood, elbo, activity = zip(*rows, strict=True)
    return np.array(log_likelihood), np.array(elbo), np.stack(activity)


def train_configuration(
    name: str,
    dataset: data.Dataset,
    x_test,
    keys: jax.Array,
    steps: int,
    *,
    eval_key: jax.Array,
    eval_particles: int = EVAL_PARTICLES,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    fast_compile: bool = False,
) -> ConfigResult:
    """Trains ``name`` from every key, then its held-out measures on ``x_test``."""
    tic = time.perf_counter()
    params, train_bound, skipped = train_replicates(
        name,
        dataset.x_train,
        keys,
        steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        fast_compile=fast_compile,
    )
    jax.block_until_ready(params)
    seconds = time.perf_counter() - tic
    log_likelihood, elbo, activity = evaluate_replicates(
        params, eval_key, x_test, eval_particles
    )
    return ConfigResult(
        name,
        log_likelihood,
        elbo,
        activity,
        np.asarray(train_bound),
        np.asarray(skipped),
        seconds,
    )


def paired_difference(
    results: Sequence[ConfigResult], better: str, worse: str
) -> tuple[float, float]:
    """Mean and se over replicates of held-out ``log p(x)``: ``better - worse``."""
    table = {r.name: r for r in results}
    diff = table[better].log_likelihood - table[worse].log_likelihood
    return float(np.mean(diff)), standard_error(diff)


# ---------------------------------------------------------------------------
# Figure and entry point
# ---------------------------------------------------------------------------

COLORS = {"vae": "C1", "iwae": "C0"}
LABELS = {"vae": "VAE (k samples averaged)", "iwae": "IWAE (k-sample bound)"}


def _by_objective(results: Sequence[ConfigResult]) -> dict[str, list[ConfigResult]]:
    """``{"vae": [...], "iwae": [...]}`` sorted by k; IWAE at k = 1 is VAE's."""
    groups: dict[str, list[ConfigResult]] = {"vae": [], "iwae": []}
    for r in results:
        groups[CONFIGURATIONS[r.name][0]].append(r)
    if "vae_k1" in {r.name for r in results} and groups["iwae"]:
        groups["iwae"].append(next(r for r in results if r.name == "vae_k1"))
    for rows in groups.values():
        rows.sort(key=lambda r: CONFIGURATIONS[r.name][1])
    return {k: v for k, v in groups.items() if v}


def plot(results: Sequence[ConfigResult], ax=None):
    """Held-out log p(x) and ELBO, active units against k; per-unit activity.

    Draws on ``ax`` (three axes) if given, else on a new figure; returns the
    axes. Error bars are ±1 standard error over seeds.
    """
    if ax is None:
        ax = axes((16, 4.6), ncols=3)
    for objective, rows in _by_objective(results).items():
        ks = [CONFIGURATIONS[r.name][1] for r in rows]
        style = {"color": COLORS[objective], "capsize": 3}
        ax[0].errorbar(
            ks,
            [r.log_likelihood.mean() for r in rows],
            [standard_error(r.log_likelihood) for r in rows],
            fmt="o-",
            label=f"{LABELS[objective]}: k=5000 bound",
            **style,
        )
        ax[0].errorbar(
            ks,
            [r.elbo.mean() for r in rows],
            [standard_error(r.elbo) for r in rows],
            fmt="s--",
            alpha=0.6,
            label=f"{LABELS[objective]}: ELBO",
            **style,
        )
        ax[1].errorbar(
            ks,
            [r.active_units.mean() for r in rows],
            [standard_error(r.active_units) for r in rows],
            fmt="o-",
            label=LABELS[objective],
            **style,
        )
        last = rows[-1]
        activity = np.sort(last.activity, axis=1)[:, ::-1]  # per replicate
        ax[2].plot(
            np.arange(1, activity.shape[1] + 1),
            np.exp(np.mean(np.log(activity), axis=0)),
            "o-",
            color=COLORS[objective],
            label=f"{last.name} (geometric mean over seeds)",
        )
    ax[0].set_title("held-out log p(x) (k=5000 bound) and ELBO, nats per image")
    ax[1].set_title(f"active units (Cov_x E_q[z_u] > {ACTIVITY_THRESHOLD:g})")
    ax[2].axhline(ACTIVITY_THRESHOLD, color="0.5", ls=":", label="threshold")
    ax[2].set_yscale("log")
    ax[2].set_title("unit activity, sorted (largest k)")
    ax[2].set_xlabel("unit rank")
    for a in ax[:2]:
        a.set_xscale("log")
        a.set_xlabel("k (training samples)")
    for a in ax:
        a.legend(fontsize=8)
    return ax


def run(
    *,
    steps: int = STEPS,
    particles: int = 50,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    num_seeds: int = NUM_SEEDS,
    configurations: Sequence[str] = tuple(CONFIGURATIONS),
    eval_particles: int = EVAL_PARTICLES,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    num_test: int | None = None,
    fast_compile: bool = False,
) -> dict[str, float]:
    """Trains the VAE and IWAE configurations from several seeds; figure and JSON.

    Args:
      steps: Adam steps per run (minibatches of ``batch_size``, dynamically
        binarised).
      particles: the largest k: configurations with more samples are dropped.
      seed: seeds the data split, the test binarisation and the replicates.
      out: output folder for iwae_digits.png and iwae_digits_metrics.json.
      progress: print each configuration's result as it finishes.
      num_seeds: replicates per configuration (at least 2, for error bars).
      configurations: names from ``CONFIGURATIONS`` (vae_k1, vae_k5,
        vae_k50, iwae_k5, iwae_k50).
      eval_particles: samples per test image of the held-out bound (the
        paper's 5000).
      batch_size: images per minibatch (the paper's 20).
      learning_rate: Adam's step size.
      num_test: evaluate on the first num_test test images (all 360 if none).
      fast_compile: compile with XLA's optimisation level 0 (smoke runs).

    Returns:
      Floats: per configuration ``<name>_log_likelihood`` (mean over seeds),
      ``_se``, ``<name>_elbo``, ``<name>_active_units`` and ``_se``; the
      paired gains ``iwae_k<k>_minus_vae_k<k>`` (and ``_se``) where both
      ran, ``iwae_k50_minus_iwae_k5`` and ``vae_k50_minus_vae_k1``; skipped
      steps.
    """
    names = [n for n in configurations if n in CONFIGURATIONS]
    unknown = sorted(set(configurations) - set(CONFIGURATIONS))
    if unknown:
        raise ValueError(
            f"iwae_digits: unknown configurations {unknown}; choose from "
            f"{sorted(CONFIGURATIONS)}."
        )
    names = [n for n in names if CONFIGURATIONS[n][1] <= particles]
    if not names:
        raise ValueError(f"iwae_digits: no configuration with k <= {particles}.")
    if steps < 1:
        raise ValueError(f"iwae_digits: steps must be at least 1, got {steps}.")
    if num_seeds < 2:
        raise ValueError(
            f"iwae_digits: num_seeds must be at least 2 (for error bars), got "
            f"{num_seeds}."
        )
    report = Report(out, "iwae_digits")
    dataset = data.load_digits(seed=seed, binarization=None)
    key_test, key_replicates, key_eval = jax.random.split(jax.random.key(seed), 3)
    x_test = np.asarray(
        jax.random.bernoulli(key_test, jnp.asarray(dataset.x_test[:num_test])),
        dtype=np.float32,
    )
    keys = jax.random.split(key_replicates, num_seeds)
    if progress:
        print(
            f"iwae_digits: {steps} steps, {num_seeds} seeds, {names}, "
            f"k={eval_particles} held-out bound on {len(x_test)} images"
        )
    results = []
    for name in names:
        result = train_configuration(
            name,
            dataset,
            x_test,
            keys,
            steps,
            eval_key=key_eval,
            eval_particles=eval_particles,
            batch_size=batch_size,
            learning_rate=learning_rate,
            fast_compile=fast_compile,
        )
        results.append(result)
        if progress:
            print(
                f"  {name:9s}: log p(x) >= {result.log_likelihood.mean():8.3f} ± "
                f"{standard_error(result.log_likelihood):.3f}, ELBO "
                f"{result.elbo.mean():8.3f}, active units "
                f"{result.active_units.mean():4.1f}  ({result.seconds:5.1f} s)"
            )

    metrics: dict[str, float] = {
        "skipped_steps": float(sum(np.sum(r.skipped) for r in results)),
    }
    for r in results:
        metrics[f"{r.name}_log_likelihood"] = float(np.mean(r.log_likelihood))
        metrics[f"{r.name}_log_likelihood_se"] = standard_error(r.log_likelihood)
        metrics[f"{r.name}_elbo"] = float(np.mean(r.elbo))
        metrics[f"{r.name}_active_units"] = float(np.mean(r.active_units))
        metrics[f"{r.name}_active_units_se"] = standard_error(r.active_units)
    ran = {r.name for r in results}
    pairs = [(f"iwae_k{k}", f"vae_k{k}") for k in (5, 50)]
    pairs += [("iwae_k50", "iwae_k5"), ("vae_k50", "vae_k1"), ("iwae_k50", "vae_k1")]
    rows = []
    for better, worse in pairs:
        if better in ran and worse in ran:
            gain, gain_se = paired_difference(results, better, worse)
            metrics[f"{better}_minus_{worse}"] = gain
            metrics[f"{better}_minus_{worse}_se"] = gain_se
            rows.append(
                (f"{better} - {worse}", f"{gain:+.3f} ± {gain_se:.3f} nats (paired)")
            )

    report.save_figure(plot(results))
    report.write_metrics(
        metrics,
        settings={
            "steps": steps,
            "particles": particles,
            "configurations": names,
            "num_seeds": num_seeds,
            "eval_particles": eval_particles,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "num_test": len(x_test),
            "seed": seed,
        },
        timings={"train_seconds": float(sum(r.seconds for r in results))},
        extras={
            "runs": [
                {
                    "name": r.name,
                    "log_likelihood": r.log_likelihood.tolist(),
                    "elbo": r.elbo.tolist(),
                    "activity": r.activity.tolist(),
                    "train_bound": r.train_bound.tolist(),
                    "seconds": r.seconds,
                }
                for r in results
            ],
        },
    )
    report.summary(
        f"iwae_digits: {steps} steps x {num_seeds} seeds",
        [
            *(
                (
                    r.name,
                    f"log p(x) >= {r.log_likelihood.mean():.3f} ± "
                    f"{standard_error(r.log_likelihood):.3f}, active units "
                    f"{r.active_units.mean():.1f}",
                )
                for r in results
            ),
            *rows,
        ],
        metrics,
    )
    return metrics
