"""Metropolis-Hastings kernels as pure array maths, one accept per particle.

A kernel moves a population of particles at once. Positions are pytrees of
unconstrained arrays holding every particle (the particle axis where the
program's plates put it); a :class:`Space` says how to score them, how to
sum an elementwise quantity into one number per particle (the weights'
layout) and how to pick, per particle, between two positions. Particles
never interact: each one accepts or rejects its own proposal, so the joint
kernel is a product of per-particle kernels, and each leaves the target
invariant (Metropolis et al. 1953; Hastings 1970).

Every kernel uses a diagonal preconditioner ``scale`` (one entry per
coordinate, e.g. the particles' spread; see :func:`combinators.move`) and a
dimensionless ``step_size``:

* :func:`rwm`: random-walk Metropolis, ``u' = u + h * scale * eps``.
* :func:`mala`: Metropolis-adjusted Langevin (Roberts & Tweedie 1996),
  ``u' = u + h^2/2 * scale^2 * grad + h * scale * eps``.
* :func:`hmc`: Hamiltonian Monte Carlo (Duane et al. 1987; Neal 2011) with
  mass matrix ``diag(scale)^-2`` and ``num_leapfrog`` leapfrog steps.

Default step sizes follow the optimal-scaling results for a standard normal
target in ``d`` dimensions (Roberts, Gelman & Gilks 1997: ``2.38 / sqrt(d)``;
Roberts & Rosenthal 1998: ``1.65 d^(-1/3)`` for MALA; Beskos et al. 2013:
``d^(-1/4)`` for HMC).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ACCEPT_RATE",
    "KERNELS",
    "MCMCKernel",
    "Space",
    "State",
    "coordinates_per_particle",
    "from_blackjax",
    "hmc",
    "mala",
    "rwm",
    "step_size",
]


#: The metrics key of the mean acceptance probability of a move.
ACCEPT_RATE = "accept_rate"


class Space(NamedTuple):
    """How a kernel sees the particles.

    Attributes:
      log_density: ``log_density(position) -> (lp, grad)``: the target's log
        density per particle (the weights' layout shape) and its gradient
        with respect to the position (a pytree like the position).
      total: ``total(tree) -> array``: sums an elementwise pytree (shaped like
        the position) into one number per particle (layout shape).
      select: ``select(accept, new, old) -> tree``: per particle, ``new``
        where ``accept`` (layout shape, boolean) holds, else ``old``.
      to_particles: ``to_particles(tree) -> tree`` with one leading axis of
        ``P`` particles (every weight cell of the layout; one chain each), or
        ``None`` where the population cannot be split so (used by
        :func:`from_blackjax`).
      from_particles: the inverse of ``to_particles``.
    """

    log_density: Callable[[Any], tuple[Any, Any]]
    total: Callable[[Any], Any]
    select: Callable[[Any, Any, Any], Any]
    to_particles: Callable[[Any], Any] | None = None
    from_particles: Callable[[Any], Any] | None = None


class State(NamedTuple):
    """A position with its log density (per particle) and gradient."""

    position: Any
    log_density: Any
    grad: Any


class MCMCKernel(NamedTuple):
    """A Metropolis-Hastings kernel over a population of particles.

    Attributes:
      name: ``"rwm"``, ``"mala"`` or ``"hmc"``.
      step: ``step(key, state, space, scale) -> (state, accept_prob)``;
        ``accept_prob`` is the per-particle acceptance probability.
      step_size: the dimensionless step size, or ``None`` for the default of
        the dimension (``default_step_size(d)``).
      default_step_size: ``d -> float``.
    """

    name: str
    step: Callable
    step_size: float | None
    default_step_size: Callable[[int], float | jax.Array]


def _normal_like(key, tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


def _accept(key, log_ratio, proposed: State, state: State, space: Space):
    """Metropolis-Hastings accept/reject per particle; NaN ratios reject."""
    log_ratio = jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio)
    accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
    uniform = jax.random.uniform(key, jnp.shape(log_ratio))
    accept = jnp.log(uniform) < log_ratio
    new = State(
        space.select(accept, proposed.position, state.position),
        jnp.where(accept, proposed.log_density, state.log_density),
        space.select(accept, proposed.grad, state.grad),
    )
    return new, accept_prob


def _evaluate(space: Space, position) -> State:
    lp, grad = space.log_density(position)
    return State(position, lp, grad)


def _zero_cotangent(x):
    """A zero cotangent for ``x`` (``float0`` for integer and key arrays)."""
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _tmap(fn, *trees):
    return jax.tree_util.tree_map(fn, *trees)


def rwm(step_size: float | None = None) -> MCMCKernel:
    """Random-walk Metropolis with a Gaussian proposal.

    Args:
      step_size: ``h`` in ``u' = u + h * scale * eps``; default
        ``2.38 / sqrt(d)``.

    Returns:
      The kernel.
    """

    def step(key, state: State, space: Space, scale, h):
        key_eps, key_u = jax.random.split(key)
        eps = _normal_like(key_eps, state.position)
        position = _tmap(lambda u, s, e: u + h * s * e, state.position, scale, eps)
        proposed = _evaluate(space, position)
        return _accept(
            key_u, proposed.log_density - state.log_density, proposed, state, space
        )

    return MCMCKernel("rwm", step, step_size, lambda d: 2.38 / jnp.sqrt(d))


def mala(step_size: float | None = None) -> MCMCKernel:
    """Metropolis-adjusted Langevin algorithm (Roberts & Tweedie 1996).

    Args:
      step_size: ``h`` in ``u' = u + h^2/2 * scale^2 * grad + h * scale *
        eps``; default ``1.65 * d^(-1/3)``.

    Returns:
      The kernel.
    """

    def step(key, state: State, space: Space, scale, h):
        key_eps, key_u = jax.random.split(key)
        eps = _normal_like(key_eps, state.position)

        def drift(s: State):
            return _tmap(
                lambda u, g, c: u + 0.5 * (h * c) ** 2 * g, s.position, s.grad, scale
            )

        forward_mean = drift(state)
        position = _tmap(lambda m, c, e: m + h * c * e, forward_mean, scale, eps)
        proposed = _evaluate(space, position)
        backward_mean = drift(proposed)

        def log_q(x, mean):
            return -0.5 * space.total(
                _tmap(lambda a, m, c: ((a - m) / (h * c)) ** 2, x, mean, scale)
            )

        log_ratio = (
            proposed.log_density
            - state.log_density
            + log_q(state.position, backward_mean)
            - log_q(position, forward_mean)
        )
        return _accept(key_u, log_ratio, proposed, state, space)

    return MCMCKernel("mala", step, step_size, lambda d: 1.65 * d ** (-1.0 / 3.0))


def hmc(step_size: float | None = None, num_leapfrog: int = 5) -> MCMCKernel:
    """Hamiltonian Monte Carlo with a diagonal mass matrix ``diag(scale)^-2``.

    Args:
      step_size: the leapfrog step ``h`` (in units of ``scale``); default
        ``d^(-1/4)``.
      num_leapfrog: leapfrog steps per proposal.

    Returns:
      The kernel.

    References:
      Duane, Kennedy, Pendleton & Roweth (1987), "Hybrid Monte Carlo",
      Physics Letters B; Neal (2011), "MCMC using Hamiltonian dynamics",
      Handbook of MCMC.
    """
    if int(num_leapfrog) < 1:
        raise ValueError(f"hmc: num_leapfrog must be >= 1, got {num_leapfrog}.")
    num_leapfrog = int(num_leapfrog)

    def step(key, state: State, space: Space, scale, h):
        key_eps, key_u = jax.random.split(key)
        eps = _normal_like(key_eps, state.position)
        # Momentum r ~ N(0, diag(scale)^-2): r = eps / scale, and the
        # kinetic energy 0.5 * sum (scale * r)^2 is 0.5 * sum eps^2.
        momentum = _tmap(lambda e, c: e / c, eps, scale)

        def kinetic(r):
            return 0.5 * space.total(_tmap(lambda x, c: (c * x) ** 2, r, scale))

        def half_kick(r, grad):
            return _tmap(lambda x, g: x + 0.5 * h * g, r, grad)

        def leapfrog(_, carry):
            s, r = carry
            r = half_kick(r, s.grad)
            position = _tmap(lambda u, x, c: u + h * c**2 * x, s.position, r, scale)
            s = _evaluate(space, position)
            return s, half_kick(r, s.grad)

        proposed, r = jax.lax.fori_loop(0, num_leapfrog, leapfrog, (state, momentum))
        log_ratio = (proposed.log_density - kinetic(r)) - (
            state.log_density - kinetic(momentum)
        )
        return _accept(key_u, log_ratio, proposed, state, space)

    return MCMCKernel("hmc", step, step_size, lambda d: d ** (-0.25))


def from_blackjax(
    make: Callable[[Callable, Any], Any],
    *,
    default_step_size: Callable[[int], float] = lambda d: d ** (-0.25),
    step_size: float | None = None,
    name: str = "blackjax",
) -> MCMCKernel:
    """Any BlackJAX kernel as the kernel of a move: one chain per particle.

    BlackJAX kernels move one chain whose log density is a function of one
    position. The adapter vmaps the kernel over the particles and gives it
    a per-particle ``logdensity_fn`` whose batched evaluation is one
    evaluation of the whole population (a ``custom_vmap`` rule with a
    ``custom_vjp`` for its gradient), so a step costs what the built-in
    kernels cost. Positions are preconditioned by change of variables: the
    chain runs on ``z = u / scale`` (``scale``: the particles' spread, see
    :func:`combinators.move`), so a unit step size fits every coordinate.
    The acceptance rate recorded is BlackJAX's ``info.acceptance_rate``.

    Requires ``blackjax`` (``pip install combinators[blackjax]``); the
    adapter itself does not import it.

    Args:
      make: ``make(logdensity_fn, step_size) -> SamplingAlgorithm`` (an
        object with ``init(position)`` and ``step(key, state)``), e.g.
        ``lambda f, h: blackjax.mala(f, h)`` or ``lambda f, h:
        blackjax.hmc(f, h, jnp.ones(d), 5)`` (``d``: coordinates per
        particle). Positions are dicts of the latents' unconstrained values
        for one particle.
      default_step_size: ``d -> float``, the step size when none is given.
      step_size: the step size (``None``: the default for the dimension);
        tuned by ``tempered_smc(..., target_accept=...)`` like the
        built-in kernels'.
      name: the kernel's name in errors.

    Returns:
      The kernel.

    Example:
      >>> import blackjax
      >>> kernel = from_blackjax(lambda f, h: blackjax.mala(f, h))
      >>> def prior():
      ...     with numpyro.plate("particles", 16):
      ...         return (numpyro.sample("z", dist.Normal(0.0, 1.0)),)
      >>> def posterior():
      ...     with numpyro.plate("particles", 16):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
      >>> step = coix.move(coix.resample(coix.propose(posterior, prior)),
      ...                  posterior, kernel)
      >>> run = jax.jit(lambda key: coix.traced_evaluate(step, seed=key)())
      >>> _, trace, _ = run(jax.random.key(0))
      >>> trace["z"].value.shape
      (16,)
    """

    def step(key, state: State, space: Space, scale, h):
        if space.to_particles is None or space.from_particles is None:
            raise ValueError(
                f"{name}: this population cannot be split into one chain per "
                f"particle (its Space has no to_particles); use it through "
                f"combinators.move."
            )
        scale_p = space.to_particles(scale)
        z = _tmap(lambda u, c: u / c, space.to_particles(state.position), scale_p)

        def population(z_p):
            """Log densities (P,) and gradients in z of all particles."""
            u = space.from_particles(_tmap(lambda a, c: a * c, z_p, scale_p))
            lp, grad = space.log_density(u)
            grad_z = _tmap(lambda g, c: g * c, space.to_particles(grad), scale_p)
            return jnp.ravel(lp), grad_z

        # custom_vmap and custom_vjp functions may not close over tracers
        # (blackjax runs them inside its own loops): hoist them as arguments.
        converted, consts = jax.closure_convert(population, z)

        @jax.custom_batching.custom_vmap
        def value_and_grad(z_i, consts):
            # Unbatched (never used by the adapter itself): put the position
            # in every particle's slot and read particle 0.
            everywhere = _tmap(lambda a, ref: jnp.broadcast_to(a, ref.shape), z_i, z)
            lp, grad = converted(everywhere, *consts)
            return lp[0], _tmap(lambda g: g[0], grad)

        @value_and_grad.def_vmap
        def _batched(axis_size, in_batched, z_p, consts):
            if any(jax.tree_util.tree_leaves(in_batched[1])):
                raise ValueError(
                    f"{name}: the population's log density was batched over "
                    f"more than its particles."
                )
            z_p = _tmap(
                lambda a, batched, ref: a
                if batched
                else jnp.broadcast_to(a, ref.shape),
                z_p,
                in_batched[0],
                z,
            )
            out = converted(z_p, *consts)
            return out, _tmap(lambda _: True, out)

        @jax.custom_vjp
        def log_density_of(z_i, consts):
            return value_and_grad(z_i, consts)[0]

        def forward(z_i, consts):
            lp, grad = value_and_grad(z_i, consts)
            return lp, (grad, consts)

        def backward(residual, cotangent):
            grad, consts = residual
            return (
                _tmap(lambda g: cotangent * g, grad),
                _tmap(_zero_cotangent, consts),
            )

        log_density_of.defvjp(forward, backward)

        def logdensity_fn(z_i):
            return log_density_of(z_i, consts)

        algorithm = make(logdensity_fn, h)
        num = jnp.size(state.log_density)
        state_type = type(jax.eval_shape(jax.vmap(algorithm.init), z))
        fields = getattr(state_type, "_fields", ())
        if set(fields) <= {"position", "logdensity", "logdensity_grad"}:
            # The usual state: built from the current one, no re-evaluation.
            known = dict(
                position=z,
                logdensity=jnp.ravel(state.log_density),
                logdensity_grad=_tmap(
                    lambda g, c: g * c, space.to_particles(state.grad), scale_p
                ),
            )
            states = state_type(**{f: known[f] for f in fields})
        else:
            states = jax.vmap(algorithm.init)(z)
        new, info = jax.vmap(algorithm.step)(jax.random.split(key, num), states)
        position = space.from_particles(
            _tmap(lambda a, c: a * c, new.position, scale_p)
        )
        grad = getattr(new, "logdensity_grad", None)
        grad = (
            _tmap(jnp.zeros_like, state.grad)
            if grad is None
            else space.from_particles(_tmap(lambda g, c: g / c, grad, scale_p))
        )
        shape = jnp.shape(state.log_density)
        accept = getattr(info, "acceptance_rate", None)
        if accept is None:
            raise ValueError(
                f"{name}: the BlackJAX kernel's info has no acceptance_rate "
                f"(got {type(info).__name__}); moves record it."
            )
        return (
            State(position, jnp.reshape(new.logdensity, shape), grad),
            jnp.reshape(accept, shape),
        )

    return MCMCKernel(name, step, step_size, default_step_size)


#: Kernel constructors by name.
KERNELS = {"rwm": rwm, "mala": mala, "hmc": hmc}


def coordinates_per_particle(arrays, layout_shape) -> int:
    """Coordinates per particle (and weight column) of a population's arrays."""
    return sum(math.prod(jnp.shape(x)) for x in arrays) // max(
        1, math.prod(layout_shape)
    )


def step_size(kernel: MCMCKernel, dim: int):
    """The kernel's step size, or its default for ``dim`` coordinates."""
    if kernel.step_size is not None:
        return kernel.step_size
    return kernel.default_step_size(max(dim, 1))


def run(
    key, kernel: MCMCKernel, space: Space, position, scale, num_steps: int, dim: int
):
    """``num_steps`` kernel steps from ``position``; mean acceptance per particle.

    Args:
      key: a PRNG key.
      kernel: the kernel.
      space: the particles' :class:`Space`.
      position: the starting position.
      scale: the preconditioner (a pytree like the position).
      num_steps: the number of kernel steps.
      dim: coordinates per particle (for the default step size).

    Returns:
      ``(state, accept_prob)``: the final :class:`State` and the
      acceptance probability per particle averaged over the steps.
    """
    h = step_size(kernel, dim)
    state = _evaluate(space, position)

    def body(i, carry):
        s, total = carry
        s, accept_prob = kernel.step(jax.random.fold_in(key, i), s, space, scale, h)
        return s, total + accept_prob

    state, total = jax.lax.fori_loop(
        0, num_steps, body, (state, jnp.zeros_like(state.log_density))
    )
    return state, total / num_steps
