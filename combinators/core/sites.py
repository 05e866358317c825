"""Sites from numpyro sample messages, checked as they are recorded.

:func:`site_from_message` turns a sample message into a
:class:`~combinators.core.trace.Site` and refuses what would otherwise give a
silent wrong number: observed data that are not arrays, hold NaN or inf, or
lie outside the distribution's support (checked on concrete data; traced
data are checked in checked mode), a log density whose shape is not the
batch shape the plates and distribution imply (numpyro broadcasts an ``(N,
1)`` observation in an ``N``-plate to ``(N, N)``), and an integer proposal
draw scored by a continuous target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from combinators.core import checked, messages
from combinators.core.trace import Plate, Site
from combinators.core.transforms import base_distribution

__all__ = ["site_from_message"]


def _frames_text(msg) -> str:
    frames = sorted(msg["cond_indep_stack"], key=lambda f: f.dim)
    if not frames:
        return "no plates"
    return ", ".join(f"{f.name!r} (size {f.size}, dim {f.dim})" for f in frames)


def _check_observation(where: str, msg) -> None:
    """Observed data: an array of finite values inside the support."""
    name, fn, value = msg["name"], msg["fn"], msg["value"]
    if isinstance(value, (str, bytes)) or not (
        isinstance(value, (jax.Array, np.ndarray, np.generic, int, float, bool))
    ):
        raise TypeError(
            f"{where}: observed site {name!r}: the observation must be an array "
            f"or a number, got {type(value).__name__}; pass jnp.asarray(...)."
        )
    if msg.get("mask") is not None:
        return  # masked-out entries may hold anything (e.g. NaN for missing)
    if isinstance(value, jax.core.Tracer):
        checked.check_observation(where, name, fn, value)
        return
    data = np.asarray(value)
    if data.dtype.kind in "fc" and not np.all(np.isfinite(data)):
        bad = int(np.sum(~np.isfinite(data)))
        raise ValueError(
            f"{where}: observed site {name!r} has {bad} NaN or infinite value(s) "
            f"among its {data.size} data (shape {data.shape}); clean the data "
            f"or mask those entries (numpyro.handlers.mask)."
        )
    support = base_distribution(fn).support
    try:
        # Concrete data: evaluate now, also while tracing under jit.
        with jax.ensure_compile_time_eval():
            inside = np.asarray(support(value))
    except NotImplementedError:  # a dependent support (e.g. Delta)
        return
    if not np.all(inside):
        bad = int(np.sum(~inside))
        example = data.reshape(-1)[0] if data.size == 1 else data[~inside.astype(bool)]
        example = np.asarray(example).reshape(-1)[:3].tolist()
        raise ValueError(
            f"{where}: observed site {name!r}: {bad} value(s) lie outside the "
            f"support of {type(base_distribution(fn)).__name__} ({support}), "
            f"e.g. {example}; the log density there is meaningless."
        )


def _check_batch_shape(where: str, msg, log_prob, substituted: bool) -> None:
    """The log density has exactly the batch shape the plates imply."""
    fn = msg["fn"]
    expected = tuple(msg["kwargs"].get("sample_shape", ())) + tuple(fn.batch_shape)
    shape = tuple(jnp.shape(log_prob))
    if shape == expected:
        return
    if substituted and _undeclared_broadcast(msg, shape, expected):
        return
    kind = "observation" if msg.get("is_observed", False) else "value"
    raise ValueError(
        f"{where}: site {msg['name']!r}: the {kind} of shape "
        f"{tuple(jnp.shape(msg['value']))} gives a log density of shape {shape}, "
        f"but its plates ({_frames_text(msg)}) and distribution imply batch "
        f"shape {expected} (event shape {tuple(fn.event_shape)}); numpyro "
        f"broadcast the value. Give the value the shape batch + event, or "
        f"declare its extra dims with a plate or .to_event()."
    )


def _undeclared_broadcast(msg, shape: tuple, expected: tuple) -> bool:
    """Whether a substituted value only adds undeclared batch dims.

    A proposal's value may carry batch dims the target's distribution does
    not have: leading ones (a target written without a particle plate) or,
    as in Coix's examples, a size-1 dim that no plate of the site claims (a
    batch of data sets written without a plate). The weights' layout then
    keeps such a dim as independent columns if every site shares it, and
    sums it otherwise. A dim that one of the site's plates claims must not
    broadcast.
    """
    if len(shape) < len(expected):
        return False
    claimed = {frame.dim for frame in msg.get("cond_indep_stack", ())}
    offset = len(shape) - len(expected)
    for axis, size in enumerate(expected):
        dim = axis - len(expected)
        if shape[offset + axis] != size and (size != 1 or dim in claimed):
            return False
    return True


def _check_dtype(where: str, msg) -> None:
    """An integer draw scored by a continuous distribution is an error."""
    value, fn = msg["value"], msg["fn"]
    if jnp.issubdtype(jnp.result_type(value), jnp.integer) and not getattr(
        base_distribution(fn).support, "is_discrete", False
    ):
        raise ValueError(
            f"{where}: site {msg['name']!r}: the proposal's value is "
            f"integer-valued ({jnp.result_type(value)}) but the target scores it "
            f"with the continuous {type(base_distribution(fn)).__name__}; the "
            f"density of a discrete draw under a continuous target is not a "
            f"valid importance weight. Propose from a continuous relaxation "
            f"(combinators.relaxed) or score the site with a discrete "
            f"distribution."
        )


def site_from_message(msg, where: str) -> Site:
    """The checked :class:`~.trace.Site` of a fresh (not replayed) sample message."""
    fn = msg["fn"]
    value = msg["value"]
    observed = bool(msg.get("is_observed", False))
    substituted = messages.is_substituted(msg)
    if observed:
        _check_observation(where, msg)
    if substituted:
        _check_dtype(where, msg)
    log_prob = fn.log_prob(value)
    _check_batch_shape(where, msg, log_prob, substituted)
    mask = msg.get("mask")
    if mask is not None:
        log_prob = jnp.where(mask, log_prob, 0.0)
    scale = msg.get("scale")
    if scale is not None:
        log_prob = scale * log_prob
    event_dim = fn.event_dim
    value_batch = jnp.shape(value)[: max(jnp.ndim(value) - event_dim, 0)]
    log_prob = jnp.broadcast_to(
        log_prob, jnp.broadcast_shapes(jnp.shape(log_prob), value_batch)
    )
    base = base_distribution(fn)
    plates = tuple(
        Plate(f.name, int(f.size), int(f.dim))
        for f in sorted(msg["cond_indep_stack"], key=lambda f: f.dim)
    )
    return Site(
        value=value,
        log_prob=log_prob,
        observed=bool(msg.get("is_observed", False)),
        event_dim=int(event_dim),
        plates=plates,
        auxiliary=messages.is_auxiliary(msg),
        reparameterized=bool(fn.has_rsample) or isinstance(base, dist.Unit),
        deterministic=isinstance(base, dist.Delta),
    )
