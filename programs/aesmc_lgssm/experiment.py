"""IWAE vs AESMC (biased and score-gradient resampling) on the LGSSM, against Kalman.

:func:`run` learns ``theta = (a, b)`` of :mod:`programs.aesmc_lgssm.model`
from ``(0, 0)``, jointly with the proposal, by maximising ``log Z-hat`` with
Adam, for every method in :data:`~programs.aesmc_lgssm.model.METHODS` and
several seeds (vmapped), on fresh batches of sequences simulated from the
true model at every step (as in the authors' code). Two proposal settings:

* ``"learned"``: the authors' linear proposal (the paper's experiment);
* ``"bootstrap"``: the transition (an ablation in which IWAE's
  whole-trajectory weights degenerate at once).

Metrics along training, each against the exact answer of the Kalman filter
and RTS smoother (:mod:`programs.lgssm_exact`), with mean and standard
error over seeds:

* ``distance``: ``||(a, |b|) - (0.9, 1)||`` (``b`` is identified up to sign);
* ``log_lik_gap``: ``log p(y | a, b) - log p(y | 0.9, 1)`` per held-out
  sequence (exact, by the Kalman filter);
* ``posterior_l2`` (learned proposal only): the authors' measure of the
  proposal, ``||m_IS - m_RTS||_2`` over ``t``, where ``m_IS`` are the
  smoothing means ``E[x_t | y]`` estimated by importance sampling from the
  learned proposal (no resampling) under the true model, taken with the sign
  of ``b`` that learning chose, and ``m_RTS`` the RTS smoother's, averaged
  over held-out sequences;
* ``ess``: the ESS fraction of each objective's final weights during
  training (IWAE: whole-trajectory weights; SMC: the last step's).

Run it with ``python -m programs.aesmc_lgssm [--smoke]`` (or ``python -m
programs aesmc_lgssm`` once it is in the registry).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from programs._report import Report, Timer, axes
from programs.aesmc_lgssm.model import (
    METHODS,
    TRUE_THETA,
    estimate,
    exact_log_likelihood,
    init_params,
    proposal_smoothing_means,
    simulate,
    smoothing_means,
)

DESCRIPTION = (
    "AESMC/VSMC/FIVO vs IWAE (Le et al. 2018) learning a linear-Gaussian SSM, "
    "biased and score-gradient resampling, against the Kalman filter"
)

#: The proposal settings, in the order of the chains.
SETTINGS = ("learned", "bootstrap")

#: Tiny sizes for tests and the notebook's smoke run (``run(**SMOKE_CONFIG)``).
SMOKE_CONFIG = {
    "steps": 6,
    "particles": 8,
    "time_steps": 8,
    "batch": 2,
    "num_seeds": 2,
    "eval_every": 3,
    "eval_particles": 16,
    "num_test": 2,
}

LABELS = {
    "iwae": "IWAE (no resampling)",
    "aesmc": "AESMC (biased gradient)",
    "aesmc_score": "AESMC + score gradient",
}


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_seeds",
        "num_settings",
        "steps",
        "batch",
        "time_steps",
        "num_test",
    ),
)
def draw_chains(
    key: jax.Array,
    *,
    num_seeds: int,
    num_settings: int,
    steps: int,
    batch: int,
    time_steps: int,
    num_test: int,
):
    """Initial parameters, SMC keys and data of every chain, and the test data.

    Seed ``s`` gives the same initialisation and training batches to every
    method and proposal setting (paired comparisons); the chains are ordered
    setting-major (``c = setting * num_seeds + s``).

    Args:
      key: a PRNG key.
      num_seeds: chains per setting.
      num_settings: proposal settings.
      steps: Adam steps.
      batch: sequences per step.
      time_steps: ``T``.
      num_test: held-out sequences.

    Returns:
      ``(params, smc_keys, ys, test_ys, key_eval)``: :func:`init_params` per
      chain (leaves of shape ``(C,)``), keys of shape ``(C, steps)`` (one per
      chain and step), training observations of shape ``(C, steps, batch,
      T)`` (fresh sequences from the true model at every step), held-out
      sequences of shape ``(num_test, T)`` and a key for the evaluation.
    """
    key_init, key_smc, key_data, key_test, key_eval = jax.random.split(key, 5)
    params = jax.vmap(init_params)(jax.random.split(key_init, num_seeds))
    smc_keys = jax.random.split(key_smc, (num_seeds, steps))
    _, ys = simulate(key_data, time_steps, shape=(num_seeds, steps, batch))
    per_chain = jax.tree.map(
        lambda x: jnp.concatenate([x] * num_settings), (params, smc_keys, ys)
    )
    _, test_ys = simulate(key_test, time_steps, shape=(num_test,))
    return (*per_chain, test_ys, key_eval)


def train_chains(
    method: str,
    params: dict,
    smc_keys: jax.Array,
    ys: jax.Array,
    bootstrap: jax.Array,
    *,
    particles: int,
    learning_rate: float,
    chunk: int,
) -> dict:
    """Trains one chain per row of the inputs (vmapped) with Adam on ``-log Z-hat``.

    Step ``i`` of chain ``c`` takes an Adam step on ``-mean_b log Z-hat``
    over the batch ``ys[c, i]``. A step whose gradient is not finite leaves
    the parameters (and the optimiser's state) unchanged.

    Args:
      method: one of :data:`~programs.aesmc_lgssm.model.METHODS`.
      params: initial parameters, leaves of shape ``(C,)``.
      smc_keys: PRNG keys, shape ``(C, steps)``.
      ys: training batches, shape ``(C, steps, batch, T)``.
      bootstrap: per-chain proposal setting, booleans of shape ``(C,)``.
      particles: ``K``.
      learning_rate: Adam's step size.
      chunk: steps per compiled call (``steps`` must be a multiple).

    Returns:
      ``{"params": ..., "loss": (C, steps), "ess": (C, steps)}`` as NumPy
      arrays, where every parameter leaf has shape ``(C, steps + 1)`` (the
      initial value first) and ``ess`` is the ESS fraction of the final
      weights (see :func:`~programs.aesmc_lgssm.model.estimate`).
    """
    optimizer = optax.adam(learning_rate)

    def objective(params, key, ys, is_bootstrap):
        keys = jax.random.split(key, ys.shape[0])
        log_z, ess = jax.vmap(
            lambda k, y: estimate(params, k, y, particles, method, is_bootstrap)
        )(keys, ys)
        return -jnp.mean(log_z), jnp.mean(ess)

    def step(carry, inputs, is_bootstrap):
        params, state = carry
        key, ys = inputs
        (value, ess), grads = jax.value_and_grad(objective, has_aux=True)(
            params, key, ys, is_bootstrap
        )
        updates, new_state = optimizer.update(grads, state, params)
        finite = jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        new_params = optax.apply_updates(params, updates)
        params, state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (new_params, new_state),
            (params, state),
        )
        return (params, state), (value, ess, params)

    def chain_chunk(carry, keys, ys, is_bootstrap):
        return jax.lax.scan(
            lambda c, inputs: step(c, inputs, is_bootstrap), carry, (keys, ys)
        )

    run_chunk = jax.jit(jax.vmap(chain_chunk))
    steps = smc_keys.shape[1]
    carry = (params, jax.vmap(optimizer.init)(params))
    losses, esses = [], []
    history = [jax.tree.map(lambda x: np.asarray(x)[:, None], params)]
    for first in range(0, steps, chunk):
        window = slice(first, first + chunk)
        carry, (value, ess, path) = run_chunk(
            carry, smc_keys[:, window], ys[:, window], bootstrap
        )
        losses.append(np.asarray(value))
        esses.append(np.asarray(ess))
        history.append(jax.tree.map(np.asarray, path))
    return {
        "params": jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *history),
        "loss": np.concatenate(losses, axis=1),
        "ess": np.concatenate(esses, axis=1),
    }


def distance_to_truth(a, b):
    """``||(a, |b|) - (0.9, 1)||`` (the sign of ``b`` is not identified)."""
    return np.hypot(a - TRUE_THETA["a"], np.abs(b) - TRUE_THETA["b"])


def log_likelihoods(a, b, test_ys) -> np.ndarray:
    """Exact ``log p(y | a, b)`` averaged over held-out sequences, shaped like ``a``."""
    flat = _log_likelihoods(jnp.ravel(a), jnp.ravel(b), test_ys)
    return np.asarray(flat, np.float64).reshape(np.shape(a))


@jax.jit
def _log_likelihoods(a, b, test_ys):
    def mean_log_lik(a, b):
        theta = {"a": a, "b": b}
        return jnp.mean(jax.vmap(lambda ys: exact_log_likelihood(theta, ys))(test_ys))

    return jax.vmap(mean_log_lik)(a, b)


def posterior_l2(phi: dict, b, key, test_ys, num_particles: int) -> np.ndarray:
    """The authors' proposal measure at every given parameter set.

    Args:
      phi: proposal parameters, leaves of shape ``(..., )`` (any batch shape).
      b: the learned ``b``, same shape (only its sign is used).
      key: a PRNG key.
      test_ys: held-out sequences, shape ``(R, T)``.
      num_particles: importance samples per sequence.

    Returns:
      ``mean_r ||m_IS - m_RTS||_2`` under the true model with ``b``'s sign,
      shaped like ``b``.
    """
    shape = np.shape(b)
    flat_phi = jax.tree.map(lambda x: jnp.reshape(x, (-1,)), phi)
    values = _posterior_l2(flat_phi, jnp.ravel(b), key, test_ys, num_particles)
    return np.asarray(values, np.float64).reshape(shape)


@functools.partial(jax.jit, static_argnames=("num_particles",))
def _posterior_l2(phi: dict, b, key, test_ys, num_particles: int):
    signs = jnp.where(b < 0, -1.0, 1.0)
    keys = jax.random.split(key, signs.shape[0])
    theta = {"a": jnp.asarray(TRUE_THETA["a"]), "b": jnp.asarray(TRUE_THETA["b"])}
    reference = jax.vmap(lambda ys: smoothing_means(theta, ys))(test_ys)

    def one(args):
        phi, sign, key = args
        # Under (a, -b) every x flips sign: the smoothing means are negated.
        flipped = {"a": theta["a"], "b": sign * theta["b"]}

        def per_sequence(k, ys, means):
            estimate = proposal_smoothing_means(flipped, phi, k, ys, num_particles)
            return jnp.linalg.norm(estimate - sign * means)

        test_keys = jax.random.split(key, test_ys.shape[0])
        return jnp.mean(jax.vmap(per_sequence)(test_keys, test_ys, reference))

    return jax.lax.map(one, (phi, signs, keys))


def mean_se(values: np.ndarray):
    """Mean and standard error over the leading (seed) axis."""
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    se = values.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else 0.0 * values[0]
    return values.mean(axis=0), se


def _band(ax, x, values, color, label):
    mean, se = mean_se(values)
    ax.plot(x, mean, color=color, lw=1.2, label=label)
    ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.25, lw=0)


def plot(curves: dict, settings: tuple, eval_steps: np.ndarray, true_log_lik: float):
    """One row per proposal setting: distance, log-likelihood gap, L2 or (a, |b|), ESS.

    Args:
      curves: ``curves[setting][method]`` with ``"distance"``,
        ``"log_lik_gap"``, ``"ess"``, ``"a"``, ``"b"`` of shape ``(S, steps
        [+ 1])`` and, for ``"learned"``, ``"posterior_l2"`` of shape ``(S,
        len(eval_steps))``.
      settings: the rows.
      eval_steps: the steps at which ``posterior_l2`` was measured.
      true_log_lik: ``log p(y | theta_true)`` per held-out sequence.

    Returns:
      The axes, shape ``(len(settings), 4)``.
    """
    ax = axes((20, 4.2 * len(settings)), nrows=len(settings), ncols=4, squeeze=False)
    for row, setting in enumerate(settings):
        for index, (method, curve) in enumerate(curves[setting].items()):
            color, label = f"C{index}", LABELS[method]
            steps = np.arange(curve["distance"].shape[1])
            _band(ax[row, 0], steps, curve["distance"], color, label)
            _band(ax[row, 1], steps, curve["log_lik_gap"], color, label)
            if setting == "learned":
                _band(ax[row, 2], eval_steps, curve["posterior_l2"], color, label)
            else:
                _band(ax[row, 2], steps, curve["a"], color, f"a, {label}")
                _band(ax[row, 2], steps, np.abs(curve["b"]), color, None)
            _band(ax[row, 3], steps[:-1], curve["ess"], color, label)
        ax[row, 0].set_title(f"{setting} proposal: ||(a, |b|) - (0.9, 1)||")
        ax[row, 0].set_yscale("log")
        ax[row, 1].set_title(
            f"exact log p(y|a,b) - log p(y|true) per sequence\n"
            f"(log p(y|true) = {true_log_lik:.1f})"
        )
        ax[row, 1].set_yscale("symlog", linthresh=1.0)
        if setting == "learned":
            ax[row, 2].set_title("L2 of IS smoothing means vs RTS (true model)")
            ax[row, 2].set_yscale("log")
        else:
            ax[row, 2].set_title("a (rising to 0.9) and |b| (to 1)")
            for value in TRUE_THETA.values():
                ax[row, 2].axhline(value, color="k", lw=0.6, ls=":")
        ax[row, 3].set_title("ESS / K of the objective's final weights")
        ax[row, 3].set_ylim(0.0, 1.05)
        for column in range(4):
            ax[row, column].set_xlabel("Adam step")
        ax[row, 0].legend(fontsize=8)
    return ax


def run(
    *,
    steps: int = 500,
    particles: int = 100,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    time_steps: int = 200,
    batch: int = 10,
    num_seeds: int = 5,
    learning_rate: float = 0.01,
    eval_every: int = 25,
    eval_particles: int = 1000,
    num_test: int = 10,
    bootstrap: bool = True,
) -> dict[str, float]:
    """Trains every method on every proposal setting and seed; writes figure and JSON.

    Args:
      steps: Adam steps per chain (rounded up to a multiple of eval_every).
      particles: K, particles of every training objective.
      seed: seeds the chains (initialisation, data, SMC) and the test data.
      out: output folder for ``aesmc_lgssm.png`` and ``aesmc_lgssm_metrics.json``.
      progress: print each method's training time.
      time_steps: T, the length of every sequence.
      batch: sequences per Adam step, drawn afresh from the true model.
      num_seeds: independent chains per method and setting (error bars).
      learning_rate: Adam's step size.
      eval_every: Adam steps between evaluations of the proposal measure.
      eval_particles: importance samples of the proposal measure.
      num_test: held-out sequences for the exact log-likelihood and the
        proposal measure.
      bootstrap: run the bootstrap-proposal ablation too (``--no-bootstrap``:
        the learned proposal only).

    Returns:
      The final metrics as floats: per setting and method, the mean and
      standard error over seeds of ``distance``, ``log_lik_gap``,
      ``posterior_l2`` (learned proposal) and ``ess``.
    """
    if steps < 1 or particles < 2 or time_steps < 2 or num_seeds < 2 or batch < 1:
        raise ValueError(
            "aesmc_lgssm: need steps >= 1, particles >= 2, time_steps >= 2, "
            f"num_seeds >= 2 and batch >= 1, got {steps}, {particles}, "
            f"{time_steps}, {num_seeds}, {batch}."
        )
    steps = eval_every * math.ceil(steps / eval_every)
    report = Report(out, "aesmc_lgssm")
    settings = SETTINGS if bootstrap else SETTINGS[:1]
    is_bootstrap = np.repeat([s == "bootstrap" for s in settings], num_seeds)
    params, smc_keys, train_ys, test_ys, key_eval = draw_chains(
        jax.random.key(seed),
        num_seeds=num_seeds,
        num_settings=len(settings),
        steps=steps,
        batch=batch,
        time_steps=time_steps,
        num_test=num_test,
    )
    trained, timings = {}, {}
    for method in METHODS:
        with Timer() as clock:
            trained[method] = train_chains(
                method,
                params,
                smc_keys,
                train_ys,
                is_bootstrap,
                particles=particles,
                learning_rate=learning_rate,
                chunk=eval_every,
            )
        timings[f"train_{method}_seconds"] = clock.seconds
        if progress:
            print(f"aesmc_lgssm: trained {method} in {clock.seconds:.1f} s")

    eval_steps = np.arange(0, steps + 1, eval_every)
    curves: dict = {setting: {} for setting in settings}
    with Timer() as eval_clock:
        # One compiled call per measure for every method, seed and step.
        a = np.stack([trained[m]["params"]["theta"]["a"] for m in METHODS])
        b = np.stack([trained[m]["params"]["theta"]["b"] for m in METHODS])
        log_lik = log_likelihoods(
            np.append(a.ravel(), TRUE_THETA["a"]),
            np.append(b.ravel(), TRUE_THETA["b"]),
            test_ys,
        )
        true_log_lik = float(log_lik[-1])
        gap = log_lik[:-1].reshape(a.shape) - true_log_lik
        learned = slice(0, num_seeds)  # the "learned" chains come first
        phi = jax.tree.map(
            lambda *xs: np.stack([x[learned][:, eval_steps] for x in xs]),
            *[trained[m]["params"]["phi"] for m in METHODS],
        )
        l2 = posterior_l2(
            phi, b[:, learned][:, :, eval_steps], key_eval, test_ys, eval_particles
        )
        for i, method in enumerate(METHODS):
            for j, setting in enumerate(settings):
                rows = slice(j * num_seeds, (j + 1) * num_seeds)
                curve = {
                    "a": a[i, rows],
                    "b": b[i, rows],
                    "distance": distance_to_truth(a[i, rows], b[i, rows]),
                    "log_lik_gap": gap[i, rows],
                    "ess": np.asarray(trained[method]["ess"][rows]),
                    "loss": np.asarray(trained[method]["loss"][rows]),
                }
                if setting == "learned":
                    curve["posterior_l2"] = l2[i]
                curves[setting][method] = curve
    timings["evaluation_seconds"] = eval_clock.seconds

    metrics: dict[str, float] = {"true_log_lik": true_log_lik}
    names = ("distance", "log_lik_gap", "posterior_l2", "ess")
    for setting in settings:
        for method, curve in curves[setting].items():
            for name in names:
                if name not in curve:
                    continue
                mean, se = mean_se(curve[name][:, -1])
                metrics[f"{setting}_{method}_{name}_mean"] = float(mean)
                metrics[f"{setting}_{method}_{name}_se"] = float(se)

    report.save_figure(plot(curves, settings, eval_steps, true_log_lik))
    report.write_metrics(
        metrics,
        settings={
            "steps": steps,
            "particles": particles,
            "seed": seed,
            "time_steps": time_steps,
            "batch": batch,
            "num_seeds": num_seeds,
            "learning_rate": learning_rate,
            "eval_every": eval_every,
            "eval_particles": eval_particles,
            "num_test": num_test,
            "proposal_settings": list(settings),
            "true_theta": TRUE_THETA,
        },
        timings=timings,
        extras={
            "eval_steps": eval_steps.tolist(),
            "curves": {
                setting: {
                    method: {name: np.asarray(v).tolist() for name, v in curve.items()}
                    for method, curve in per_method.items()
                }
                for setting, per_method in curves.items()
            },
        },
    )

    def row(setting, method):
        prefix = f"{setting}_{method}"
        text = (
            f"|theta - truth| {metrics[f'{prefix}_distance_mean']:.3f} ± "
            f"{metrics[f'{prefix}_distance_se']:.3f}, log-lik gap "
            f"{metrics[f'{prefix}_log_lik_gap_mean']:.2f} ± "
            f"{metrics[f'{prefix}_log_lik_gap_se']:.2f}"
        )
        if f"{prefix}_posterior_l2_mean" in metrics:
            text += (
                f", L2 {metrics[f'{prefix}_posterior_l2_mean']:.3f} ± "
                f"{metrics[f'{prefix}_posterior_l2_se']:.3f}"
            )
        return (f"{setting} {method}", text)

    report.summary(
        f"aesmc_lgssm: T={time_steps} K={particles} batch={batch} {steps} steps, "
        f"{num_seeds} seeds (mean ± se); log p(y|true) = {true_log_lik:.2f}",
        [row(setting, method) for setting in settings for method in METHODS],
        metrics,
    )
    return metrics
