"""Particle smoothing from the per-step history of an SMC ``scan``.

A state-space model written as SMC steps (the incremental form of
:func:`combinators.algo.smc`: ``targets(t)`` takes the previous step's
outputs and scores what step ``t`` adds, e.g. ``x_t | x_{t-1}`` and
``y_t | x_t``) yields, at every step, particles ``x_t^i``, filtering log
weights ``log w_t^i`` and the ancestor ``a_t^i`` (among the particles of
step ``t-1``) that the step's resampling chose. Kept with
:func:`record_particles`, they give smoothed trajectories, i.e. draws from
(an approximation of) ``p(x_{0:T-1} | y_{0:T-1})``:

* :func:`trace_genealogy`: follow each final particle's ancestors back (the
  path-space smoother; cheap, but its early states collapse onto few
  ancestors);
* :func:`ffbs`: forward filtering, backward simulation. Going backwards,
  each trajectory picks its state at ``t`` with probability proportional to
  ``w_t^i p_{t+1}(x_{t+1} | x_t^i)``, where ``p_{t+1}`` is the density of
  the step-``t+1`` target the user already wrote, evaluated with its
  transition site substituted (never asked of the user again). The exact
  kernel costs O(N) per trajectory and step (O(N^2) for N trajectories);
  ``backward="imh"`` instead runs independent Metropolis-Hastings moves
  started at the genealogy ancestor, O(1) per trajectory and move.

Only the per-step states, outputs, log weights and ancestor indices are kept
(O(T N) memory); no per-step traces. The backward pass is one
``jax.lax.scan`` over time, so it compiles once and runs under ``jit``.

References:
  Kitagawa (1996), "Monte Carlo filter and smoother for non-Gaussian
  nonlinear state space models", Journal of Computational and Graphical
  Statistics 5(1) (genealogy tracing).
  Godsill, Doucet & West (2004), "Monte Carlo smoothing for nonlinear time
  series", Journal of the American Statistical Association 99(465)
  (backward simulation).
  Dau & Chopin (2023), "On backward smoothing algorithms", Annals of
  Statistics 51(5), https://arxiv.org/abs/2207.00976 (MCMC backward
  kernels started at the genealogy ancestor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from combinators import weights
from combinators.core import evaluate
from combinators.core.metrics import ANCESTORS, History, Metrics
from combinators.resampling import resample_indices

__all__ = [
    "BACKWARD_KERNELS",
    "RECORD_KEY",
    "ParticleHistory",
    "Trajectories",
    "ffbs",
    "gather_particles",
    "particle_history",
    "record_particles",
    "step_log_density",
    "trace_genealogy",
]

#: The key of :func:`record_particles`' entry in ``History.records``.
RECORD_KEY = "particles"

#: The backward kernels of :func:`ffbs`.
BACKWARD_KERNELS = ("exact", "imh")


@dataclasses.dataclass(frozen=True)
class ParticleHistory:
    """The particles of every SMC step, stacked over time (axis 0).

    Entry ``t`` is the particle population after step ``t`` (``T`` entries).
    A pytree; ``site`` is static.

    Attributes:
      outputs: each step's return value (the tuple the next step's target
        takes), every leaf stacked: shape ``(T, N, ...)`` for per-particle
        leaves.
      values: the value of the transition site at each step, shape
        ``(T, N) + event_shape``.
      log_weights: the filtering log weights, shape ``(T, N)``.
      ancestors: the index, among the particles of step ``t - 1``, of the
        ancestor of each particle of step ``t``, shape ``(T, N)``; entry 0
        (no ancestors) is the identity.
      site: the name of the transition site (the state each step adds).
    """

    outputs: Any
    values: Any
    log_weights: Any
    ancestors: Any
    site: str = ""

    @property
    def num_steps(self) -> int:
        """``T``, the number of steps kept."""
        return int(jnp.shape(self.log_weights)[0])

    @property
    def num_particles(self) -> int:
        """``N``, the number of particles per step."""
        return int(jnp.shape(self.log_weights)[1])


jax.tree_util.register_dataclass(
    ParticleHistory,
    data_fields=["outputs", "values", "log_weights", "ancestors"],
    meta_fields=["site"],
)


class Trajectories(NamedTuple):
    """Smoothed trajectories, time on axis 0.

    Attributes:
      values: the transition site's value along each trajectory, shape
        ``(T, M) + event_shape``.
      indices: the particle index at each step, shape ``(T, M)``
        (``values[t] = ParticleHistory.values[t][indices[t]]``).
      log_weights: the trajectories' log weights, shape ``(M,)``: the final
        filtering log weights for :func:`trace_genealogy`, zeros (equal
        weights) for :func:`ffbs`.
    """

    values: Any
    indices: Any
    log_weights: Any


def record_particles(site: str, record: Callable | None = None) -> Callable:
    """A ``record`` for :func:`combinators.algo.smc` / ``scan`` keeping particles.

    Keeps, at every step, the step's outputs, the value of ``site``, the
    log weights and the ancestor indices of the step's resampling
    (``metrics["ancestors"]``, reported by ``algo.smc``'s resampling and by
    ``resample(..., record_ancestors=True)``).

    Args:
      site: the name of the latent site each step adds (the state ``x_t``).
      record: an optional further record, ``record(out, trace, metrics) ->
        dict``, whose entries are kept beside the particles.

    Returns:
      ``record(out, trace, metrics) -> {RECORD_KEY: ParticleHistory, ...}``.

    Raises:
      ValueError: at trace time, naming the site and shapes, if the step has
        no latent ``site``, its log weights are not one particle axis, the
        site's batch shape is not ``(N,)``, or the outputs are not a tuple.

    Example:
      >>> ys = jnp.array([0.3, -0.1, 0.4, 0.8])
      >>> def step(t, observe=True):  # x_t ~ N(0.9 x_{t-1}, 1), y_t ~ N(x_t, 0.5)
      ...     def program(*x_prev):  # no argument at t = 0
      ...         loc = 0.9 * x_prev[0] if x_prev else 0.0
      ...         with numpyro.plate("particles", 64):
      ...             x = numpyro.sample("x", dist.Normal(loc, 1.0))
      ...             if observe:
      ...                 numpyro.sample("y", dist.Normal(x, 0.5), obs=ys[t])
      ...         return (x,)
      ...     return program
      >>> targets, proposals = step, lambda t: step(t, observe=False)  # bootstrap
      >>> program = coix.algo.smc(targets, proposals, num_targets=4,
      ...                         record=record_particles("x"))
      >>> run = jax.jit(lambda key: coix.traced_evaluate(program, seed=key)())
      >>> _, _, metrics = run(jax.random.key(0))
      >>> particles = particle_history(metrics)
      >>> particles.values.shape, particles.ancestors.shape  # (T, N)
      ((4, 64), (4, 64))
    """
    if not isinstance(site, str):
        raise TypeError(
            f"record_particles: site must be a site name (str), got {site!r}."
        )
    if record is not None and not callable(record):
        raise TypeError(f"record_particles: record must be callable, got {record!r}.")

    def recorder(out, trace, metrics):
        where = "record_particles"
        log_weight = metrics.log_weight
        if jnp.ndim(log_weight) != 1:
            raise ValueError(
                f"{where}: smoothing needs log weights with one particle axis, "
                f"shape (N,); got shape {jnp.shape(log_weight)} (a single "
                f"particle, or extra weight columns such as a data plate)."
            )
        n = jnp.shape(log_weight)[0]
        if site not in trace or trace[site].observed:
            latent = sorted(k for k, s in trace.items() if not s.observed)
            raise ValueError(
                f"{where}: the step's trace has no latent site {site!r} (its "
                f"latent sites: {latent})."
            )
        state = trace[site]
        if jnp.shape(state.log_prob) != (n,):
            raise ValueError(
                f"{where}: site {site!r} has batch shape "
                f"{jnp.shape(state.log_prob)}, expected ({n},): the state must "
                f"be drawn inside the particle plate, one value per particle."
            )
        if not isinstance(out, tuple):
            raise ValueError(
                f"{where}: the step program returns {type(out).__name__}; SMC "
                f"steps return a tuple, the next target's arguments."
            )
        ancestors = metrics.extras.get(ANCESTORS)
        if ancestors is None:
            ancestors = jnp.arange(n)
        elif jnp.shape(ancestors) != (n,):
            raise ValueError(
                f"{where}: the step's ancestor indices have shape "
                f"{jnp.shape(ancestors)}, expected ({n},) (one per particle)."
            )
        particles = ParticleHistory(
            outputs=out,
            values=state.value,
            log_weights=log_weight,
            ancestors=jnp.asarray(ancestors, jnp.int32),
            site=site,
        )
        extra = {} if record is None else record(out, trace, metrics)
        if not isinstance(extra, Mapping) or RECORD_KEY in extra:
            raise ValueError(
                f"{where}: the further record must return a dict without the "
                f"key {RECORD_KEY!r}, got {type(extra).__name__}"
                f"{' with that key' if isinstance(extra, Mapping) else ''}."
            )
        return {RECORD_KEY: particles, **extra}

    return recorder


def particle_history(source) -> ParticleHistory:
    """The :class:`ParticleHistory` kept by :func:`record_particles`.

    Args:
      source: the metrics of the SMC program, its ``metrics["history"]``,
        or its ``records``.

    Returns:
      The particle history.

    Raises:
      ValueError: if no particles were recorded.
    """
    if isinstance(source, ParticleHistory):
        return source
    if isinstance(source, Metrics):
        source = source.extras.get("history")
    if isinstance(source, History):
        source = source.records
    if not isinstance(source, Mapping) or not isinstance(
        source.get(RECORD_KEY), ParticleHistory
    ):
        raise ValueError(
            "particle_history: no particles were recorded; run the SMC program "
            "with record=smoothing.record_particles(site)."
        )
    return source[RECORD_KEY]


def _check_history(where: str, particles) -> ParticleHistory:
    if not isinstance(particles, ParticleHistory):
        raise TypeError(
            f"{where}: particles must be a ParticleHistory (see "
            f"smoothing.particle_history), got {type(particles).__name__}."
        )
    shape = jnp.shape(particles.log_weights)
    if len(shape) != 2 or shape[0] < 2:
        raise ValueError(
            f"{where}: the particle history's log weights have shape {shape}; "
            f"expected (T, N) with T >= 2 steps."
        )
    if jnp.shape(particles.ancestors) != shape:
        raise ValueError(
            f"{where}: ancestors have shape {jnp.shape(particles.ancestors)}, "
            f"log weights {shape}; they must agree."
        )
    values_shape = jnp.shape(particles.values)
    if values_shape[:2] != shape:
        raise ValueError(
            f"{where}: values of site {particles.site!r} have shape "
            f"{values_shape}; expected (T, N) = {shape} leading axes."
        )
    return particles


def _check_count(where: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}.")
    return value


def trace_genealogy(particles: ParticleHistory, indices=None) -> Trajectories:
    """Traces final particles back through their ancestors.

    Trajectory ``m`` ends at particle ``indices[m]`` of the last step; its
    state at ``t`` is that of the ancestor ``a_{t+1}`` of its state at
    ``t + 1``. Weighted by the final filtering weights, the trajectories
    approximate the smoothing distribution (the path-space smoother); at
    the last step they are the filter's particles.

    Args:
      particles: from :func:`particle_history`.
      indices: final particle indices, shape ``(M,)``; default all ``N``
        particles in order.

    Returns:
      :class:`Trajectories`; ``log_weights`` are the final filtering log
      weights of the traced particles.

    Raises:
      ValueError: for a malformed history or indices.

    References:
      Kitagawa (1996); Doucet & Johansen (2009), "A Tutorial on Particle
      Filtering and Smoothing: Fifteen years later", Section 4.4.
    """
    where = "trace_genealogy"
    particles = _check_history(where, particles)
    n = particles.num_particles
    if indices is None:
        indices = jnp.arange(n)
    indices = jnp.asarray(indices)
    if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(
            f"{where}: indices must be a 1-D integer array of final particle "
            f"indices, got shape {indices.shape} and dtype {indices.dtype}."
        )

    def back(current, ancestors_next):
        previous = ancestors_next[current]
        return previous, previous

    _, earlier = jax.lax.scan(back, indices, particles.ancestors[1:], reverse=True)
    path = jnp.concatenate([earlier, indices[None]], axis=0)
    return Trajectories(
        values=_along(particles.values, path),
        indices=path,
        log_weights=particles.log_weights[-1][indices],
    )


def _along(values, path):
    """``values[t][path[t]]`` for every ``t``: shape ``(T, M) + event``."""
    return jax.vmap(lambda v, i: v[i])(values, path)


def gather_particles(outputs, indices, n: int):
    """Rows ``indices`` of every output leaf whose leading axis is the N particles.

    The same rule as :func:`combinators.resample` for outputs: other leaves
    (shared by all particles) are kept.

    Args:
      outputs: a step's outputs (a pytree).
      indices: particle indices, shape ``(M,)``.
      n: ``N``, the number of particles.

    Returns:
      The outputs of the particles ``indices``.
    """

    def gather(x):
        if isinstance(x, jax.Array) and jnp.ndim(x) >= 1 and x.shape[0] == n:
            return x[indices]
        return x

    return jax.tree_util.tree_map(gather, outputs)


def _check_target(where, targets, particles: ParticleHistory, key) -> None:
    """Checks ``targets(1)`` against the history, at trace time, computing nothing.

    ``site`` must be its only latent site (every other site observed) and
    its particle layout must be ``(N,)``.
    """
    site, n = particles.site, particles.num_particles
    args = jax.tree_util.tree_map(lambda x: x[0], particles.outputs)
    found = {}

    def probe(args, key):
        result = evaluate.evaluate(targets(1), seed=key, where=where)(*args)
        found["weighted"] = result.metrics is not None
        found["latent"] = sorted(
            {name for name, _, s in result.trace.generations() if not s.observed}
        )
        found["layout"] = weights.layout_of(result.trace, where=where).shape
        if site in result.trace:
            found["shape"] = jnp.shape(result.trace[site].log_prob)
        return jnp.zeros(())

    jax.eval_shape(probe, args, key)
    if found["weighted"]:
        raise ValueError(
            f"{where}: targets(t) returned a weighted program (the output of a "
            f"combinator); pass the step targets given to algo.smc."
        )
    if site not in found["latent"]:
        raise ValueError(
            f"{where}: targets(t) has no latent site {site!r} (its latent "
            f"sites: {found['latent']}); the transition site is the state each "
            f"step adds."
        )
    others = [name for name in found["latent"] if name != site]
    if others:
        raise ValueError(
            f"{where}: targets(t) has latent sites {others} besides the "
            f"transition site {site!r}; the backward kernel needs the density "
            f"of the step given the state, so every other site must be observed."
        )
    if found["layout"] != (n,):
        raise ValueError(
            f"{where}: targets(t) has particle layout {found['layout']} (site "
            f"{site!r} log density shape {found['shape']}), expected ({n},): one "
            f"particle plate of the N = {n} particles of the history."
        )


def step_log_density(targets, t, args, site, value, *, where="step_log_density"):
    """Per-particle log density of ``targets(t)(*args)`` with ``site = value``.

    Sums every site's log density (the transition and any factor, such as an
    observation, that depends on the previous state; factors that do not,
    cancel in backward and ancestor-sampling kernels). This is how the
    transition density ``gamma_t(x_t | x_{t-1}^i)`` is read from the step
    targets, never asked of the user again.

    Args:
      targets: the step targets ``targets(t)`` of ``algo.smc``.
      t: the step (may be traced).
      args: the previous step's outputs (the target's arguments), one row
        per particle.
      site: the transition site.
      value: its value for every particle, shape ``(N,) + event_shape``.
      where: the function named in errors.

    Returns:
      The log densities, shape ``(N,)`` (the target's layout).
    """
    result = evaluate.evaluate(targets(t), {(site, 0): value}, where=where)(*args)
    layout = weights.layout_of(result.trace, where=where)
    return weights.trace_log_prob([s for _, _, s in result.trace.generations()], layout)


def ffbs(
    key,
    targets: Callable,
    particles: ParticleHistory,
    num_trajectories: int | None = None,
    *,
    backward: str = "exact",
    num_mcmc_steps: int = 1,
) -> Trajectories:
    """Forward filtering, backward simulation of smoothed trajectories.

    Draws ``M`` trajectories from the particle approximation of the
    smoothing distribution ``p(x_{0:T-1} | y_{0:T-1})``: the last state
    with probability ``w_{T-1}^i``, then, for ``t = T-2, ..., 0``, the state
    at ``t`` given the chosen ``x_{t+1}`` with probability
    ``B_t(i) ∝ w_t^i gamma_{t+1}(x_{t+1} | x_t^i)``, where ``gamma_{t+1}``
    is the density of ``targets(t + 1)`` (every site: the transition and
    any factor depending on ``x_t``) evaluated on the outputs of step ``t``
    with the transition site substituted by ``x_{t+1}``.

    * ``backward="exact"`` (Godsill, Doucet & West 2004) samples ``B_t``
      exactly: O(N M) per step, O(N^2) for ``M = N`` trajectories.
    * ``backward="imh"`` (Dau & Chopin 2023) starts each trajectory at the
      genealogy ancestor ``a_{t+1}`` of its state at ``t + 1`` and runs
      ``num_mcmc_steps`` independent Metropolis-Hastings moves that leave
      ``B_t`` invariant: propose ``i ~ w_t`` (multinomial), accept with
      probability ``min(1, gamma_{t+1}(x_{t+1} | x_t^i) /
      gamma_{t+1}(x_{t+1} | x_t^{current}))``. O(N) per step; needs no
      bound on the transition density. ``M`` must be ``N``.

    Requires the incremental form of :func:`combinators.algo.smc`
    (``targets(t)`` takes the previous step's outputs) run with
    ``record=record_particles(site)``.

    Args:
      key: a PRNG key.
      targets: the step targets given to ``algo.smc``, a callable
        ``targets(t)`` (called with a traced ``t``).
      particles: from :func:`particle_history`.
      num_trajectories: ``M`` (default ``N``).
      backward: ``"exact"`` or ``"imh"``.
      num_mcmc_steps: independent Metropolis-Hastings moves per state
        (``backward="imh"`` only).

    Returns:
      :class:`Trajectories` with equal (zero) log weights.

    Raises:
      TypeError: if ``targets`` is not callable.
      ValueError: naming the function, site and shapes, for a malformed
        history, a target whose transition site is missing or not its only
        latent site, a target with another particle layout, or bad counts.

    Example:
      >>> ys = jnp.array([0.3, -0.1, 0.4, 0.8])
      >>> def step(t, observe=True):  # x_t ~ N(0.9 x_{t-1}, 1), y_t ~ N(x_t, 0.5)
      ...     def program(*x_prev):  # no argument at t = 0
      ...         loc = 0.9 * x_prev[0] if x_prev else 0.0
      ...         with numpyro.plate("particles", 64):
      ...             x = numpyro.sample("x", dist.Normal(loc, 1.0))
      ...             if observe:
      ...                 numpyro.sample("y", dist.Normal(x, 0.5), obs=ys[t])
      ...         return (x,)
      ...     return program
      >>> targets, proposals = step, lambda t: step(t, observe=False)  # bootstrap
      >>> program = coix.algo.smc(targets, proposals, num_targets=4,
      ...                         record=record_particles("x"))
      >>> run = jax.jit(lambda key: coix.traced_evaluate(program, seed=key)())
      >>> particles = particle_history(run(jax.random.key(0))[2])
      >>> paths = ffbs(jax.random.key(1), targets, particles)
      >>> paths.values.mean(axis=1).shape  # smoothed means of x_0, ..., x_3
      (4,)

    References:
      Godsill, Doucet & West (2004), "Monte Carlo smoothing for nonlinear
      time series", JASA 99(465); Dau & Chopin (2023), "On backward
      smoothing algorithms", Annals of Statistics 51(5),
      https://arxiv.org/abs/2207.00976.
    """
    where = f"ffbs(backward={backward!r})"
    if not callable(targets) or isinstance(targets, Sequence):
        raise TypeError(
            f"{where}: targets must be the callable targets(t) given to "
            f"algo.smc (the compiled form), got {type(targets).__name__}."
        )
    if backward not in BACKWARD_KERNELS:
        raise ValueError(
            f"ffbs: backward must be one of {BACKWARD_KERNELS}, got {backward!r}."
        )
    particles = _check_history(where, particles)
    n, num_steps, site = particles.num_particles, particles.num_steps, particles.site
    m = n if num_trajectories is None else num_trajectories
    m = _check_count(where, "num_trajectories", m)
    num_mcmc_steps = _check_count(where, "num_mcmc_steps", num_mcmc_steps)
    if backward == "imh" and m != n:
        raise ValueError(
            f"{where}: the IMH kernel moves one trajectory per particle, so "
            f"num_trajectories must be N = {n}, got {m}."
        )
    if not isinstance(particles.outputs, tuple):
        raise ValueError(
            f"{where}: the recorded outputs are a {type(particles.outputs).__name__};"
            f" SMC steps return a tuple, the next target's arguments."
        )
    event_shape = jnp.shape(particles.values)[2:]
    key_check, key_last, key_steps = jax.random.split(key, 3)
    _check_target(where, targets, particles, key_check)
    step_keys = jax.random.split(key_steps, num_steps - 1)
    last = resample_indices(key_last, particles.log_weights[-1], m, "multinomial")

    def log_density(t, outputs, value):
        """``log gamma_{t+1}(value | outputs)``, one entry per particle row."""
        return step_log_density(targets, t + 1, outputs, site, value, where=where)

    def exact_step(chosen_next, inputs):
        t, key_draw, outputs, log_weight, values_next, _ = inputs

        def row(value):
            return log_density(t, outputs, jnp.broadcast_to(value, (n,) + event_shape))

        logits = log_weight[None, :] + jax.vmap(row)(values_next[chosen_next])
        chosen = jax.random.categorical(key_draw, logits, axis=-1)
        return chosen, chosen

    def imh_step(chosen_next, inputs):
        t, key_moves, outputs, log_weight, values_next, ancestors_next = inputs
        value = values_next[chosen_next]

        def density(indices):
            return log_density(t, gather_particles(outputs, indices, n), value)

        move_keys = jax.random.split(key_moves, num_mcmc_steps)

        def move(k, state):
            current, current_density = state
            key_propose, key_accept = jax.random.split(move_keys[k])
            proposed = resample_indices(key_propose, log_weight, n, "multinomial")
            proposed_density = density(proposed)
            log_u = jnp.log(jax.random.uniform(key_accept, (n,)))
            accept = log_u < proposed_density - current_density
            return (
                jnp.where(accept, proposed, current),
                jnp.where(accept, proposed_density, current_density),
            )

        start = ancestors_next[chosen_next]  # the genealogy's choice
        current, _ = jax.lax.fori_loop(0, num_mcmc_steps, move, (start, density(start)))
        return current, current

    inputs = (
        jnp.arange(num_steps - 1),
        step_keys,
        jax.tree_util.tree_map(lambda x: x[:-1], particles.outputs),
        particles.log_weights[:-1],
        particles.values[1:],
        particles.ancestors[1:],
    )
    step = exact_step if backward == "exact" else imh_step
    _, earlier = jax.lax.scan(step, last, inputs, reverse=True)
    path = jnp.concatenate([earlier, last[None]], axis=0)
    return Trajectories(
        values=_along(particles.values, path),
        indices=path,
        log_weights=jnp.zeros(m, dtype=particles.log_weights.dtype),
    )
