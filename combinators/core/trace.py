"""Typed traces: the record of one evaluation of a probabilistic program.

A :class:`Site` is one random choice: its value, its log density (event
dimensions summed, so the shape is the site's batch shape) and static
metadata that says what the choice *is* (observed or latent, drawn by an
auxiliary kernel, reparameterisable, deterministic) and which
``numpyro.plate`` frames it lives in. A :class:`Trace` maps names to sites.

Names are only names. When a later kernel re-samples a site (``compose``) the
earlier value is not renamed: it is kept as an older *generation* of the same
name. ``trace["z"]`` is the newest value, ``trace.history("z")`` lists all of
them newest first. Sites drawn by the auxiliary kernel of ``extend`` carry
``auxiliary=True``. Both are fields, so a user may call a site anything.

Both types are pytrees (array leaves, static metadata in the tree
definition), so traces pass through ``jit``, ``vmap``, ``grad`` and
``lax`` loops unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from combinators.core import pretty

__all__ = ["Plate", "Site", "Trace"]


class Plate(NamedTuple):
    """A ``numpyro.plate`` frame a site was drawn in.

    Attributes:
      name: the plate's name.
      size: the number of independent copies.
      dim: the (negative) batch dimension the plate occupies.
    """

    name: str
    size: int
    dim: int


@dataclasses.dataclass(frozen=True)
class Site:
    """One random choice of a program.

    Attributes:
      value: the sampled or observed value, shape ``batch_shape + event_shape``.
      log_prob: log density of ``value``, event dimensions summed; its shape is
        the site's batch shape.
      observed: whether the value was given as an observation.
      event_dim: number of rightmost dimensions of ``value`` that form an event.
      plates: the plate frames enclosing the site, outermost first.
      auxiliary: drawn by the auxiliary kernel of ``extend`` (not part of the
        target's marginal).
      reparameterized: the distribution supports pathwise (reparameterised)
        gradients.
      deterministic: the distribution is a point mass (e.g. a ``Delta`` flow
        step); used to decide whether a superseded value needs a reverse
        kernel.
      depth: how many programs of a composition ran after the one that drew
        the site, in the evaluation that recorded the trace (0: the last
        program; ``compose(k, q)`` gives ``q``'s sites depth 1). Losses read
        it to tell the initial proposal's draws from a kernel's new sites.
    """

    value: Any
    log_prob: Any
    observed: bool = dataclasses.field(default=False, metadata=dict(static=True))
    event_dim: int = dataclasses.field(default=0, metadata=dict(static=True))
    plates: tuple[Plate, ...] = dataclasses.field(
        default=(), metadata=dict(static=True)
    )
    auxiliary: bool = dataclasses.field(default=False, metadata=dict(static=True))
    reparameterized: bool = dataclasses.field(default=True, metadata=dict(static=True))
    deterministic: bool = dataclasses.field(default=False, metadata=dict(static=True))
    depth: int = dataclasses.field(default=0, metadata=dict(static=True))

    # Coix stores sites as dicts; reading them as such keeps old code working.
    def __getitem__(self, key: str) -> Any:
        if key in ("value", "log_prob"):
            return getattr(self, key)
        if key == "is_observed" and self.observed:
            return True
        raise KeyError(key)

    def __contains__(self, key: str) -> bool:
        return key in ("value", "log_prob") or (key == "is_observed" and self.observed)

    def replace(self, **changes: Any) -> Site:
        """Returns a copy of the site with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Shape of the log density (the value's shape without event dims)."""
        return tuple(jnp.shape(self.log_prob))

    def plate(self, name: str) -> Plate | None:
        """The frame of the plate called ``name`` around this site, if any."""
        for frame in self.plates:
            if frame.name == name:
                return frame
        return None


jax.tree_util.register_dataclass(
    Site,
    data_fields=["value", "log_prob"],
    meta_fields=[
        "observed",
        "event_dim",
        "plates",
        "auxiliary",
        "reparameterized",
        "deterministic",
        "depth",
    ],
)


class Trace(Mapping):
    """An immutable mapping from site names to their newest :class:`Site`.

    Older generations of a name (values superseded by a later kernel in
    ``compose``) are kept in order, newest first, and read with
    :meth:`history` or :meth:`generations`.

    Example:
      >>> def q():
      ...     with numpyro.plate("particles", 3):
      ...         return (numpyro.sample("z", dist.Normal(0.0, 1.0)),)
      >>> def kernel(z):  # draws z again, given the old value
      ...     with numpyro.plate("particles", 3):
      ...         return (numpyro.sample("z", dist.Normal(z, 0.1)),)
      >>> program = coix.compose(kernel, q)
      >>> _, trace, _ = coix.traced_evaluate(program, seed=jax.random.key(0))()
      >>> list(trace), trace["z"].value.shape, trace["z"].log_prob.shape
      (['z'], (3,), (3,))
      >>> len(trace.history("z"))  # the kernel's value, then the one it replaced
      2
    """

    __slots__ = ("_sites",)

    def __init__(self, sites: Mapping[str, tuple[Site, ...]] | None = None):
        checked = {}
        for name, history in (sites or {}).items():
            history = tuple(history)
            if not history:
                raise ValueError(f"Trace: site {name!r} has an empty history.")
            checked[name] = history
        self._sites = checked

    @classmethod
    def from_sites(cls, sites: Mapping[str, Site]) -> Trace:
        """A trace with one generation per name."""
        return cls({name: (site,) for name, site in sites.items()})

    def __getitem__(self, name: str) -> Site:
        return self._sites[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def __repr__(self) -> str:
        return pretty.describe(self)

    def _repr_html_(self) -> str:
        return pretty.describe_html(self)

    def history(self, name: str) -> tuple[Site, ...]:
        """All generations of ``name``, newest first."""
        return self._sites[name]

    def generations(self) -> Iterator[tuple[str, int, Site]]:
        """Yields ``(name, generation, site)``; generation 0 is the newest."""
        for name, history in self._sites.items():
            for generation, site in enumerate(history):
                yield name, generation, site

    def histories(self) -> Mapping[str, tuple[Site, ...]]:
        """The name -> generations mapping backing this trace."""
        return dict(self._sites)

    def newest(self) -> Trace:
        """The newest generation of every site (older ones marginalised out)."""
        return Trace({name: (history[0],) for name, history in self._sites.items()})

    def marginal(self) -> Trace:
        """The newest generation of every non-auxiliary site.

        This is the target's marginal in ``propose(extend(p, f), q)``: the
        auxiliary kernel ``f`` integrates to one.
        """
        return Trace(
            {
                name: (history[0],)
                for name, history in self._sites.items()
                if not history[0].auxiliary
            }
        )

    def rebased(self) -> Trace:
        """The trace with each site's depth set to its generation.

        This is how a replay of the trace (``empirical``) records it, so loop
        carries keep one structure whatever produced them.
        """
        return self.map_sites(
            lambda name, g, site: site if site.depth == g else site.replace(depth=g)
        )

    def map_sites(self, fn) -> Trace:
        """A trace with ``fn(name, generation, site)`` applied to every site."""
        return Trace(
            {
                name: tuple(fn(name, g, site) for g, site in enumerate(history))
                for name, history in self._sites.items()
            }
        )


def _flatten_trace(trace: Trace):
    names = tuple(trace._sites)
    children = tuple(trace._sites[name] for name in names)
    return children, names


def _unflatten_trace(names, children) -> Trace:
    trace = object.__new__(Trace)
    trace._sites = dict(zip(names, (tuple(c) for c in children), strict=False))
    return trace


jax.tree_util.register_pytree_node(Trace, _flatten_trace, _unflatten_trace)
