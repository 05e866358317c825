"""Importance weights as pure array maths: particle layout, log Z, ESS.

The particle axis is declared with ``numpyro.plate``. The *layout* of a set
of traces is the list of plate frames found in them, indexed by their
(negative) batch dimension, from the outermost plate to dimension -1. Log
weights are arrays with that layout: axis 0 is the particle axis (the
outermost plate), further axes are other plates (e.g. a data batch), and a
dimension that no plate claims has size 1. Each site's log density is summed
over every dimension that is not one of its own plates in the layout, so
undeclared batch or event dimensions never become particles.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from combinators.trace import Plate, Site, Trace

__all__ = [
    "Layout",
    "column_effective_sample_size",
    "effective_sample_size",
    "layout_of",
    "log_normalizer",
    "reduce_to_layout",
    "site_log_weight",
    "trace_log_prob",
]


class Layout(NamedTuple):
    """Plates that index log weights, outermost (the particle plate) first.

    Attributes:
      frames: one entry per batch dimension from the outermost plate's
        dimension to -1; ``None`` where no plate claims the dimension (or two
        different plates share it, so neither can index particles).
    """

    frames: tuple[Plate | None, ...]

    @property
    def ndim(self) -> int:
        return len(self.frames)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(1 if f is None else f.size for f in self.frames)

    @property
    def particle_plate(self) -> Plate | None:
        """The outermost plate: its dimension is the particle axis."""
        return self.frames[0] if self.frames else None

    def frame_at(self, dim: int) -> Plate | None:
        """The layout's plate at (negative) batch dimension ``dim``."""
        index = self.ndim + dim
        return self.frames[index] if 0 <= index < self.ndim else None


def layout_of(*traces: Trace | Iterable[Site]) -> Layout:
    """The layout spanned by the plates of all sites in ``traces``.

    The outermost plate indexes particles. An inner plate (e.g. a data
    batch) becomes a further axis of the log weights -- independent
    importance-sampling problems, one per column -- only if every site's log
    density spans it; otherwise a site outside it (a latent or observation
    shared by its entries) couples the columns and the plate is summed.
    """
    by_dim: dict[int, Plate | None] = {}
    all_sites: list[Site] = []
    for trace in traces:
        sites = (
            [s for _, _, s in trace.generations()]
            if isinstance(trace, Trace)
            else list(trace)
        )
        all_sites.extend(sites)
        for site in sites:
            for frame in site.plates:
                seen = by_dim.get(frame.dim, frame)
                if seen is None or seen.size != frame.size:
                    # Plates of different sizes share a dimension: they are
                    # local (e.g. two data plates), not a particle axis.
                    by_dim[frame.dim] = None
                else:
                    # Same dim and size: one axis, whatever each program
                    # calls it; the first trace's name is kept.
                    by_dim[frame.dim] = seen
    if not by_dim:
        return Layout(())
    lowest = min(by_dim)
    for dim in range(lowest + 1, 0):
        frame = by_dim.get(dim)
        if frame is not None and not all(
            _spans(site, dim, frame.size) for site in all_sites
        ):
            # A site outside this inner plate (e.g. a latent shared by all
            # data points) couples its columns: they are not independent
            # importance-sampling problems, so the plate is summed, not kept.
            by_dim[dim] = None
    return Layout(tuple(by_dim.get(d) for d in range(lowest, 0)))


def _spans(site: Site, dim: int, size: int) -> bool:
    """Whether the site's log density has ``size`` entries at batch ``dim``."""
    shape = jnp.shape(site.log_prob)
    return len(shape) >= -dim and shape[dim] == size


def reduce_to_layout(x, layout: Layout, plates: Iterable[Plate] | None = None):
    """Sums the dimensions of ``x`` that are not plates of the layout.

    ``x`` is right-aligned with the batch dimensions (numpyro's convention).
    A dimension is kept only if the layout has a plate there and (when
    ``plates`` is given) that plate is among ``plates``.

    Args:
      x: an array of log densities (batch shape).
      layout: the target layout.
      plates: the plates ``x`` lives in; ``None`` trusts the layout.

    Returns:
      An array of shape ``layout.shape``.
    """
    x = jnp.asarray(x)
    if x.ndim > layout.ndim:
        x = jnp.sum(x, axis=tuple(range(x.ndim - layout.ndim)))
    kept = set()
    for axis in range(x.ndim):
        dim = axis - x.ndim
        frame = layout.frame_at(dim)
        if frame is None:
            continue
        if plates is not None and frame not in plates:
            continue
        if x.shape[axis] not in (1, frame.size):
            continue
        kept.add(axis)
    summed = tuple(a for a in range(x.ndim) if a not in kept)
    if summed:
        x = jnp.sum(x, axis=summed, keepdims=True)
    return jnp.broadcast_to(x, jnp.broadcast_shapes(x.shape, layout.shape))


def site_log_weight(site: Site, layout: Layout):
    """The site's log density summed down to the layout's shape.

    Dimensions are matched by position (numpyro's right-aligned batch
    convention), so a target written without plates that scores vectorised
    particle values keeps one log density per particle.
    """
    return reduce_to_layout(site.log_prob, layout)


def trace_log_prob(sites: Iterable[Site], layout: Layout):
    """Sum of the log densities of ``sites`` in the layout's shape."""
    total = jnp.zeros(layout.shape)
    for site in sites:
        total = total + site_log_weight(site, layout)
    return total


def log_normalizer(log_weight):
    """Estimate of log Z from log weights whose axis 0 indexes particles.

    ``logsumexp(log_weight, 0) - log(N)``, summed over the other axes (they
    index independent problems, e.g. data points). A single unbatched weight
    is its own estimate.
    """
    log_weight = jnp.asarray(log_weight)
    if log_weight.ndim == 0:
        return log_weight
    n = log_weight.shape[0]
    return jnp.sum(logsumexp(log_weight, axis=0) - jnp.log(n))


def effective_sample_size(log_weight):
    """Kish's effective sample size ``1 / sum_i wbar_i^2``, mean over columns.

    Non-finite log weights (NaN, +inf, or all -inf) give NaN, never N.
    """
    log_weight = jnp.asarray(log_weight)
    if log_weight.ndim == 0:
        return jnp.where(jnp.isnan(log_weight), jnp.nan, 1.0)
    return jnp.mean(column_effective_sample_size(log_weight))


def column_effective_sample_size(log_weight):
    """Kish's effective sample size of each column (axis 0 indexes particles)."""
    normalized = jax.nn.softmax(jnp.asarray(log_weight), axis=0)
    return 1.0 / jnp.sum(normalized**2, axis=0)
