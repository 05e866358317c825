"""Site roles and weight helpers shared by every loss: one home.

Which sites play which role is read from the traces' fields (generations,
depths, the auxiliary flag), never from names:

* *target sites*: the newest, non-auxiliary sites of ``p_trace``;
* *proposal sites*: when some kernel re-sampled a site of the proposal, for
  each target name found in ``q_trace`` its oldest generation there, if an
  earlier program of the composition drew it (its depth is positive): the
  initial proposal's draw, or the previous target's site, observed ones
  included. Empty when no kernel re-sampled any site (then every ``q`` site
  is a forward site); this matches Coix;
* *forward sites*: every other site of ``q_trace``; in particular a site
  that the last kernel draws for the first time, next to a site it
  re-samples, is a forward site;
* *reverse sites*: the auxiliary sites of ``p_trace`` (``extend``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp

from combinators import weights
from combinators.core.coix_traces import from_coix
from combinators.core.trace import Site, Trace

__all__ = [
    "accepts_coix_traces",
    "finish",
    "gradient_only",
    "is_pathwise",
    "normalized_weights",
    "pathwise",
    "proposal_log_prob",
    "require_reparameterized",
    "role_log_probs",
    "single_step_target_log_prob",
    "site_roles",
    "sum_log_probs",
    "traces",
    "uniform_weights",
]


def accepts_coix_traces(fn: Callable) -> Callable:
    """Lets a loss take Coix-format dict traces and Coix-shaped weights.

    Dict traces are converted (:func:`traces`); Coix's log weights have only
    the leading (particle) dims, so they get trailing size-1 dims up to the
    layout's rank, which is how this library's weights are shaped.
    """

    @functools.wraps(fn)
    def loss(
        q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
    ):
        if isinstance(q_trace, Trace) and isinstance(p_trace, Trace):
            return fn(
                q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate
            )
        q_trace, p_trace = traces(q_trace, p_trace, fn.__name__)
        rank = weights.layout_of(q_trace, p_trace, where=fn.__name__).ndim

        def pad(w):
            w = jnp.asarray(w)
            if 0 < w.ndim < rank:
                w = jnp.reshape(w, w.shape + (1,) * (rank - w.ndim))
            return w

        return fn(
            q_trace,
            p_trace,
            pad(incoming_log_weight),
            pad(incremental_log_weight),
            aggregate,
        )

    return loss


def traces(q_trace, p_trace, where: str = "loss") -> tuple[Trace, Trace]:
    """The pair as typed traces: Coix-format dicts are converted.

    See :mod:`combinators.core.coix_traces` for how Coix's names and
    left-aligned log densities are read.
    """
    return from_coix(q_trace, p_trace, where)


def normalized_weights(log_weight):
    """Self-normalised weights along the particle axis, without gradient."""
    log_weight = jnp.asarray(log_weight)
    if log_weight.ndim == 0:
        return jnp.ones(())
    return jax.lax.stop_gradient(weights.normalize(log_weight))


def uniform_weights(log_weight):
    """Equal weights ``1 / N`` in the shape of ``log_weight``."""
    log_weight = jnp.asarray(log_weight)
    if log_weight.ndim == 0:
        return jnp.ones(())
    return jnp.full(log_weight.shape, 1.0 / log_weight.shape[0])


def finish(terms, aggregate: bool):
    """The loss (sum of the terms) or, with ``aggregate=False``, the terms."""
    return jnp.sum(terms) if aggregate else terms


def gradient_only(x):
    """``x - stop_gradient(x)``: zero in value, the gradient of ``x``."""
    return x - jax.lax.stop_gradient(x)


def sum_log_probs(sites: Iterable[Site], layout: weights.Layout):
    """Sum of the sites' log densities in the layout's shape."""
    return weights.trace_log_prob(list(sites), layout)


def site_roles(q_trace: Trace, p_trace: Trace) -> tuple[set, list[str]]:
    """Keys ``(name, generation)`` of proposal sites, and target site names.

    See the module docstring for the definitions.
    """
    targets = [
        name
        for name, history in p_trace.histories().items()
        if not history[0].auxiliary
    ]
    if not any(len(history) > 1 for history in q_trace.histories().values()):
        return set(), targets
    proposal = set()
    for name in targets:
        if name not in q_trace:
            continue
        history = q_trace.history(name)
        if history[-1].depth > 0:
            proposal.add((name, len(history) - 1))
    return proposal, targets


def role_log_probs(q_trace: Trace, p_trace: Trace):
    """Layout, and log densities of the proposal, forward and target sites."""
    q_trace, p_trace = traces(q_trace, p_trace)
    layout = weights.layout_of(q_trace, p_trace)
    proposal, targets = site_roles(q_trace, p_trace)
    q_sites = list(q_trace.generations())
    proposal_lp = sum_log_probs(
        (s for n, g, s in q_sites if (n, g) in proposal), layout
    )
    forward_lp = sum_log_probs(
        (s for n, g, s in q_sites if (n, g) not in proposal), layout
    )
    target_lp = sum_log_probs((p_trace[n] for n in targets), layout)
    return layout, proposal_lp, forward_lp, target_lp


def proposal_log_prob(q_trace: Trace, p_trace: Trace):
    """Layout, and ``log q`` of every latent draw of the proposal per particle."""
    q_trace, p_trace = traces(q_trace, p_trace)
    layout = weights.layout_of(q_trace, p_trace)
    latents = [s for _, _, s in q_trace.generations() if not s.observed]
    return layout, weights.trace_log_prob(latents, layout)


def single_step_target_log_prob(where: str, q_trace: Trace, p_trace: Trace):
    """``log p`` of the sites ``propose`` scored: observed or given by ``q``.

    Raises for programs with kernels or auxiliary sites, which single-step
    estimators do not cover.
    """
    q_trace, p_trace = traces(q_trace, p_trace, where)
    for name, history in p_trace.histories().items():
        if len(history) > 1 or history[0].auxiliary:
            raise ValueError(
                f"{where}: the target has auxiliary (reverse-kernel) site {name!r}; "
                f"this estimator covers a single propose(p, q) without kernels."
            )
    for name, history in q_trace.histories().items():
        if len(history) > 1:
            raise ValueError(
                f"{where}: the proposal re-samples site {name!r} with a kernel; "
                f"this estimator covers a single propose(p, q) without kernels."
            )
    layout = weights.layout_of(q_trace, p_trace)
    proposed = {name for name, site in q_trace.items() if not site.observed}
    scored = [s for name, s in p_trace.items() if s.observed or name in proposed]
    return weights.trace_log_prob(scored, layout)


def require_reparameterized(where: str, q_trace) -> None:
    """Raises if a latent site of the proposal has no pathwise gradient.

    Called inside every pathwise loss, so the check follows the loss through
    ``functools.partial``, lambdas and other wrappers.
    """
    if not isinstance(q_trace, Trace):
        return
    for name, _, site in q_trace.generations():
        if not site.observed and not site.reparameterized:
            raise ValueError(
                f"propose: loss_fn={where} differentiates through the samples "
                f"(a pathwise gradient), but the proposal's latent site {name!r} "
                f"is not reparameterisable (e.g. discrete); its gradient would be "
                f"silently biased. Use a score-function loss such as rws_loss, or "
                f"a reparameterisable relaxation of {name!r}."
            )


def is_pathwise(loss_fn: Callable) -> bool:
    """Whether a loss differentiates through the samples.

    Reads the mark :func:`pathwise` sets, looking through
    ``functools.partial`` and ``functools.wraps`` wrappers; a lambda hides
    it, so callers that must know (``amortized.make_program``) take an
    explicit flag as well.
    """
    seen = set()
    fn: Callable | None = loss_fn
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if getattr(fn, "pathwise", False):
            return True
        if isinstance(fn, functools.partial):
            fn = fn.func
        else:
            fn = getattr(fn, "__wrapped__", None)
    return False


class _PathwiseLoss(Protocol):
    # A loss function object carrying the mark that is_pathwise reads.
    pathwise: bool

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def pathwise(fn: Callable) -> Callable:
    """Marks a loss as pathwise: it checks the proposal's sites when called."""

    @functools.wraps(fn)
    def loss(
        q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
    ):
        require_reparameterized(loss.__name__, q_trace)
        return fn(
            q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate
        )

    marked = cast(_PathwiseLoss, loss)
    marked.pathwise = True
    return marked
