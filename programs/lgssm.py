"""Particle filters for a linear-Gaussian state-space model, as combinator programs.

The model of :mod:`programs.lgssm_exact`, with ``d``-dimensional states::

    x_0 ~ N(m0, P0),   x_t | x_{t-1} ~ N(A x_{t-1}, Q),   y_t | x_t ~ N(C x_t, R)

is written as one small program per time step. Step ``t``'s target
``p_t(x_prev)`` scores only what the step adds (the transition ``x_t |
x_{t-1}`` and the observation ``y_t``) and a proposal ``k_t(x_prev)``
draws ``x_t``. One SMC step is::

    compose(propose(p_t, k_t), resample(q))

whose weight multiplies the previous step's (nested importance sampling,
Naesseth, Lindsten & Schön 2015), so every step costs O(N) however long the
sequence. :func:`combinators.algo.smc` with callables ``targets(t)`` and
``num_targets = T`` runs the steps in one ``lax.scan``, traced once: ``t`` is
a tracer inside the loop, so the observation ``y_t`` is read with
``lax.dynamic_index_in_dim``.

Two proposals:

* bootstrap: ``k_t = p(x_t | x_{t-1})`` (Gordon, Salmond & Smith 1993); the
  incremental weight is the likelihood ``p(y_t | x_t)``;
* guided: the locally optimal ``k_t = p(x_t | x_{t-1}, y_t)`` (Doucet,
  Godsill & Andrieu 2000), from :func:`programs.lgssm_exact.optimal_proposal`;
  the incremental weight is ``p(y_t | x_{t-1})``, so it has lower variance.

States are ``d``-dimensional: every density is a :class:`Gaussian` over the
last axis (event dimension 1, so the particle plate is the only batch
dimension), with its covariance factorised once per filter rather than in
every step. The filters record the filtering mean ``sum_i W_t^i x_t^i`` at
every step (``record=filtering_mean``); :func:`evaluate_filter` collects it
with the per-step ESS, log Z increments and resampling flags.

The Kalman filter gives the exact ``log p(y_{0:T-1})`` and filtering moments;
:func:`run` compares both filters with them over repeated runs.

Run ``python -m programs.lgssm`` (or ``python -m programs lgssm``).

References:
  N. J. Gordon, D. J. Salmond and A. F. M. Smith (1993), "Novel approach to
  nonlinear/non-Gaussian Bayesian state estimation", IEE Proceedings F
  140(2):107-113.
  A. Doucet, S. Godsill and C. Andrieu (2000), "On sequential Monte Carlo
  sampling methods for Bayesian filtering", Statistics and Computing
  10:197-208.
  C. A. Naesseth, F. Lindsten and T. B. Schön (2015), "Nested Sequential
  Monte Carlo Methods", https://arxiv.org/abs/1502.02536.
  P. Del Moral (2004), "Feynman-Kac Formulae", Springer (unbiasedness of
  the likelihood estimate).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from numpyro.distributions import constraints

import combinators
from combinators import algo
from programs.lgssm_exact import (
    LGSSMParams,
    check_params,
    condition_on_observation,
    default_params,
    kalman_filter,
    optimal_proposal,
    simulate,
)

__all__ = [
    "DESCRIPTION",
    "PARTICLES",
    "FilterEstimates",
    "Gaussian",
    "GaussianFactor",
    "bootstrap_filter",
    "bootstrap_proposal",
    "evaluate_filter",
    "filtering_mean",
    "gaussian_factor",
    "guided_filter",
    "guided_proposal",
    "initial_target",
    "run",
    "transition_target",
]

DESCRIPTION = (
    "Bootstrap and guided particle filters for a linear-Gaussian SSM "
    "(algo.smc, O(N) steps) vs the Kalman filter"
)

PARTICLES = "particles"


# ---------------------------------------------------------------------------
# Step programs
# ---------------------------------------------------------------------------


class GaussianFactor(NamedTuple):
    """A covariance ``L L^T`` factorised once: ``L``, ``L^{-1}`` and the normaliser.

    Attributes:
      scale_tril: the lower Cholesky factor ``L``, shape ``(d, d)``.
      whitener: ``L^{-1}``, shape ``(d, d)``.
      log_normaliser: ``-log det L - d/2 log(2 pi)``, shape ``()``.
    """

    scale_tril: jax.Array
    whitener: jax.Array
    log_normaliser: jax.Array


def gaussian_factor(cov: jax.Array) -> GaussianFactor:
    """Factorises a positive-definite covariance for :class:`Gaussian`."""
    scale_tril = jnp.linalg.cholesky(cov)
    d = cov.shape[-1]
    whitener = solve_triangular(scale_tril, jnp.eye(d, dtype=cov.dtype), lower=True)
    log_normaliser = -jnp.sum(jnp.log(jnp.diagonal(scale_tril))) - 0.5 * d * math.log(
        2.0 * math.pi
    )
    return GaussianFactor(scale_tril, whitener, log_normaliser)


class Gaussian(dist.Distribution):
    """``N(loc, L L^T)`` over the last axis (event dimension 1), pre-factorised.

    The same density as ``dist.MultivariateNormal(loc, scale_tril=L)``, but
    the covariance is factorised once (:func:`gaussian_factor`) and every
    particle is scored with a matrix product by ``L^{-1}`` instead of a
    triangular solve. On CPU, XLA's triangular solve with many right-hand
    sides (one per particle) costs tens of milliseconds per call from
    N = 10^4 on, which dominated the filter's run time.

    Args:
      loc: the means, shape ``(..., d)`` (one row per particle).
      factor: the shared covariance, factorised.
    """

    arg_constraints = {"loc": constraints.real_vector}
    support = constraints.real_vector
    reparametrized_params = ["loc"]
    pytree_data_fields = ("loc", "factor")

    def __init__(self, loc: jax.Array, factor: GaussianFactor, *, validate_args=None):
        self.loc = loc
        self.factor = factor
        super().__init__(
            batch_shape=jnp.shape(loc)[:-1],
            event_shape=jnp.shape(loc)[-1:],
            validate_args=validate_args,
        )

    def sample(self, key, sample_shape=()):
        """``loc + L eps`` with ``eps ~ N(0, I)``."""
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        noise = jax.random.normal(key, shape, dtype=jnp.result_type(self.loc))
        return self.loc + noise @ self.factor.scale_tril.T

    def log_prob(self, value):
        """``log N(value; loc, L L^T)``, summed over the event axis."""
        whitened = (value - self.loc) @ self.factor.whitener.T
        return -0.5 * jnp.sum(whitened**2, axis=-1) + self.factor.log_normaliser


def _observation(ys: jax.Array, t) -> jax.Array:
    """``ys[t]`` for a Python or traced step index ``t``."""
    return jax.lax.dynamic_index_in_dim(ys, t, axis=0, keepdims=False)


def _is_first(t) -> bool:
    """Whether ``t`` is the (static) first step; a traced ``t`` never is."""
    return isinstance(t, (int, np.integer)) and int(t) == 0


class _Model(NamedTuple):
    """The model, its data and the Cholesky factors its programs share.

    Factorising once here, not inside every step program, keeps the
    factorisations out of the compiled loop body.
    """

    params: LGSSMParams
    ys: jax.Array
    num_particles: int
    initial: GaussianFactor
    transition: GaussianFactor
    observation: GaussianFactor
    guided: GaussianFactor

    def plate(self):
        """The particle plate (``dim=-1``; a state is one event)."""
        return numpyro.plate(PARTICLES, self.num_particles)

    def observe(self, t, x: jax.Array) -> None:
        """Scores ``y_t ~ N(C x_t, R)`` inside the caller's particle plate."""
        loc = x @ self.params.C.T
        y_t = _observation(self.ys, t)
        numpyro.sample("y", Gaussian(loc, self.observation), obs=y_t)

    def prior(self, x_prev=None) -> dist.Distribution:
        """``p(x_0)`` when ``x_prev`` is None, else ``p(x_t | x_{t-1})``."""
        if x_prev is None:
            loc = jnp.broadcast_to(
                self.params.m0, (self.num_particles, self.params.state_dim)
            )
            return Gaussian(loc, self.initial)
        return Gaussian(x_prev @ self.params.A.T, self.transition)

    def target(self, t) -> Callable:
        """Step ``t``'s target: prior (or transition) times the likelihood."""
        if _is_first(t):

            def initial():
                with self.plate():
                    x = numpyro.sample("x", self.prior())
                    self.observe(0, x)
                return (x,)

            return initial

        def step(x_prev):
            with self.plate():
                x = numpyro.sample("x", self.prior(x_prev))
                self.observe(t, x)
            return (x,)

        return step

    def bootstrap_proposal(self, t) -> Callable:
        """Step ``t``'s bootstrap proposal: the prior (or transition)."""
        if _is_first(t):

            def initial():
                with self.plate():
                    return (numpyro.sample("x", self.prior()),)

            return initial

        def step(x_prev):
            with self.plate():
                return (numpyro.sample("x", self.prior(x_prev)),)

        return step

    def guided_proposal(self, t) -> Callable:
        """Step ``t``'s locally optimal proposal."""
        params = self.params
        if _is_first(t):

            def initial():
                mean, cov, _ = condition_on_observation(
                    params.m0, params.P0, params.C, params.R, self.ys[0]
                )
                loc = jnp.broadcast_to(mean, (self.num_particles, params.state_dim))
                with self.plate():
                    x = numpyro.sample("x", Gaussian(loc, gaussian_factor(cov)))
                return (x,)

            return initial

        def step(x_prev):
            # The covariance of p(x_t | x_{t-1}, y_t) is the same for every
            # particle and step; it was factorised once (self.guided).
            mean, _ = optimal_proposal(params, x_prev, _observation(self.ys, t))
            with self.plate():
                x = numpyro.sample("x", Gaussian(mean, self.guided))
            return (x,)

        return step


def _model(params: LGSSMParams, ys: jax.Array, num_particles: int) -> _Model:
    check_params(params, ys)
    if not isinstance(num_particles, (int, np.integer)) or num_particles < 1:
        raise ValueError(
            f"lgssm: num_particles must be a positive int, got {num_particles!r}."
        )
    return _Model(
        params=params,
        ys=ys,
        num_particles=int(num_particles),
        initial=gaussian_factor(params.P0),
        transition=gaussian_factor(params.Q),
        observation=gaussian_factor(params.R),
        guided=gaussian_factor(optimal_proposal(params, params.m0, ys[0])[1]),
    )


def initial_target(params: LGSSMParams, ys: jax.Array, num_particles: int) -> Callable:
    """The target of step 0: ``p(x_0) p(y_0 | x_0)``.

    Args:
      params: the model.
      ys: the observations, shape ``(T, d_y)``.
      num_particles: the size N of the particle plate.

    Returns:
      A program ``() -> (x_0,)`` with latent site ``"x"`` (shape ``(N, d)``,
      event dimension 1) and observed site ``"y"``.
    """
    return _model(params, ys, num_particles).target(0)


def transition_target(
    params: LGSSMParams, ys: jax.Array, num_particles: int, t
) -> Callable:
    """The target of step ``t >= 1``: ``p(x_t | x_{t-1}) p(y_t | x_t)``, new sites only.

    Args:
      params: the model.
      ys: the observations, shape ``(T, d_y)``.
      num_particles: the size N of the particle plate.
      t: the step index, a Python int or a traced integer (``y_t`` is read
        with ``lax.dynamic_index_in_dim``).

    Returns:
      A program ``(x_prev,) -> (x_t,)``.

    Raises:
      ValueError: for a static ``t = 0`` (use :func:`initial_target`).
    """
    if _is_first(t):
        raise ValueError(
            "transition_target: step 0 has no transition; use initial_target."
        )
    return _model(params, ys, num_particles).target(t)


def bootstrap_proposal(
    params: LGSSMParams, ys: jax.Array, num_particles: int, t
) -> Callable:
    """The bootstrap proposal: ``p(x_0)`` at step 0, else ``p(x_t | x_{t-1})``.

    Args:
      params: the model.
      ys: the observations (the proposal ignores them).
      num_particles: the size N of the particle plate.
      t: the step index; only a static ``0`` selects the prior.

    Returns:
      A program ``() -> (x_0,)`` (step 0) or ``(x_prev,) -> (x_t,)``.

    References:
      Gordon, Salmond & Smith (1993).
    """
    return _model(params, ys, num_particles).bootstrap_proposal(t)


def guided_proposal(
    params: LGSSMParams, ys: jax.Array, num_particles: int, t
) -> Callable:
    """The locally optimal proposal ``p(x_t | x_{t-1}, y_t)`` (``p(x_0 | y_0)`` at 0).

    Args:
      params: the model.
      ys: the observations, shape ``(T, d_y)``.
      num_particles: the size N of the particle plate.
      t: the step index; only a static ``0`` selects ``p(x_0 | y_0)``.

    Returns:
      A program ``() -> (x_0,)`` (step 0) or ``(x_prev,) -> (x_t,)``.

    References:
      Doucet, Godsill & Andrieu (2000), Section II.D.
    """
    return _model(params, ys, num_particles).guided_proposal(t)


# ---------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------


def filtering_mean(out, trace, metrics) -> dict:
    """``record`` for :func:`combinators.scan`: ``sum_i W_t^i x_t^i`` per step.

    Args:
      out: the step's outputs; ``out[0]`` is ``x_t``, shape ``(N, d)``.
      trace: the step's trace (unused).
      metrics: the step's metrics; ``log_weight`` are the weights of ``x_t``.

    Returns:
      ``{"filtering_mean": array of shape (d,)}``.
    """
    del trace
    normalised = jax.nn.softmax(metrics.log_weight)
    return {"filtering_mean": normalised @ out[0]}


def _filter(model: _Model, proposals, ess_threshold, method, record) -> Callable:
    num_steps = model.ys.shape[0]
    if num_steps < 2:
        raise ValueError(
            f"lgssm: the filters need T >= 2 observations, got {num_steps}."
        )
    return algo.smc(
        model.target,
        proposals,
        num_targets=num_steps,
        ess_threshold=ess_threshold,
        method=method,
        record=record,
    )


def bootstrap_filter(
    params: LGSSMParams,
    ys: jax.Array,
    num_particles: int,
    ess_threshold: float | None = None,
    method: str = "systematic",
    record: Callable | None = filtering_mean,
) -> Callable:
    """The bootstrap particle filter as a program: ``algo.smc`` over T steps.

    Args:
      params: the model.
      ys: observations, shape ``(T, d_y)``, ``T >= 2``.
      num_particles: N.
      ess_threshold: resample only when ESS < ``ess_threshold * N``
        (``None``: at every step).
      method: the resampling scheme (see :func:`combinators.resample`).
      record: per-step record (default: the filtering mean).

    Returns:
      A program of no arguments (give it a key through ``traced_evaluate``)
      whose ``metrics["log_Z"]`` estimates ``log p(y_{0:T-1})`` and whose
      ``metrics["history"]`` holds the per-step ESS, log Z increments,
      resampling flags and records. The loop is compiled once.

    Example:
      >>> program = bootstrap_filter(default_params(), ys, 1000)
      >>> _, _, metrics = combinators.traced_evaluate(program, seed=key)()

    References:
      Gordon, Salmond & Smith (1993).
    """
    model = _model(params, ys, num_particles)
    return _filter(model, model.bootstrap_proposal, ess_threshold, method, record)


def guided_filter(
    params: LGSSMParams,
    ys: jax.Array,
    num_particles: int,
    ess_threshold: float | None = None,
    method: str = "systematic",
    record: Callable | None = filtering_mean,
) -> Callable:
    """The particle filter with the locally optimal proposal, as a program.

    Args and returns as :func:`bootstrap_filter`.

    References:
      Doucet, Godsill & Andrieu (2000), Section II.D.
    """
    model = _model(params, ys, num_particles)
    return _filter(model, model.guided_proposal, ess_threshold, method, record)


class FilterEstimates(NamedTuple):
    """What one run of a filter program estimates.

    Attributes:
      log_Z: estimate of ``log p(y_{0:T-1})``, shape ``()``.
      log_Z_increments: per-step increments, shape ``(T,)``.
      filtering_means: ``sum_i W_t^i x_t^i``, shape ``(T, d)``.
      ess: the effective sample size of each step's weights, shape ``(T,)``.
      resampled: whether step ``t`` resampled before proposing, ``(T,)``.
    """

    log_Z: jax.Array
    log_Z_increments: jax.Array
    filtering_means: jax.Array
    ess: jax.Array
    resampled: jax.Array


def evaluate_filter(program: Callable, key: jax.Array) -> FilterEstimates:
    """Runs a filter program (built with the default record) with ``key``.

    Args:
      program: from :func:`bootstrap_filter` or :func:`guided_filter`.
      key: a PRNG key.

    Returns:
      The :class:`FilterEstimates`; ``jax.jit`` and ``jax.vmap`` over keys
      apply.
    """
    _, _, metrics = combinators.traced_evaluate(program, seed=key)()
    history = metrics["history"]
    return FilterEstimates(
        log_Z=metrics["log_Z"],
        log_Z_increments=history.log_Z_increment,
        filtering_means=history.records["filtering_mean"],
        ess=history.ess,
        resampled=history.resampled,
    )


# ---------------------------------------------------------------------------
# Experiment
# ---------------------------------------------------------------------------


def _repeated_runs(program, key, num_runs, chunk, progress, label):
    """``evaluate_filter`` over ``num_runs`` keys, vmapped in chunks."""
    from tqdm.auto import tqdm

    one_chunk = jax.jit(jax.vmap(lambda k: evaluate_filter(program, k)))
    keys = jax.random.split(key, num_runs)
    parts = []
    for start in tqdm(
        range(0, num_runs, chunk), desc=label, disable=not progress, leave=False
    ):
        parts.append(jax.device_get(one_chunk(keys[start : start + chunk])))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)


def _plot(path, t_axis, xs, ys, kalman, runs, names, threshold, num_particles):
    """Filtering means vs Kalman (first coordinate), ESS, and log Z-hat spread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_mean, ax_ess, ax_z = fig.subplots(1, 3)
    mean = np.asarray(kalman.filtered_means[:, 0])
    sd = np.sqrt(np.asarray(kalman.filtered_covs[:, 0, 0]))
    ax_mean.fill_between(
        t_axis, mean - 2 * sd, mean + 2 * sd, color="0.85", label="Kalman ±2 sd"
    )
    ax_mean.plot(t_axis, mean, color="k", lw=1.2, label="Kalman mean")
    ax_mean.plot(t_axis, np.asarray(xs[:, 0]), "x", color="0.4", ms=4, label="true x")
    ax_mean.plot(t_axis, np.asarray(ys[:, 0]), ".", color="C2", ms=4, label="y")
    for index, name in enumerate(names):
        ax_mean.plot(
            t_axis,
            runs[name].filtering_means[0, :, 0],
            lw=1,
            ls="--",
            color=f"C{index}",
            label=f"{name} (one run)",
        )
    ax_mean.set_title("filtering mean of x_t[0]")
    ax_mean.set_xlabel("t")
    ax_mean.legend(fontsize=7)
    for index, name in enumerate(names):
        ess = runs[name].ess[0]
        resampled = runs[name].resampled[0]
        ax_ess.plot(t_axis, ess, color=f"C{index}", lw=1, label=name)
        ax_ess.plot(
            t_axis[resampled],
            ess[resampled],
            "v",
            color=f"C{index}",
            ms=5,
            label=f"{name}: resampled before step",
        )
    if threshold is not None:
        ax_ess.axhline(
            threshold * num_particles, color="0.5", lw=0.8, ls=":", label="threshold"
        )
    ax_ess.set_title("ESS of each step's weights (one run)")
    ax_ess.set_xlabel("t")
    ax_ess.set_ylim(bottom=0)
    ax_ess.legend(fontsize=7)
    log_z = float(kalman.log_likelihood)
    for index, name in enumerate(names):
        ax_z.hist(
            runs[name].log_Z - log_z,
            bins=30,
            alpha=0.5,
            color=f"C{index}",
            label=name,
        )
    ax_z.axvline(0.0, color="k", lw=1)
    ax_z.set_title("log Z-hat - log Z (Kalman), repeated runs")
    ax_z.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def run(
    *,
    steps: int = 50,
    particles: int = 1000,
    seed: int = 0,
    out: str = "out",
    progress: bool = True,
    dim: int = 1,
    num_runs: int = 200,
    ess_threshold: float | None = 0.5,
) -> dict[str, float]:
    """Runs both filters on simulated data and compares them with the Kalman filter.

    Simulates ``T = steps`` observations from ``default_params(dim)``, runs
    the bootstrap and the guided filter ``num_runs`` times each (vmapped)
    with adaptive resampling, and reports the mean and standard error of
    ``log Z-hat`` against the exact ``log p(y)``, the mean of ``Z-hat / Z``
    (1 in expectation) and the mean absolute error of the filtering means.

    Args:
      steps: the number of time steps T (at least 2).
      particles: N, the number of particles.
      seed: seeds the data and the filters.
      out: output directory for ``lgssm.png`` and ``lgssm_metrics.json``.
      progress: show a progress bar over chunks of runs.
      dim: the state dimension d.
      num_runs: independent runs per filter.
      ess_threshold: adaptive resampling threshold (``None``: every step).

    Returns:
      The metrics as floats.

    References:
      Gordon, Salmond & Smith (1993); Doucet, Godsill & Andrieu (2000).
    """
    if steps < 2:
        raise ValueError(f"lgssm: steps (T) must be at least 2, got {steps}.")
    if particles < 1 or num_runs < 2:
        raise ValueError(
            f"lgssm: need particles >= 1 and num_runs >= 2, got {particles} and "
            f"{num_runs}."
        )
    tic = time.perf_counter()
    key_data, key_bootstrap, key_guided = jax.random.split(jax.random.key(seed), 3)
    params = default_params(dim)
    xs, ys = simulate(key_data, params, steps)
    kalman = kalman_filter(params, ys)
    log_z = float(kalman.log_likelihood)

    programs = {
        "bootstrap": bootstrap_filter(params, ys, particles, ess_threshold),
        "guided": guided_filter(params, ys, particles, ess_threshold),
    }
    chunk = max(1, min(num_runs, 2_000_000 // (particles * steps)))
    runs = {
        "bootstrap": _repeated_runs(
            programs["bootstrap"], key_bootstrap, num_runs, chunk, progress, "bootstrap"
        ),
        "guided": _repeated_runs(
            programs["guided"], key_guided, num_runs, chunk, progress, "guided"
        ),
    }

    metrics: dict[str, float] = {"log_Z_kalman": log_z}
    kalman_means = np.asarray(kalman.filtered_means)
    for name, estimates in runs.items():
        log_z_hat = np.asarray(estimates.log_Z, dtype=np.float64)
        ratio = np.exp(log_z_hat - log_z)
        errors = np.abs(np.asarray(estimates.filtering_means) - kalman_means)
        metrics[f"{name}_log_Z_mean"] = float(log_z_hat.mean())
        metrics[f"{name}_log_Z_se"] = float(log_z_hat.std(ddof=1) / math.sqrt(num_runs))
        metrics[f"{name}_log_Z_sd"] = float(log_z_hat.std(ddof=1))
        metrics[f"{name}_Z_ratio_mean"] = float(ratio.mean())
        metrics[f"{name}_Z_ratio_se"] = float(ratio.std(ddof=1) / math.sqrt(num_runs))
        metrics[f"{name}_filtering_mean_abs_error"] = float(errors.mean())
        metrics[f"{name}_mean_ess"] = float(np.mean(estimates.ess))
        metrics[f"{name}_resampling_rate"] = float(np.mean(estimates.resampled[:, 1:]))

    os.makedirs(out, exist_ok=True)
    _plot(
        os.path.join(out, "lgssm.png"),
        np.arange(steps),
        np.asarray(xs),
        np.asarray(ys),
        kalman,
        runs,
        list(runs),
        ess_threshold,
        particles,
    )
    elapsed = time.perf_counter() - tic
    png = os.path.join(out, "lgssm.png")
    path = os.path.join(out, "lgssm_metrics.json")
    record = {
        "program": "lgssm",
        "steps": steps,
        "particles": particles,
        "seed": seed,
        "dim": dim,
        "num_runs": num_runs,
        "ess_threshold": ess_threshold,
        "elapsed_seconds": elapsed,
        "backend": jax.default_backend(),
        "metrics": metrics,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(
        f"lgssm: T={steps} N={particles} d={dim} runs={num_runs}: "
        f"log Z (Kalman) = {log_z:.3f}"
    )
    for name in runs:
        print(
            f"  {name:9s} log Z-hat = {metrics[f'{name}_log_Z_mean']:.3f} "
            f"± {metrics[f'{name}_log_Z_se']:.3f} "
            f"(sd {metrics[f'{name}_log_Z_sd']:.3f}), "
            f"mean Z-hat/Z = {metrics[f'{name}_Z_ratio_mean']:.3f} "
            f"± {metrics[f'{name}_Z_ratio_se']:.3f}, "
            f"|filtering mean - Kalman| = "
            f"{metrics[f'{name}_filtering_mean_abs_error']:.4f}, "
            f"resampled {100 * metrics[f'{name}_resampling_rate']:.0f}% of steps"
        )
    print(f"  elapsed: {elapsed:.1f} s; wrote {png} and {path}")
    return metrics


if __name__ == "__main__":
    run()
