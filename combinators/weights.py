"""Importance weights as pure array maths: particle layout, log Z, ESS.

The particle axis is declared with ``numpyro.plate``. The *layout* of a set
of traces is the list of plate frames found in them, indexed by their
(negative) batch dimension, from the outermost plate to dimension -1. Log
weights are arrays with that layout: axis 0 is the particle axis (the
outermost plate), further axes are other plates (e.g. a data batch), and a
dimension that no plate claims has size 1. Each site's log density is summed
over every dimension that is not one of its own plates in the layout, so
undeclared batch or event dimensions never become particles.

The particle plate is declared by position and, optionally, by name: the
leftmost plate dimension indexes particles (Coix's convention), and a plate
named :data:`PARTICLE_PLATE` (``"particles"``) must be that leftmost plate.
The layout is checked, never guessed: a plate name found at two dimensions
or with two sizes, or a ``"particles"`` plate with another plate to its
left, raises a ``ValueError`` naming the sites and both layouts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

__all__ = [
    "PARTICLE_PLATE",
    "UNDECLARED_BATCH",
    "Layout",
    "UndeclaredBatch",
    "column_effective_sample_size",
    "effective_sample_size",
    "layout_of",
    "log_normalizer",
    "mean_effective_sample_size",
    "normalize",
    "reduce_to_layout",
    "site_log_weight",
    "trace_log_prob",
    "undeclared_batch",
]


#: The name that declares a plate as the particle plate, which must be the
#: leftmost plate of the layout.
PARTICLE_PLATE = "particles"

#: Name prefix of the frames that stand for undeclared batch dimensions.
UNDECLARED_BATCH = "batch@dim"


class Layout(NamedTuple):
    """Plates that index log weights, outermost (the particle plate) first.

    Attributes:
      frames: one entry per batch dimension from the outermost plate's
        dimension to -1; ``None`` where no plate claims the dimension (or two
        different plates share it, so neither can index particles).
    """

    frames: tuple[Any, ...]

    @property
    def ndim(self) -> int:
        """Number of batch dims the layout spans."""
        return len(self.frames)

    @property
    def shape(self) -> tuple[int, ...]:
        """The log weights' shape (plate sizes, 1 where no plate)."""
        return tuple(1 if f is None else f.size for f in self.frames)

    @property
    def particle_plate(self) -> Any:
        """The outermost plate, whose dimension is the particle axis."""
        return self.frames[0] if self.frames else None

    def frame_at(self, dim: int) -> Any:
        """The layout's plate at (negative) batch dimension ``dim``."""
        index = self.ndim + dim
        return self.frames[index] if 0 <= index < self.ndim else None


def layout_of(*traces: Any, where: str = "layout") -> Layout:
    """The layout spanned by the plates of all sites in ``traces``.

    The outermost plate indexes particles. An inner plate (e.g. a data
    batch) becomes a further axis of the log weights -- independent
    importance-sampling problems, one per column -- only if every site's log
    density spans it; otherwise a site outside it (a latent or observation
    shared by its entries) couples the columns and the plate is summed.

    Args:
      *traces: traces (mappings with ``generations()``) or iterables of sites.
      where: the combinator named in errors.

    Returns:
      The :class:`Layout`.

    Raises:
      ValueError: if a plate name appears at two dimensions or with two
        sizes, or a plate named ``"particles"`` is not the leftmost plate.
    """
    by_dim: dict[int, Any] = {}
    by_name: dict[str, tuple[Any, str]] = {}
    all_sites: list = []
    for trace in traces:
        if hasattr(trace, "generations"):
            named = [(name, s) for name, _, s in trace.generations()]
        else:
            named = [(f"#{i}", s) for i, s in enumerate(trace)]
        for site_name, site in named:
            all_sites.append(site)
            for frame in site.plates:
                _check_plate(where, frame, site_name, by_name)
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
    declared = by_name.get(PARTICLE_PLATE)
    if declared is not None and declared[0].dim != lowest:
        frame, site_name = declared
        other = by_dim.get(lowest)
        other_text = f"plate {other.name!r} " if other is not None else "a plate "
        raise ValueError(
            f"{where}: the particle plate {PARTICLE_PLATE!r} (size {frame.size}) "
            f"is at dim {frame.dim} (site {site_name!r}), but {other_text}is at "
            f"dim {lowest}, to its left; the particle axis is the leftmost "
            f"plate dim. Open the particle plate outermost with dim={lowest} "
            f"(and inner plates at dims to its right). Layout: "
            f"{_describe_frames(by_dim)}."
        )
    for dim in range(lowest + 1, 0):
        frame = by_dim.get(dim)
        if frame is not None and not all(
            _spans(site, dim, frame.size) for site in all_sites
        ):
            # A site outside this inner plate (e.g. a latent shared by all
            # data points) couples its columns: they are not independent
            # importance-sampling problems, so the plate is summed, not kept.
            by_dim[dim] = None
    frames = [by_dim.get(d) for d in range(lowest, 0)]
    for index, dim in enumerate(range(lowest + 1, 0), start=1):
        if frames[index] is not None:
            continue
        size = _shared_size(all_sites, dim)
        if size is None:
            break
        # No plate claims this dim, but every site's log density has the
        # same size there: an undeclared batch of independent problems
        # (Coix's convention, e.g. a batch of data sets written without a
        # plate). It indexes weight columns like an inner plate would.
        frames[index] = undeclared_batch(dim, size)
    return Layout(tuple(frames))


class UndeclaredBatch(NamedTuple):
    """A layout frame for a batch dimension that no plate declares.

    It has a plate frame's fields, so the layout reads it like a plate.
    """

    name: str
    size: int
    dim: int


def undeclared_batch(dim: int, size: int) -> UndeclaredBatch:
    """The frame standing for an undeclared batch dimension of the layout."""
    return UndeclaredBatch(f"{UNDECLARED_BATCH}{dim}", size, dim)


def _shared_size(sites: list, dim: int) -> int | None:
    """The size (> 1) every site's log density has at ``dim``, if one."""
    sizes = set()
    for site in sites:
        shape = jnp.shape(site.log_prob)
        if len(shape) < -dim:
            return None
        sizes.add(shape[dim])
    if len(sizes) != 1:
        return None
    (size,) = sizes
    return size if size > 1 else None


def _check_plate(where: str, frame: Any, site_name: str, by_name: dict) -> None:
    """Raises if ``frame``'s name was seen at another dim or with another size."""
    seen = by_name.setdefault(frame.name, (frame, site_name))
    first, first_site = seen
    if first.dim == frame.dim and first.size == frame.size:
        return
    raise ValueError(
        f"{where}: plate {frame.name!r} has size {first.size} at dim {first.dim} "
        f"(site {first_site!r}) but size {frame.size} at dim {frame.dim} (site "
        f"{site_name!r}); target, proposal and composed programs must declare "
        f"each plate, the particle plate above all, with one size and one dim."
    )


def _describe_frames(by_dim: dict) -> str:
    return ", ".join(
        f"dim {d}: " + ("-" if f is None else f"{f.name!r} (size {f.size})")
        for d, f in sorted(by_dim.items())
    )


def _spans(site: Any, dim: int, size: int) -> bool:
    """Whether the site's log density has ``size`` entries at batch ``dim``."""
    shape = jnp.shape(site.log_prob)
    return len(shape) >= -dim and shape[dim] == size


def reduce_to_layout(
    x, layout: Layout, plates: Iterable[Any] | None = None, where: str = "layout"
):
    """Sums the dimensions of ``x`` that are not plates of the layout.

    ``x`` is right-aligned with the batch dimensions (numpyro's convention).
    A dimension is kept only if the layout has a plate there and (when
    ``plates`` is given) that plate is among ``plates``.

    Args:
      x: an array of log densities (batch shape).
      layout: the target layout.
      plates: the plates ``x`` lives in; ``None`` trusts the layout.
      where: the combinator named in errors.

    Returns:
      An array of shape ``layout.shape``.

    Raises:
      ValueError: if ``x`` has a size other than 1 or the plate's size at a
        plate of the layout (e.g. weights of 8 and 4 particles combined).
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
            raise ValueError(
                f"{where}: log weights or densities of shape {x.shape} have "
                f"size {x.shape[axis]} at dim {dim}, where the layout has plate "
                f"{frame.name!r} of size {frame.size} (layout shape "
                f"{layout.shape}); the composed programs disagree on their "
                f"number of particles."
            )
        kept.add(axis)
    summed = tuple(a for a in range(x.ndim) if a not in kept)
    if summed:
        x = jnp.sum(x, axis=summed, keepdims=True)
    return jnp.broadcast_to(x, jnp.broadcast_shapes(x.shape, layout.shape))


def site_log_weight(site: Any, layout: Layout):
    """The site's log density summed down to the layout's shape.

    Dimensions are matched by position (numpyro's right-aligned batch
    convention), so a target written without plates that scores vectorised
    particle values keeps one log density per particle.
    """
    return reduce_to_layout(site.log_prob, layout)


def trace_log_prob(sites: Iterable[Any], layout: Layout):
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


def normalize(log_weight):
    """Self-normalised weights: softmax along axis 0, the particle axis.

    Use this rather than ``jax.nn.softmax(log_weight)``: log weights keep a
    size-1 axis for every plate dim right of the particle plate (shape
    ``(K, 1)`` for a particle plate at ``dim=-2``), and softmax's default
    last axis would then normalise each particle on its own.
    """
    return jax.nn.softmax(jnp.asarray(log_weight), axis=0)


def mean_effective_sample_size(log_weight):
    """Kish's effective sample size ``1 / sum_i wbar_i^2``, mean over columns.

    Non-finite log weights (NaN, +inf, or all -inf) give NaN, never N.
    """
    log_weight = jnp.asarray(log_weight)
    if log_weight.ndim == 0:
        return jnp.where(jnp.isfinite(log_weight), 1.0, jnp.nan)
    return jnp.mean(column_effective_sample_size(log_weight))


#: The historical name of :func:`mean_effective_sample_size` (kept for
#: compatibility; ``diagnostics.effective_sample_size`` returns one ESS per
#: column, as does :func:`column_effective_sample_size`).
effective_sample_size = mean_effective_sample_size


def column_effective_sample_size(log_weight):
    """Kish's effective sample size of each column (axis 0 indexes particles)."""
    normalized = jax.nn.softmax(jnp.asarray(log_weight), axis=0)
    return 1.0 / jnp.sum(normalized**2, axis=0)
