"""MCMC moves of weighted particles: ``move``.

``move(q, p, kernel)`` runs ``q`` and moves every particle's latent values
with a Metropolis-Hastings kernel that leaves ``p`` invariant; the weights,
and so the log Z estimate, are unchanged (the resample-move step of Gilks
& Berzuini 2001 and the SMC samplers of Del Moral, Doucet & Jasra 2006).
Latents are moved in numpyro's unconstrained space (``biject_to`` of each
site's support, with the log-Jacobian added to the density), so a positive
scale or a simplex stays in its support.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from numpyro.distributions.transforms import biject_to

from combinators import mcmc, weights
from combinators.core import evaluate
from combinators.core import keys as _keys

__all__ = ["move"]


def _site_axes(name, site, u, layout, where):
    """A latent's batch and unconstrained event ndims; checks its particle axis."""
    batch_ndim = jnp.ndim(site.value) - site.event_dim
    event_ndim = jnp.ndim(u) - batch_ndim
    if layout.ndim == 0:
        return batch_ndim, event_ndim
    n = layout.shape[0]
    shape = jnp.shape(site.value)[:batch_ndim]
    if batch_ndim < layout.ndim or shape[batch_ndim - layout.ndim] != n:
        raise ValueError(
            f"{where}: latent site {name!r} has batch shape {shape} without the "
            f"particle axis (layout {layout.shape}, {n} particles at dim "
            f"{-layout.ndim}); a move changes each particle's own value, so "
            f"every moved latent must be drawn inside the particle plate."
        )
    return batch_ndim, event_ndim


def _align(x, batch_ndim, event_ndim, layout):
    """A layout-shaped array reshaped to broadcast against a site's value."""
    lead = batch_ndim - layout.ndim
    return jnp.reshape(x, (1,) * lead + layout.shape + (1,) * event_ndim)


def _to_particles(name, x, batch_ndim, event_ndim, layout, where):
    """A site's array with its layout axes first, flattened into one."""
    lead = batch_ndim - layout.ndim
    block = jnp.shape(x)[lead:batch_ndim]
    if tuple(block) != tuple(layout.shape):
        raise ValueError(
            f"{where}: latent site {name!r} has batch dims {block} at the weights' "
            f"layout {layout.shape}; a one-chain-per-particle kernel "
            f"(mcmc.from_blackjax) needs one value per weight cell."
        )
    moved = jnp.moveaxis(x, tuple(range(lead, batch_ndim)), tuple(range(layout.ndim)))
    return jnp.reshape(moved, (-1,) + moved.shape[layout.ndim :])


def _from_particles(x, like, batch_ndim, event_ndim, layout):
    """The inverse of :func:`_to_particles` (``like``: an array of the site's shape)."""
    lead = batch_ndim - layout.ndim
    moved = jnp.reshape(x, tuple(layout.shape) + x.shape[1:])
    return jnp.moveaxis(
        moved, tuple(range(layout.ndim)), tuple(range(lead, batch_ndim))
    ).reshape(jnp.shape(like))


def _spread(u, w, batch_ndim, event_ndim, layout):
    """Weighted standard deviation of ``u`` over the particle axis (per coordinate)."""
    if layout.ndim == 0:
        return jnp.ones_like(u)
    axis = batch_ndim - layout.ndim
    w = _align(w, batch_ndim, event_ndim, layout)
    mean = jnp.sum(w * u, axis=axis, keepdims=True)
    var = jnp.sum(w * (u - mean) ** 2, axis=axis, keepdims=True)
    std = jnp.sqrt(var)
    # A collapsed population (every particle equal) has no spread to learn
    # from: fall back to unit scale rather than freezing the particles.
    return jnp.broadcast_to(jnp.where(std > 0, std, 1.0), jnp.shape(u))


def move(
    q: Callable,
    p: Callable,
    kernel: mcmc.MCMCKernel,
    *,
    num_steps: int = 1,
    adapt_scale: bool = True,
) -> Callable:
    """Moves the particles of ``q`` with an MCMC kernel that leaves ``p`` invariant.

    Each particle takes ``num_steps`` Metropolis-Hastings steps, accepting
    or rejecting its own proposals; the log weights (hence ``log Z``) are
    unchanged. The returned program has ``p``'s sites at the moved values
    (re-scored by ``p``), so ``propose(p_next, move(q, p, kernel))`` weighs
    by ``p_next / p``: the resample-move SMC step is
    ``move(resample(propose(p_next, q)), p_next, kernel)``.

    Args:
      q: a (weighted) program whose latents ``p`` scores, e.g.
        ``resample(propose(p, q0))``; its particle axis is declared by a
        plate.
      p: the unweighted program the kernel leaves invariant; called with the
        same arguments as ``q``. Every latent of ``p`` must come from ``q``.
      kernel: ``mcmc.rwm()``, ``mcmc.mala()``, ``mcmc.hmc()`` or any
        :class:`~combinators.mcmc.MCMCKernel`.
      num_steps: kernel steps per particle.
      adapt_scale: precondition each unconstrained coordinate by the
        particles' weighted spread (standard deviation over the particle
        axis) before moving; otherwise unit scale. The step size is the
        kernel's (default: scaled to the dimension).

    Returns:
      A weighted program; its ``metrics["accept_rate"]`` is the mean
      acceptance probability over particles and steps (a new metrics field:
      in ``fori_loop``/``scan`` bodies that move, start from a moved
      program too, so the loop's carry has it from the start).

    Raises:
      ValueError: at trace time, naming the site, when a latent of ``p`` is
        not given by ``q``, is discrete, or has no particle axis.

    Example:
      >>> def prior():
      ...     with numpyro.plate("particles", 16):
      ...         return (numpyro.sample("z", dist.Normal(0.0, 1.0)),)
      >>> def posterior():  # unnormalised: prior times likelihood
      ...     with numpyro.plate("particles", 16):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
      >>> q = coix.resample(coix.propose(posterior, prior))
      >>> step = move(q, posterior, coix.mcmc.mala(), num_steps=2)
      >>> run = jax.jit(lambda key: coix.traced_evaluate(step, seed=key)())
      >>> _, _, metrics = run(jax.random.key(0))
      >>> metrics["accept_rate"].shape
      ()

    References:
      Gilks & Berzuini (2001), "Following a moving target -- Monte Carlo
      inference for dynamic Bayesian models", JRSS B; Del Moral, Doucet &
      Jasra (2006), "Sequential Monte Carlo samplers", JRSS B.
    """
    where = "move"
    evaluate.check_callable(where, q=q, p=p)
    if not isinstance(kernel, mcmc.MCMCKernel):
        raise TypeError(
            f"{where}: kernel must be an MCMCKernel (mcmc.rwm(), mcmc.mala(), "
            f"mcmc.hmc(), or a BlackJAX kernel through mcmc.from_blackjax(...)), "
            f"got {type(kernel).__name__}."
        )
    if int(num_steps) < 1:
        raise ValueError(f"{where}: num_steps must be >= 1, got {num_steps}.")
    num_steps = int(num_steps)

    def moved(*args, **kwargs):
        key_m, args = _keys.own_key(args)
        if key_m is None:
            raise ValueError(
                f"{where}: no PRNG key was given; {_keys.HOW_TO_PASS_A_KEY}."
            )
        q_eval = evaluate.evaluate(q, where=where)(*args, **kwargs)
        trace = q_eval.trace.marginal()
        metrics = q_eval.metrics or evaluate.default_metrics(trace, where="move")
        values = {n: s.value for n, s in trace.items() if not s.observed}
        p_eval, supports = evaluate.evaluate_with_supports(
            p, {(n, 0): v for n, v in values.items()}, where=where
        )(*args, **kwargs)
        p_trace = p_eval.trace.marginal()
        latent = sorted(n for n, s in p_trace.items() if not s.observed)
        for name in latent:
            if (name, 0) not in p_eval.substituted:
                raise ValueError(
                    f"{where}: the target samples latent site {name!r} that the "
                    f"particles of q do not carry; a move only moves existing "
                    f"values (q's latents: {sorted(values)})."
                )
            if supports[name].is_discrete:
                raise ValueError(
                    f"{where}: latent site {name!r} is discrete (support "
                    f"{supports[name]}); the MCMC kernels here move continuous "
                    f"latents only."
                )
        layout = weights.layout_of(p_trace, where=where)
        log_weight = weights.reduce_to_layout(metrics.log_weight, layout, where=where)
        bijections = {n: biject_to(supports[n]) for n in latent}
        start = {n: bijections[n].inv(values[n]) for n in latent}
        axes = {n: _site_axes(n, p_trace[n], start[n], layout, where) for n in latent}

        def constrained(u):
            return {n: bijections[n](u[n]) for n in latent}

        def per_particle(n, x):
            """Sums the dims right of the site's batch dims, then to the layout."""
            batch_ndim = axes[n][0]
            summed = jnp.sum(x, axis=tuple(range(batch_ndim, jnp.ndim(x))))
            return weights.reduce_to_layout(summed, layout, where=where)

        def log_density_sum(u):
            x = constrained(u)
            ev = evaluate.evaluate(p, {(n, 0): v for n, v in x.items()}, where=where)(
                *args, **kwargs
            )
            lp = weights.trace_log_prob(
                [s for _, _, s in ev.trace.marginal().generations()], layout
            )
            for n in latent:
                jac = bijections[n].log_abs_det_jacobian(u[n], x[n])
                lp = lp + per_particle(n, jac)
            return jnp.sum(lp), lp

        grad_fn = jax.grad(log_density_sum, has_aux=True)

        def log_density(u):
            grad, lp = grad_fn(u)
            return lp, grad

        def total(tree):
            out = jnp.zeros(layout.shape)
            for n in latent:
                out = out + per_particle(n, tree[n])
            return out

        def select(accept, new, old):
            return {
                n: jnp.where(_align(accept, *axes[n], layout), new[n], old[n])
                for n in latent
            }

        def to_particles(tree):
            return {
                n: _to_particles(n, tree[n], *axes[n], layout, where) for n in latent
            }

        def from_particles(tree):
            return {
                n: _from_particles(tree[n], start[n], *axes[n], layout) for n in latent
            }

        space = mcmc.Space(log_density, total, select, to_particles, from_particles)
        if adapt_scale:
            w = jax.nn.softmax(jax.lax.stop_gradient(log_weight), axis=0)
            scale = {
                n: jax.lax.stop_gradient(_spread(start[n], w, *axes[n], layout))
                for n in latent
            }
        else:
            scale = {n: jnp.ones_like(start[n]) for n in latent}
        dim = mcmc.coordinates_per_particle(start.values(), layout.shape)
        state, accept_prob = mcmc.run(
            key_m, kernel, space, start, scale, num_steps, dim
        )
        final = constrained(state.position)
        p_final = evaluate.evaluate(
            p, {(n, 0): v for n, v in final.items()}, where=where
        )(*args, **kwargs)
        marginal = p_final.trace.marginal()
        new_metrics = metrics.replace(
            log_density=evaluate.mean_log_density(
                [marginal[n] for n in marginal], layout
            ),
            **{mcmc.ACCEPT_RATE: jnp.mean(accept_prob)},
        )
        return evaluate.empirical(p_final.out, marginal, new_metrics)(*args, **kwargs)

    return moved
