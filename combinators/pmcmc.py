"""Particle MCMC: conditional SMC, particle Gibbs and particle marginal MH.

Three algorithms over the state-space models that :func:`combinators.algo.smc`
runs in its incremental form (``targets(t)`` scores what step ``t`` adds
given the previous step's outputs, ``proposals(t)`` draws the transition
site; ``t = 0`` is passed as a Python int, later steps as a traced int):

* :func:`csmc`: conditional SMC (Andrieu, Doucet & Holenstein 2010) with
  ancestor sampling (Lindsten, Jordan & Schön 2014). Particle 0 is pinned
  to a reference trajectory ``x'_{0:T-1}``; at every step its ancestor is
  re-drawn with probability ``∝ w_{t-1}^i gamma_t(x'_t | x_{t-1}^i)``, the
  transition density read from the step targets (as
  :func:`combinators.smoothing.ffbs` does, through
  :func:`combinators.smoothing.step_log_density`), and the other particles
  are resampled conditionally on it
  (:func:`combinators.resampling.conditional_indices`).
  Returns a :class:`~combinators.smoothing.ParticleHistory`, so the
  smoothers of :mod:`combinators.smoothing` apply to it.
* :func:`particle_gibbs_step` / :func:`particle_gibbs`: the particle Gibbs
  kernel (CSMC-AS, then a new trajectory by genealogy tracing or a backward
  draw) and a chain of ``K`` iterations.
* :func:`pmmh`: particle marginal Metropolis-Hastings over static
  parameters ``theta``: a random walk in the prior's unconstrained space
  accepted with the particle filter's ``Z-hat(theta)`` in place of the
  likelihood.

Every function is one ``jax.lax.scan`` (over time, or over iterations with
the time scan inside), so it compiles once; it runs under ``jit`` and is
batched over independent chains with ``jax.vmap`` (over keys and starting
points). Shapes and site names are checked at trace time and a mismatch
raises a ``ValueError`` naming the function, the site and the shapes.

References:
  Andrieu, Doucet & Holenstein (2010), "Particle Markov chain Monte Carlo
  methods", Journal of the Royal Statistical Society B 72(3):269-342.
  Lindsten, Jordan & Schön (2014), "Particle Gibbs with ancestor sampling",
  Journal of Machine Learning Research 15:2145-2184,
  https://arxiv.org/abs/1401.0604.
  Chopin & Singh (2015), "On particle Gibbs sampling", Bernoulli 21(3),
  https://arxiv.org/abs/1304.1887.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro.distributions.transforms import biject_to

from combinators import resampling, smoothing, weights
from combinators.core import evaluate

__all__ = [
    "DRAWS",
    "PMMHResult",
    "ParticleGibbsResult",
    "csmc",
    "particle_gibbs",
    "particle_gibbs_step",
    "pmmh",
]

#: How :func:`particle_gibbs_step` draws the new trajectory from a CSMC run.
DRAWS = ("genealogy", "backward")


# ---------------------------------------------------------------------------
# Conditional SMC with ancestor sampling.
# ---------------------------------------------------------------------------


def _check_step_functions(where: str, targets, proposals) -> None:
    for name, fn in (("targets", targets), ("proposals", proposals)):
        if not callable(fn) or isinstance(fn, Sequence):
            raise TypeError(
                f"{where}: {name} must be a callable {name}(t) as given to "
                f"algo.smc (t = 0 as a Python int, later steps traced), got "
                f"{type(fn).__name__}."
            )


def _check_trace(where, role, step, result, site, num_particles, event_shape):
    """The step program ``role`` has exactly one latent site, ``site``, in (N,)."""
    if result.metrics is not None:
        raise ValueError(
            f"{where}: {role}({step}) returned a weighted program (the output of "
            f"a combinator); pass the plain step programs given to algo.smc."
        )
    latent = sorted(
        {name for name, _, s in result.trace.generations() if not s.observed}
    )
    if latent != [site]:
        raise ValueError(
            f"{where}: {role}({step}) has latent sites {latent}; conditional SMC "
            f"needs exactly one, the transition site {site!r} (every other site "
            f"observed), so that the reference fixes the whole step."
        )
    layout = weights.layout_of(result.trace, where=where).shape
    state = result.trace[site]
    value_shape = jnp.shape(state.value)
    if num_particles is None:
        num_particles = layout[0] if len(layout) == 1 else None
    expected = None if num_particles is None else (num_particles, *event_shape)
    if (
        num_particles is None
        or layout != (num_particles,)
        or jnp.shape(state.log_prob) != (num_particles,)
        or value_shape != expected
    ):
        raise ValueError(
            f"{where}: {role}({step}) site {site!r} has value shape "
            f"{value_shape}, log density shape {jnp.shape(state.log_prob)} and "
            f"particle layout {layout}; expected one particle plate, value "
            f"shape (N,) + {tuple(event_shape)} (the reference's event shape)"
            f"{'' if num_particles is None else f' with N = {num_particles}'}."
        )
    return num_particles


def _conditional_step(
    where, step, target, proposal, args, site, pinned, key, num_particles
):
    """Propose every particle, pin particle 0 to ``pinned``, weight them.

    Returns ``(target outputs, values, log weights, N)``.
    """
    event_shape = jnp.shape(pinned)
    drawn = evaluate.evaluate(proposal, seed=key, where=where)(*args)
    num_particles = _check_trace(
        where, "proposals", step, drawn, site, num_particles, event_shape
    )
    if num_particles < 2:
        raise ValueError(
            f"{where}: conditional SMC needs N >= 2 particles (one is the "
            f"reference), got N = {num_particles}."
        )
    value = drawn.trace[site].value.at[0].set(pinned)
    latents = {(site, 0): value}
    q = evaluate.evaluate(proposal, latents, where=where)(*args)
    p = evaluate.evaluate(target, latents, where=where)(*args)
    _check_trace(where, "targets", step, p, site, num_particles, event_shape)
    if not isinstance(p.out, tuple):
        raise ValueError(
            f"{where}: targets({step}) returns {type(p.out).__name__}; SMC steps "
            f"return a tuple, the next step's arguments."
        )
    layout = weights.layout_of(p.trace, where=where)
    log_p = weights.trace_log_prob([s for _, _, s in p.trace.generations()], layout)
    log_q = weights.trace_log_prob([s for _, _, s in q.trace.generations()], layout)
    return p.out, value, log_p - log_q, num_particles


def csmc(
    key,
    targets: Callable,
    proposals: Callable,
    reference,
    *,
    site: str,
    method: str = "systematic",
    ancestor_sampling: bool = True,
) -> smoothing.ParticleHistory:
    """Conditional SMC with ancestor sampling, particle 0 pinned to ``reference``.

    Step 0 draws ``x_0^i ~ proposals(0)`` for ``i >= 1`` and sets
    ``x_0^0 = x'_0``. At step ``t >= 1``:

    1. ancestor sampling: particle 0's ancestor ``a_t^0 = k`` is drawn with
       probability ``∝ w_{t-1}^k gamma_t(x'_t | x_{t-1}^k)``, where
       ``gamma_t`` is the density of ``targets(t)`` on particle ``k``'s
       outputs with the transition site set to ``x'_t`` (with
       ``ancestor_sampling=False``, ``k = 0``: the reference keeps its own
       lineage, Andrieu et al.'s conditional SMC);
    2. conditional resampling: the other ancestors are drawn from the
       scheme's law given ``a_t^0 = k``
       (:func:`combinators.resampling.conditional_indices`);
    3. every particle is extended by ``proposals(t)``, particle 0 with
       ``x'_t``, and weighted by ``targets(t) / proposals(t)``.

    The steps of ``targets`` and ``proposals`` are those of the incremental
    form of :func:`combinators.algo.smc`; each may have exactly one latent
    site, ``site``, drawn inside one particle plate of ``N`` particles, and
    ``targets(t)`` must be Markov in that site (its outputs, the next
    step's arguments, determined by the step's state).

    Args:
      key: a PRNG key.
      targets: the step targets, ``targets(t)``.
      proposals: the step proposals, ``proposals(t)``.
      reference: the reference trajectory of ``site``, shape
        ``(T,) + event_shape``; ``T >= 2`` sets the number of steps.
      site: the transition site (the state each step adds).
      method: the conditional resampling scheme, one of
        :data:`combinators.resampling.CONDITIONAL_SCHEMES`.
      ancestor_sampling: re-draw the reference's ancestors (PGAS).

    Returns:
      A :class:`combinators.smoothing.ParticleHistory`: the target outputs,
      values of ``site`` (``values[:, 0]`` is ``reference``), filtering log
      weights and ancestors of every step.

    Raises:
      TypeError: if ``targets`` or ``proposals`` is not callable.
      ValueError: at trace time, naming the function, step, site and
        shapes, for a reference of the wrong shape, a step program with
        another latent site or particle layout, or an unknown method.

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
      >>> reference = jnp.zeros(4)  # a trajectory x'_0, ..., x'_3
      >>> history = csmc(jax.random.key(0), targets, proposals, reference, site="x")
      >>> bool(jnp.all(history.values[:, 0] == reference))  # particle 0 pinned
      True

    References:
      Andrieu, Doucet & Holenstein (2010), Section 4.4; Lindsten, Jordan &
      Schön (2014), Algorithm 2.
    """
    where = f"csmc(site={site!r})"
    _check_step_functions(where, targets, proposals)
    if method not in resampling.CONDITIONAL_SCHEMES:
        raise ValueError(
            f"{where}: method must be one of "
            f"{sorted(resampling.CONDITIONAL_SCHEMES)}, got {method!r}."
        )
    reference = jnp.asarray(reference)
    if reference.ndim < 1 or reference.shape[0] < 2:
        raise ValueError(
            f"{where}: the reference trajectory must have shape (T,) + "
            f"event_shape with T >= 2 steps, got shape {reference.shape}."
        )
    num_steps = reference.shape[0]
    key_first, key_steps = jax.random.split(key)
    out, value, log_weight, n = _conditional_step(
        where, 0, targets(0), proposals(0), (), site, reference[0], key_first, None
    )
    event_shape = reference.shape[1:]

    def step(carry, inputs):
        outputs, log_weight_prev = carry
        t, key_t, pinned = inputs
        key_ancestor, key_resample, key_propose = jax.random.split(key_t, 3)
        if ancestor_sampling:
            log_transition = smoothing.step_log_density(
                targets,
                t,
                outputs,
                site,
                jnp.broadcast_to(pinned, (n, *event_shape)),
                where=where,
            )
            ancestor = jax.random.categorical(
                key_ancestor, log_weight_prev + log_transition
            )
        else:
            ancestor = jnp.zeros((), jnp.int32)
        ancestors = resampling.conditional_indices(
            key_resample, log_weight_prev, ancestor, method
        ).astype(jnp.int32)
        resampled = smoothing.gather_particles(outputs, ancestors, n)
        new_out, new_value, new_log_weight, _ = _conditional_step(
            where,
            "t",
            targets(t),
            proposals(t),
            resampled,
            site,
            pinned,
            key_propose,
            n,
        )
        carry = (new_out, new_log_weight.astype(log_weight_prev.dtype))
        return carry, (new_out, new_value, carry[1], ancestors)

    inputs = (
        jnp.arange(1, num_steps),
        jax.random.split(key_steps, num_steps - 1),
        reference[1:],
    )
    _, (outs, values, log_weights, ancestors) = jax.lax.scan(
        step, (out, log_weight), inputs
    )

    def stacked(first, rest):
        return jnp.concatenate([jnp.asarray(first)[None], rest], axis=0)

    return smoothing.ParticleHistory(
        outputs=jax.tree_util.tree_map(stacked, out, outs),
        values=stacked(value, values),
        log_weights=stacked(log_weight, log_weights),
        ancestors=stacked(jnp.arange(n, dtype=jnp.int32), ancestors),
        site=site,
    )


# ---------------------------------------------------------------------------
# Particle Gibbs.
# ---------------------------------------------------------------------------


class ParticleGibbsResult(NamedTuple):
    """A particle Gibbs chain.

    Attributes:
      trajectories: the trajectory after each iteration, shape
        ``(K, T) + event_shape``.
      update_rate: per step ``t``, the fraction of the ``K`` iterations
        whose new state differs from the previous one, shape ``(T,)`` (the
        mixing diagnostic of Lindsten, Jordan & Schön 2014, Figure 3).
    """

    trajectories: Any
    update_rate: Any


def particle_gibbs_step(
    key,
    targets: Callable,
    proposals: Callable,
    reference,
    *,
    site: str,
    method: str = "systematic",
    draw: str = "genealogy",
    ancestor_sampling: bool = True,
):
    """One particle Gibbs move: CSMC from ``reference``, then a new trajectory.

    Leaves the smoothing distribution ``p(x_{0:T-1} | y_{0:T-1})``
    invariant. The new trajectory is drawn from the conditional particle
    system by

    * ``draw="genealogy"``: a final particle ``k ~ w_{T-1}``, traced back
      through its ancestors (Andrieu et al. 2010);
    * ``draw="backward"``: a backward simulation through the CSMC particles
      (:func:`combinators.smoothing.ffbs` with the exact kernel; Whiteley
      2010), O(N T) per trajectory.

    Args:
      key: a PRNG key.
      targets: the step targets, ``targets(t)``.
      proposals: the step proposals, ``proposals(t)``.
      reference: the current trajectory, shape ``(T,) + event_shape``.
      site: the transition site.
      method: the conditional resampling scheme (see :func:`csmc`).
      draw: ``"genealogy"`` or ``"backward"``.
      ancestor_sampling: use ancestor sampling in the CSMC (PGAS).

    Returns:
      The new trajectory, shape ``(T,) + event_shape``.

    Raises:
      ValueError: as :func:`csmc`, or for an unknown ``draw``.

    References:
      Andrieu, Doucet & Holenstein (2010), Section 2.4.3; Lindsten, Jordan
      & Schön (2014); Whiteley (2010), discussion of Andrieu et al. (2010),
      JRSS B 72(3):306-307 (backward simulation in particle Gibbs).
    """
    if draw not in DRAWS:
        raise ValueError(
            f"particle_gibbs_step: draw must be one of {DRAWS}, got {draw!r}."
        )
    key_csmc, key_draw = jax.random.split(key)
    history = csmc(
        key_csmc,
        targets,
        proposals,
        reference,
        site=site,
        method=method,
        ancestor_sampling=ancestor_sampling,
    )
    if draw == "backward":
        return smoothing.ffbs(key_draw, targets, history, 1).values[:, 0]
    final = jax.random.categorical(key_draw, history.log_weights[-1])
    return smoothing.trace_genealogy(history, final[None]).values[:, 0]


def particle_gibbs(
    key,
    targets: Callable,
    proposals: Callable,
    reference,
    num_iterations: int,
    *,
    site: str,
    method: str = "systematic",
    draw: str = "genealogy",
    ancestor_sampling: bool = True,
) -> ParticleGibbsResult:
    """A particle Gibbs chain of ``num_iterations`` moves, one compiled scan.

    Memory ``O(K T d)`` for the chain (the particles of one CSMC run at a
    time, ``O(T N d)``). Batch independent chains with ``jax.vmap`` over
    ``key`` and ``reference``.

    Args:
      key: a PRNG key.
      targets: the step targets, ``targets(t)``.
      proposals: the step proposals, ``proposals(t)``.
      reference: the starting trajectory, shape ``(T,) + event_shape``.
      num_iterations: ``K``, the number of moves (a positive int).
      site: the transition site.
      method: the conditional resampling scheme (see :func:`csmc`).
      draw: ``"genealogy"`` or ``"backward"`` (see
        :func:`particle_gibbs_step`).
      ancestor_sampling: use ancestor sampling (PGAS); without it the early
        states mix slowly when ``T`` is large relative to ``N``.

    Returns:
      :class:`ParticleGibbsResult`.

    Raises:
      ValueError: as :func:`particle_gibbs_step`, or for a bad
        ``num_iterations``.

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
      >>> def chain(key, start):
      ...     return particle_gibbs(key, targets, proposals, start, 20, site="x")
      >>> keys, starts = jax.random.split(jax.random.key(0), 2), jnp.zeros((2, 4))
      >>> jax.vmap(chain)(keys, starts).trajectories.shape  # 2 chains of 20 draws
      (2, 20, 4)

    References:
      Andrieu, Doucet & Holenstein (2010); Lindsten, Jordan & Schön (2014).
    """
    if (
        isinstance(num_iterations, bool)
        or not isinstance(num_iterations, int)
        or num_iterations < 1
    ):
        raise ValueError(
            f"particle_gibbs: num_iterations must be a positive int, got "
            f"{num_iterations!r}."
        )
    reference = jnp.asarray(reference)

    def move(current, key_move):
        new = particle_gibbs_step(
            key_move,
            targets,
            proposals,
            current,
            site=site,
            method=method,
            draw=draw,
            ancestor_sampling=ancestor_sampling,
        ).astype(current.dtype)
        changed = jnp.any(jnp.reshape(new != current, (new.shape[0], -1)), axis=1)
        return new, (new, changed)

    _, (trajectories, changed) = jax.lax.scan(
        move, reference, jax.random.split(key, num_iterations)
    )
    return ParticleGibbsResult(
        trajectories=trajectories, update_rate=jnp.mean(changed, axis=0)
    )


# ---------------------------------------------------------------------------
# Particle marginal Metropolis-Hastings.
# ---------------------------------------------------------------------------


class PMMHResult(NamedTuple):
    """A PMMH chain.

    Attributes:
      thetas: the parameters after each iteration, a pytree like ``theta``
        whose leaves have a leading axis of length ``K``.
      log_Z: the log Z-hat held by the chain after each iteration, shape
        ``(K,)``.
      accepted: whether each iteration's proposal was accepted, shape
        ``(K,)``.
      acceptance_rate: the fraction accepted, shape ``()``.
    """

    thetas: Any
    log_Z: Any
    accepted: Any
    acceptance_rate: Any


class _Space(NamedTuple):
    """theta <-> unconstrained u, and the log prior density in u."""

    to_theta: Callable
    to_unconstrained: Callable
    log_prior: Callable  # log p(theta(u)) + log |d theta / d u|


def _flat_space() -> _Space:
    return _Space(
        to_theta=lambda u: u,
        to_unconstrained=lambda theta: theta,
        log_prior=lambda u: jnp.zeros(()),
    )


def _prior_space(where: str, prior: Callable, theta, drawn) -> _Space:
    """The prior's sites as theta's coordinates, mapped by ``biject_to``.

    ``drawn`` is an evaluation of the prior (its sites' names and shapes).
    """
    if not isinstance(theta, Mapping):
        raise ValueError(
            f"{where}: with a prior, theta must be a dict keyed by the prior's "
            f"sample sites, got {type(theta).__name__}."
        )
    latent = sorted(name for name, s in drawn.trace.items() if not s.observed)
    if latent != sorted(theta):
        raise ValueError(
            f"{where}: theta has keys {sorted(theta)} but the prior samples "
            f"{latent}; give one value per prior site."
        )
    for name in latent:
        shape, expected = jnp.shape(theta[name]), jnp.shape(drawn.trace[name].value)
        if shape != expected:
            raise ValueError(
                f"{where}: theta[{name!r}] has shape {shape}, the prior's site "
                f"{name!r} shape {expected}."
            )
    _, supports = evaluate.evaluate_with_supports(
        prior, {(name, 0): value for name, value in theta.items()}, where=where
    )()
    for name in latent:
        if supports[name].is_discrete:
            raise ValueError(
                f"{where}: prior site {name!r} is discrete (support "
                f"{supports[name]}); the random walk moves continuous "
                f"parameters only."
            )
    bijections = {name: biject_to(supports[name]) for name in latent}

    def to_theta(u):
        return {name: bijections[name](u[name]) for name in latent}

    def to_unconstrained(theta):
        return {name: bijections[name].inv(theta[name]) for name in latent}

    def log_prior(u):
        theta = to_theta(u)
        evaluation = evaluate.evaluate(
            prior, {(name, 0): v for name, v in theta.items()}, where=where
        )()
        total = sum(jnp.sum(s.log_prob) for _, _, s in evaluation.trace.generations())
        for name in latent:
            jacobian = bijections[name].log_abs_det_jacobian(u[name], theta[name])
            total = total + jnp.sum(jacobian)
        return total

    return _Space(to_theta, to_unconstrained, log_prior)


def _scales(where: str, scale, u):
    """``scale`` as a pytree like ``u`` (one float for every leaf, or per leaf)."""
    # jaxlib ships no stubs for PyTreeDef, so mypy cannot see its __ne__.
    if jax.tree_util.tree_structure(scale) != jax.tree_util.tree_structure(u):  # type: ignore[operator]
        if jnp.ndim(scale) != 0:
            raise ValueError(
                f"{where}: scale must be a float or a pytree like theta, got "
                f"shape {jnp.shape(scale)} for theta's structure "
                f"{jax.tree_util.tree_structure(u)}."
            )
        scale = jax.tree_util.tree_map(lambda _: scale, u)
    for s, leaf in zip(
        jax.tree_util.tree_leaves(scale), jax.tree_util.tree_leaves(u), strict=True
    ):
        if jnp.broadcast_shapes(jnp.shape(s), jnp.shape(leaf)) != jnp.shape(leaf):
            raise ValueError(
                f"{where}: a scale of shape {jnp.shape(s)} does not fit a "
                f"parameter of shape {jnp.shape(leaf)}."
            )
    return scale


def _log_z_hat(where: str, make_filter: Callable, theta, key):
    """``log Z-hat(theta)``: the final log Z of the program ``make_filter(theta)``."""
    program = make_filter(theta)
    result = evaluate.evaluate(program, seed=key, where=where)()
    if result.metrics is None:
        raise ValueError(
            f"{where}: make_filter(theta) returned an unweighted program; it "
            f"must return a particle filter (e.g. algo.smc(...)) whose "
            f"metrics['log_Z'] estimates log p(y | theta)."
        )
    log_z = result.metrics.log_Z
    if jnp.shape(log_z) != ():
        raise ValueError(
            f"{where}: make_filter(theta)'s log_Z has shape {jnp.shape(log_z)}; "
            f"PMMH needs one estimate of log p(y | theta), shape ()."
        )
    return log_z


def pmmh(
    key,
    make_filter: Callable,
    init_theta,
    num_iterations: int,
    *,
    scale,
    prior: Callable | None = None,
) -> PMMHResult:
    """Particle marginal Metropolis-Hastings over static parameters ``theta``.

    The chain targets ``p(theta | y) ∝ p(theta) p(y | theta)`` with the
    likelihood replaced by the unbiased estimate ``Z-hat(theta)`` of a
    particle filter, which the chain keeps with its current state (never
    re-estimated): it is exact (Andrieu, Doucet & Holenstein 2010). Each
    iteration proposes a Gaussian random walk ``u' = u + scale * eps`` in
    the unconstrained space ``u`` of ``theta`` (``theta = T(u)``, ``T =
    biject_to(support)`` of each prior site, so a positive parameter stays
    positive), runs a fresh filter at ``theta'`` and accepts with
    probability ``min(1, Z-hat(theta') p(theta') |T'(u')| / (Z-hat(theta)
    p(theta) |T'(u)|))``.

    The model is given as ``make_filter(theta)``, a function returning the
    filter program (no arguments) whose ``metrics["log_Z"]`` estimates
    ``log p(y | theta)``, e.g.
    ``lambda theta: algo.smc(targets(theta), proposals(theta), num_targets=T)``.
    ``theta`` may be traced: build the program from it, don't convert it to
    Python numbers.

    Args:
      key: a PRNG key.
      make_filter: ``theta -> program``.
      init_theta: the starting ``theta``: with a prior, a dict ``{site:
        value}`` of the prior's sample sites (``None``: drawn from the
        prior); without one, any pytree of float arrays.
      num_iterations: ``K``, a positive int.
      scale: the random-walk standard deviation in the unconstrained space,
        a float or a pytree like ``theta``.
      prior: an optional numpyro program of no arguments sampling each
        parameter (e.g. ``numpyro.sample("a", dist.Uniform(-1, 1))``);
        ``None`` is a flat prior on the pytree ``theta`` (no constraint).

    Returns:
      :class:`PMMHResult`: the chain of ``theta``, its log Z-hats and
      acceptances.

    Raises:
      ValueError: at trace time, naming ``pmmh``, for a ``theta`` that does
        not match the prior's sites or shapes, a discrete prior site, a
        filter whose ``log_Z`` is not one number, or a bad
        ``num_iterations``.

    Example:
      >>> ys = jnp.array([0.3, -0.1, 0.4, 0.8])
      >>> def step(a, t, observe=True):  # x_t ~ N(a x_{t-1}, 1), y_t ~ N(x_t, 0.5)
      ...     def program(*x_prev):
      ...         loc = a * x_prev[0] if x_prev else 0.0
      ...         with numpyro.plate("particles", 32):
      ...             x = numpyro.sample("x", dist.Normal(loc, 1.0))
      ...             if observe:
      ...                 numpyro.sample("y", dist.Normal(x, 0.5), obs=ys[t])
      ...         return (x,)
      ...     return program
      >>> def make_filter(theta):
      ...     return coix.algo.smc(lambda t: step(theta["a"], t),
      ...                          lambda t: step(theta["a"], t, observe=False),
      ...                          num_targets=4)
      >>> def prior():  # its support, (-1, 1), sets the random walk's space
      ...     numpyro.sample("a", dist.Uniform(-1.0, 1.0))
      >>> chain = pmmh(jax.random.key(0), make_filter, {"a": 0.5}, 50,
      ...              scale=0.5, prior=prior)
      >>> chain.thetas["a"].shape, bool(jnp.all(jnp.abs(chain.thetas["a"]) < 1))
      ((50,), True)

    References:
      Andrieu, Doucet & Holenstein (2010), "Particle Markov chain Monte
      Carlo methods", JRSS B 72(3), Section 2.4.2 (PMMH); Andrieu &
      Roberts (2009), "The pseudo-marginal approach for efficient Monte
      Carlo computations", Annals of Statistics 37(2).
    """
    where = "pmmh"
    if not callable(make_filter):
        raise TypeError(
            f"{where}: make_filter must be a callable theta -> program, got "
            f"{type(make_filter).__name__}."
        )
    if (
        isinstance(num_iterations, bool)
        or not isinstance(num_iterations, int)
        or num_iterations < 1
    ):
        raise ValueError(
            f"{where}: num_iterations must be a positive int, got {num_iterations!r}."
        )
    key_init, key_first, key_chain = jax.random.split(key, 3)
    if prior is None:
        if init_theta is None:
            raise ValueError(
                f"{where}: without a prior, init_theta must be given (there is "
                f"nothing to draw it from)."
            )
        space = _flat_space()
    else:
        evaluate.check_callable(where, prior=prior)
        drawn = evaluate.evaluate(prior, seed=key_init, where=where)()
        if init_theta is None:
            init_theta = {
                name: s.value for name, s in drawn.trace.items() if not s.observed
            }
        space = _prior_space(where, prior, init_theta, drawn)
    init_theta = jax.tree_util.tree_map(jnp.asarray, init_theta)
    u = space.to_unconstrained(init_theta)
    scales = _scales(where, scale, u)

    def log_z_at(u, key):
        return _log_z_hat(where, make_filter, space.to_theta(u), key)

    def invalid_to_minus_inf(x):
        return jnp.where(jnp.isnan(x), -jnp.inf, x)

    def iteration(state, key_iteration):
        u, log_z, log_prior = state
        key_walk, key_filter, key_accept = jax.random.split(key_iteration, 3)
        leaves, tree = jax.tree_util.tree_flatten(u)
        walk_keys = jax.random.split(key_walk, len(leaves))
        noise = jax.tree_util.tree_unflatten(
            tree,
            [
                jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf, float))
                for k, leaf in zip(walk_keys, leaves, strict=True)
            ],
        )
        proposed = jax.tree_util.tree_map(lambda x, s, e: x + s * e, u, scales, noise)
        proposed_log_z = invalid_to_minus_inf(log_z_at(proposed, key_filter))
        proposed_log_prior = invalid_to_minus_inf(space.log_prior(proposed))
        log_ratio = (proposed_log_z + proposed_log_prior) - (log_z + log_prior)
        log_uniform = jnp.log(jax.random.uniform(key_accept, ()))
        accept = log_uniform < log_ratio
        new = jax.tree_util.tree_map(
            lambda a, b: jnp.where(accept, a, b),
            (proposed, proposed_log_z, proposed_log_prior),
            (u, log_z, log_prior),
        )
        return new, (space.to_theta(new[0]), new[1], accept)

    log_z = invalid_to_minus_inf(log_z_at(u, key_first))
    log_prior = invalid_to_minus_inf(space.log_prior(u))
    start = (u, log_z, jnp.asarray(log_prior, log_z.dtype))
    _, (thetas, log_zs, accepted) = jax.lax.scan(
        iteration, start, jax.random.split(key_chain, num_iterations)
    )
    return PMMHResult(
        thetas=thetas,
        log_Z=log_zs,
        accepted=accepted,
        acceptance_rate=jnp.mean(accepted),
    )
