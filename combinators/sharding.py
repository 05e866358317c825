"""Sharding the particle axis (and data axes) of programs across devices.

Particles are independent until their weights are compared, so the particle
axis of a program can be split across devices: each device draws and scores
its own block of particles, and only the reductions over particles
(``logsumexp`` for log Z and the IWAE loss, the sums of the effective sample
size, the normalised weights and cumulative sums of resampling) and the
gather of resampled ancestors communicate. Nothing in the library needs to
know: under ``jax.jit`` the XLA partitioner (GSPMD / Shardy) turns a
reduction over a sharded axis into per-device partial reductions followed by
an ``all-reduce``, so log Z, ESS, losses and gradients are the single-device
values up to the order of floating-point additions.

What the partitioner needs is to be told, once, where the particle axis
lives. Data with a particle or batch axis can be placed with
``jax.device_put(x, NamedSharding(mesh, P("data")))``, but particles are
*drawn inside* the program, from a key shared by all of them; a training
step whose inputs (key, parameters) and outputs (a scalar loss, gradients)
are all replicated gives the partitioner no reason to split anything, and
every device then computes every particle. :func:`shard_plates` declares the
sharding where the particle axis is declared, at the plates: every sample
statement inside a named plate gets a ``jax.lax.with_sharding_constraint``
that places the plate's dimension on a mesh axis.

Resampling is global: the partitioner gathers the N weights (for their
cumulative sum) on every device and fetches each ancestor from the device
that holds it. The particles a standalone ``resample`` returns are then
replicated (every device holds all of them) until a later sharded program
splits them again, as the next step of an SMC loop does.

Random numbers: with ``jax_threefry_partitionable=True`` (the default in
current JAX) each device draws exactly its own block of a sharded
``jax.random`` call, and the values do not depend on the sharding. With
``False`` the values still do not depend on the sharding (``jit`` semantics),
but they are different values, and the partitioner has to communicate to
produce them; compare sharded and unsharded runs under the same setting.

References:
  Xu et al. (2021), "GSPMD: General and Scalable Parallelization for ML
  Computation Graphs", https://arxiv.org/abs/2105.04663.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from combinators.core.evaluate import check_callable
from combinators.core.transforms import map_fresh_samples

__all__ = ["shard_plates"]

MeshAxes = str | tuple[str, ...]


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _check_plate_axes(
    mesh: Mesh, plate_axes: Mapping[str, MeshAxes]
) -> dict[str, tuple[str, ...]]:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"shard_plates: mesh must be a jax.sharding.Mesh, got "
            f"{type(mesh).__name__}; build one with jax.make_mesh(shape, names, "
            f"axis_types=(AxisType.Auto,) * len(names))."
        )
    if not isinstance(plate_axes, Mapping) or not plate_axes:
        raise ValueError(
            f"shard_plates: plate_axes maps plate names to mesh axis names, e.g. "
            f"{{'particles': 'particles'}}; got {plate_axes!r}."
        )
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    checked: dict[str, tuple[str, ...]] = {}
    used: dict[str, str] = {}
    for plate, axes in plate_axes.items():
        axes = _as_tuple(axes)
        for axis in axes:
            if axis not in types:
                raise ValueError(
                    f"shard_plates: plate {plate!r} is mapped to mesh axis {axis!r}, "
                    f"but the mesh has axes {tuple(mesh.axis_names)}."
                )
            if types[axis] != AxisType.Auto:
                raise ValueError(
                    f"shard_plates: mesh axis {axis!r} has type {types[axis]}; "
                    f"sharding constraints need Auto axes, so create the mesh "
                    f"with jax.make_mesh(shape, names, axis_types=(AxisType.Auto,)"
                    f" * len(names))."
                )
            if axis in used:
                raise ValueError(
                    f"shard_plates: mesh axis {axis!r} is given to both plate "
                    f"{used[axis]!r} and plate {plate!r}; a site inside both "
                    f"could not be split along it twice."
                )
            used[axis] = plate
        checked[plate] = axes
    return checked


def _mesh_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def _site_sharding(
    mesh: Mesh,
    plate_axes: Mapping[str, tuple[str, ...]],
    frames,
    shape: tuple[int, ...],
    event_dim: int,
    name: str = "<value>",
) -> NamedSharding | None:
    """The sharding of a value of ``shape`` drawn inside plate ``frames``.

    A plate at (negative) batch dimension ``dim`` occupies axis
    ``len(shape) - event_dim + dim`` of the value. That axis is split over
    the plate's mesh axes when the value really has the plate's size there
    (a value broadcast along the plate, size 1, is left alone).

    Args:
      mesh: the device mesh.
      plate_axes: ``{plate name: mesh axis name or tuple of names}``.
      frames: the enclosing plates; anything with ``name``, ``size`` and
        ``dim`` (numpyro's ``CondIndepStackFrame`` or :class:`Plate`).
      shape: the value's shape (sample, batch and event dimensions).
      event_dim: the number of event dimensions at the right of ``shape``.
      name: the site name, for error messages.

    Returns:
      A ``NamedSharding``, or ``None`` if no dimension of the value is split.

    Raises:
      ValueError: if a sharded plate's size is not a multiple of the number
        of devices along its mesh axes (XLA would silently replicate it).
    """
    spec: list[MeshAxes | None] = [None] * len(shape)
    batch_end = len(shape) - event_dim
    for frame in frames:
        axes = plate_axes.get(frame.name)
        if axes is None:
            continue
        axis = batch_end + frame.dim
        if axis < 0 or shape[axis] != frame.size:
            continue
        devices = _mesh_size(mesh, axes)
        if frame.size % devices:
            raise ValueError(
                f"shard_plates: site {name!r}: plate {frame.name!r} has size "
                f"{frame.size}, which is not a multiple of the {devices} devices "
                f"along mesh axes {axes}; XLA would silently replicate it. Use a "
                f"multiple of {devices} particles."
            )
        spec[axis] = axes[0] if len(axes) == 1 else axes
    if all(s is None for s in spec):
        return None
    return NamedSharding(mesh, PartitionSpec(*spec))


@dataclasses.dataclass(frozen=True)
class _Constrain:
    """``with_sharding_constraint`` to one sharding (hashable, comparable)."""

    sharding: NamedSharding

    def __call__(self, value):
        return jax.lax.with_sharding_constraint(value, self.sharding)


def _site_constraint(mesh: Mesh, plate_axes: dict[str, tuple[str, ...]]):
    """The per-site rule of :func:`shard_plates` for ``map_fresh_samples``."""

    def constraint(*, name, frames, shape, event_dim, replayed):
        if replayed:
            raise ValueError(
                f"shard_plates: site {name!r} is replayed from the output "
                f"of a combinator, whose particles were drawn in its own scope; "
                f"wrap the programs given to the combinator instead, e.g. "
                f"propose(shard_plates(p, mesh, axes), shard_plates(q, mesh, axes))."
            )
        sharding = _site_sharding(mesh, plate_axes, frames, shape, event_dim, name)
        return None if sharding is None else _Constrain(sharding)

    return constraint


def shard_plates(
    program: Callable, mesh: Mesh, plate_axes: Mapping[str, MeshAxes]
) -> Callable:
    """Splits the named plates of ``program`` across the axes of a device mesh.

    Every sample statement of ``program`` inside a plate named in
    ``plate_axes`` gets its value constrained (``jax.lax.with_sharding_
    constraint``) to a ``NamedSharding`` that splits the plate's dimension
    over the given mesh axes; other dimensions are replicated. Under
    ``jax.jit`` the partitioner then draws, scores and transforms each block
    of particles on its own device and inserts the collectives (all-reduce,
    all-gather) that reductions over particles and resampling need; results
    equal the single-device ones up to float rounding. Outside ``jit`` the
    constraints apply eagerly (each value is moved to the sharding).

    Like the particle plate itself, the transform goes on the programs given
    to a combinator, not on its result: ``propose(shard_plates(p, ...),
    shard_plates(q, ...))``. Values the target takes from the proposal are
    already sharded; wrapping the target as well shards its observations and
    any latents only it draws.

    Args:
      program: a program (a function using numpyro primitives).
      mesh: a ``jax.sharding.Mesh`` whose named axes are ``Auto`` (e.g.
        ``jax.make_mesh((4,), ("particles",), axis_types=(AxisType.Auto,))``).
      plate_axes: ``{plate name: mesh axis}``; a tuple of mesh axes splits
        one plate over several (e.g. ``{"particles": ("x", "y")}``).

    Returns:
      The program with sharded sample sites.

    Raises:
      TypeError: if ``program`` is not callable or ``mesh`` is not a ``Mesh``.
      ValueError: at construction, for unknown or non-``Auto`` mesh axes or
        a mesh axis given to two plates; at trace time, naming the site, for
        a plate size that is not a multiple of its devices, or when the
        program replays a combinator's output.

    Example:
      >>> from jax.sharding import AxisType
      >>> n = jax.device_count()  # e.g. 1 CPU, or 8 GPUs: the same code
      >>> mesh = jax.make_mesh((n,), ("particles",), axis_types=(AxisType.Auto,))
      >>> axes = {"particles": "particles"}
      >>> def p():
      ...     with numpyro.plate("particles", 8 * n):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         numpyro.sample("y", dist.Normal(z, 1.0), obs=0.5)
      >>> def q():
      ...     with numpyro.plate("particles", 8 * n):
      ...         numpyro.sample("z", dist.Normal(0.0, 2.0))
      >>> program = coix.propose(shard_plates(p, mesh, axes),
      ...                        shard_plates(q, mesh, axes),
      ...                        loss_fn=coix.loss.iwae_loss)
      >>> evaluate = lambda key: coix.traced_evaluate(program, seed=key)()
      >>> _, trace, metrics = jax.jit(evaluate)(jax.random.key(0))
      >>> trace["z"].value.shape == (8 * n,), metrics["loss"].shape
      (True, ())

    References:
      Xu et al. (2021), "GSPMD: General and Scalable Parallelization for ML
      Computation Graphs", https://arxiv.org/abs/2105.04663.
    """
    check_callable("shard_plates", program=program)
    checked = _check_plate_axes(mesh, plate_axes)
    return map_fresh_samples(program, _site_constraint(mesh, checked))
