"""Coix-format traces (dicts of site dicts) read as typed traces.

Coix's losses take traces as ``{name: {"value", "log_prob", "is_observed"?,
"suffix"?}}``, where an older value of ``z`` is named ``z_PREV_`` (one
suffix per program after it) and site log densities are aligned on their
*leading* dimensions (the leftmost is the particle axis). This module turns
such a pair into :class:`~combinators.core.trace.Trace` objects the losses
read, so Coix's calls give Coix's numbers:

* a name with ``k`` suffixes becomes generation ``k`` (and depth ``k``) of
  its bare name; a ``"suffix"`` flag (a site Coix renamed back) gives depth
  1; in the target, suffixed sites are the reverse kernel's (auxiliary);
* log densities are padded on the right to one rank, so dimensions align
  from the left as in Coix, and every dimension of size above one becomes a
  plate named after its position and size. The weights' layout then keeps
  the leading dimensions that all sites share, as Coix's losses do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from combinators.core.trace import Plate, Site, Trace

__all__ = ["SUFFIX", "from_coix", "is_coix_trace", "split_suffix"]

#: The suffix Coix appends to the name of an older value.
SUFFIX = "_PREV_"


def is_coix_trace(trace: Any) -> bool:
    """Whether ``trace`` is a Coix-format trace (a dict of site dicts)."""
    return (
        isinstance(trace, Mapping)
        and not isinstance(trace, Trace)
        and all(isinstance(site, Mapping) for site in trace.values())
    )


def split_suffix(name: str) -> tuple[str, int]:
    """The bare name and the number of ``_PREV_`` suffixes it carried."""
    count = 0
    while name.endswith(SUFFIX):
        name, count = name[: -len(SUFFIX)], count + 1
    return name, count


def _site(where: str, name: str, site: Mapping) -> tuple[Any, Any]:
    if "log_prob" not in site:
        raise ValueError(
            f"{where}: Coix-format site {name!r} has no 'log_prob' entry "
            f"(keys {sorted(site)}); each site needs its log density."
        )
    return site.get("value"), jnp.asarray(site["log_prob"])


def from_coix(q_trace: Any, p_trace: Any, where: str = "loss") -> tuple[Trace, Trace]:
    """Typed traces for a Coix-format ``(q_trace, p_trace)`` pair.

    Traces that are already :class:`~combinators.core.trace.Trace` objects
    pass through unchanged.

    Raises:
      TypeError: if a trace is neither a ``Trace`` nor a dict of site dicts
        (says how to build one).
    """
    for role, trace in (("q_trace", q_trace), ("p_trace", p_trace)):
        if not isinstance(trace, Trace) and not is_coix_trace(trace):
            raise TypeError(
                f"{where}: {role} must be a Trace (from traced_evaluate) or a "
                f"Coix-format dict {{name: {{'value', 'log_prob', "
                f"'is_observed'?}}}}; got {type(trace).__name__}."
            )
    coix = [t for t in (q_trace, p_trace) if not isinstance(t, Trace)]
    if not coix:
        return q_trace, p_trace
    rank = max(
        (jnp.ndim(_site(where, n, s)[1]) for t in coix for n, s in t.items()),
        default=0,
    )

    def convert(trace: Any, target: bool) -> Trace:
        if isinstance(trace, Trace):
            return trace
        generations: dict[str, dict[int, Site]] = {}
        for name, raw in trace.items():
            bare, count = split_suffix(name)
            value, log_prob = _site(where, name, raw)
            log_prob = jnp.reshape(
                log_prob, log_prob.shape + (1,) * (rank - log_prob.ndim)
            )
            plates = tuple(
                Plate(f"coix@{axis}:{size}", size, axis - rank)
                for axis, size in enumerate(log_prob.shape)
                if size > 1
            )
            depth = count if count else int(bool(raw.get("suffix", False)))
            generations.setdefault(bare, {})[count] = Site(
                value,
                log_prob,
                observed="is_observed" in raw,
                plates=plates,
                auxiliary=target and count > 0,
                depth=depth,
            )
        return Trace(
            {
                name: tuple(by_count[c] for c in sorted(by_count))
                for name, by_count in generations.items()
            }
        )

    return convert(q_trace, False), convert(p_trace, True)
