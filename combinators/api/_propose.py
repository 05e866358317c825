"""Importance sampling of a target by a proposal: ``propose``.

With ``p`` the target and ``q`` the proposal, ``propose(p, q)`` runs ``q``,
scores its latent values under ``p`` and returns ``p``'s sites with log
weight ``w = w_in + log p(sites of p that q gave, observed) - log q(all q
sites)``, where ``w_in`` is ``q``'s own weight. Latents only in ``p`` are
drawn from ``p`` and cancel.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from combinators import weights
from combinators.core import checked, evaluate
from combinators.core import keys as _keys
from combinators.core.trace import Trace

__all__ = ["propose"]


_INCREMENTAL_HINT = (
    "If the target only adds new sites to the previous target (one SMC step "
    "of a state-space model), write the step as "
    "compose(propose(p_t, k_t), resample(q)): the step's weight multiplies "
    "the previous weight and only the new sites are scored (with "
    "algo.smc, vsmc or nasmc: form='incremental'; their form='path', the "
    "default of vsmc and nasmc as in Coix, needs targets that score the "
    "whole path)."
)


def _check_unmatched_latents(q_trace: Trace, matched: set, p_trace: Trace) -> None:
    for name, generation, site in q_trace.generations():
        if site.observed or (name, generation) in matched:
            continue
        if generation == 0 and name in p_trace:
            raise ValueError(
                f"propose: the target has a site {name!r}, but as an older "
                f"generation (depth) than the proposal's, so it does not score "
                f"the proposal's value. This happens when the target is built "
                f"with compose(q2, q1) and the default suffix=True, which makes "
                f"q1's sites older generations; build the target with "
                f"compose(q2, q1, suffix=False) (or q1 >> q2)."
            )
        if generation == 0:
            raise ValueError(
                f"propose: the proposal samples latent site {name!r} that the "
                f"target does not score; its density would enter the weight "
                f"without a counterpart in the target, which biases the weights. "
                f"Add {name!r} to the target, or extend the target with a kernel "
                f"that scores it: propose(extend(p, f), q). {_INCREMENTAL_HINT}"
            )
        successor = q_trace.history(name)[generation - 1]
        if not successor.deterministic:
            raise ValueError(
                f"propose: the proposal re-samples site {name!r} with a stochastic "
                f"kernel, but the target has no reverse kernel scoring its "
                f"previous value; use propose(extend(p, reverse_kernel), q) "
                f"(a deterministic Delta kernel needs none). {_INCREMENTAL_HINT}"
            )


def _layout_text(site) -> str:
    plates = ", ".join(f"{f.name!r} (size {f.size}, dim {f.dim})" for f in site.plates)
    return (
        f"value shape {tuple(jnp.shape(site.value))}, event dims {site.event_dim}, "
        f"plates [{plates}]"
    )


def _check_event_dims(p_eval, q_trace: Trace) -> None:
    """Target and proposal agree on each shared site's event dims.

    Plates (sizes and dims) are checked for every site by
    ``weights.layout_of``.
    """
    for (name, generation), (_, depth) in p_eval.substituted.items():
        p_site = p_eval.trace.history(name)[generation]
        q_site = q_trace.history(name)[depth]
        if p_site.event_dim != q_site.event_dim:
            raise ValueError(
                f"propose: site {name!r} has {p_site.event_dim} event dim(s) in "
                f"the target but {q_site.event_dim} in the proposal, so its log "
                f"densities are not comparable per particle. Declare the same "
                f"event dims in both (e.g. .to_event(1) in both, or a plate in "
                f"both). Target: {_layout_text(p_site)}; proposal: "
                f"{_layout_text(q_site)}."
            )


def propose(
    p: Callable,
    q: Callable,
    *,
    loss_fn: Callable | None = None,
    detach: bool = False,
    chain: bool = False,
) -> Callable:
    """Importance sampling: target ``p`` with proposal ``q``.

    Args:
      p: the target program (unweighted; scores the proposal's latents).
      q: the proposal program (may itself be weighted, e.g. a resampled
        ``propose``).
      loss_fn: ``loss_fn(q_trace, p_trace, incoming_log_weight,
        incremental_log_weight)``; its value is added to the ``loss`` metric.
      detach: re-evaluate the target on latent values without gradient; the
        loss and the returned program (its trace and outputs) see only those
        detached values, so later combinators cannot train the kernels that
        produced them. The log weight keeps its gradient.
      chain: call ``p`` with ``q``'s outputs instead of the arguments.

    Returns:
      A weighted program whose trace is ``p``'s marginal (auxiliary sites
      dropped) and whose metrics carry the new log weights, ESS, log Z and
      loss.

    Raises:
      ValueError: at trace time, naming the site, when the proposal samples a
        site the target observes or does not score, when particle sizes
        disagree, or when a pathwise loss meets a non-reparameterisable latent.

    Example:
      >>> def target(x):
      ...     with numpyro.plate("particles", 4):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
      >>> def proposal(x):
      ...     with numpyro.plate("particles", 4):
      ...         numpyro.sample("z", dist.Normal(x / 2, 1.0))
      >>> program = propose(target, proposal, loss_fn=coix.loss.elbo_loss)
      >>> key = jax.random.key(0)
      >>> _, trace, metrics = coix.traced_evaluate(program, seed=key)(1.0)
      >>> metrics["log_weight"].shape, metrics["loss"].shape  # a weight per particle
      ((4,), ())

    References:
      Stites et al. (2021), https://arxiv.org/abs/2103.00668.
    """
    evaluate.check_callable("propose", p=p, q=q)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"propose: loss_fn must be callable, got {loss_fn!r}.")

    def proposed(*args, **kwargs):
        p_args, q_args = (args, args) if chain else _keys.split_program_args(args)
        q_eval = evaluate.evaluate(q, where="propose")(*q_args, **kwargs)
        q_trace = q_eval.trace
        if chain:
            p_args = q_eval.out if isinstance(q_eval.out, tuple) else (q_eval.out,)
        latents = {
            (name, generation): site.value
            for name, generation, site in q_trace.generations()
            if not site.observed
        }
        auxiliary_latents = {
            (name, site.depth): (name, generation)
            for name, generation, site in q_trace.generations()
            if not site.observed
        }
        p_eval = evaluate.evaluate(
            p, latents, where="propose", auxiliary_latents=auxiliary_latents
        )(*p_args, **kwargs)
        if p_eval.metrics is not None:
            raise ValueError(
                "propose: the target is a weighted program (the output of a "
                "combinator); pass the unweighted target program instead."
            )
        p_trace = p_eval.trace
        _check_unmatched_latents(
            q_trace, set(p_eval.substituted.values()), p_eval.trace
        )
        _check_event_dims(p_eval, q_trace)

        layout = weights.layout_of(q_trace, p_trace, where="propose")
        if q_eval.metrics is not None:
            incoming = weights.reduce_to_layout(
                q_eval.metrics.log_weight, layout, where="propose"
            )
            q_loss = q_eval.metrics.loss
            extras = q_eval.metrics.extras
        else:
            incoming = weights.trace_log_prob(
                [s for _, _, s in q_trace.generations() if s.observed], layout
            )
            q_loss, extras = jnp.zeros(()), {}
        p_named = [
            (name, site)
            for name, g, site in p_trace.generations()
            if site.observed or (name, g) in p_eval.substituted
        ]
        q_named = [(name, site) for name, _, site in q_trace.generations()]
        checked.check_sites("propose", "target", p_named)
        checked.check_sites("propose", "proposal", q_named)
        incremental = weights.trace_log_prob(
            [s for _, s in p_named], layout
        ) - weights.trace_log_prob([s for _, s in q_named], layout)
        log_weight = incoming + incremental
        checked.check_log_weight("propose", log_weight)

        if detach:
            # Re-evaluate the target on values without gradient: the loss and
            # the returned program (trace and outputs) see detached latents;
            # the log weight above keeps its gradient.
            own = {
                (name, g): jax.lax.stop_gradient(site.value)
                for name, g, site in p_trace.generations()
                if not site.observed
            }
            p_eval = evaluate.evaluate(p, own, where="propose")(*p_args, **kwargs)
            p_trace = p_eval.trace

        loss = q_loss
        if loss_fn is not None:
            value = loss_fn(q_trace, p_trace, incoming, incremental)
            if jnp.ndim(value) != 0:
                raise ValueError(
                    f"propose: loss_fn={getattr(loss_fn, '__name__', repr(loss_fn))} "
                    f"returned shape {jnp.shape(value)}; a loss must be a scalar "
                    f"(call it with aggregate=True, the default, or sum it)."
                )
            loss = loss + value
            checked.check_loss(
                "propose", getattr(loss_fn, "__name__", repr(loss_fn)), loss
            )

        marginal = p_trace.marginal()
        metrics = evaluate.metrics_from_log_weight(
            log_weight,
            loss=loss,
            log_density=evaluate.mean_log_density(
                [marginal[n] for n in marginal], layout
            ),
            extras=extras,
            resampled=q_eval.metrics.resampled if q_eval.metrics is not None else False,
        )
        return evaluate.empirical(p_eval.out, marginal, metrics)(*args, **kwargs)

    return proposed
