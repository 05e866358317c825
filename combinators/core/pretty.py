"""Plain-text and HTML tables of traces (the printout of a ``Trace``).

One row per ``(name, generation)``: the value's shape and which of its axes
are plates (the particle plate marked ``*``), the distribution when it is
known, whether the site is observed or latent and whether an ``extend``
kernel drew it. :mod:`combinators.inspect` adds the roles each site plays
in an importance-sampling step. This module is a leaf: it reads traces
through their public interface and imports no combinator.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from combinators import weights
from combinators.core.metrics import History, Metrics

__all__ = [
    "SiteRow",
    "describe",
    "describe_html",
    "html_table",
    "metric_lines",
    "particle_note",
    "site_rows",
    "text_table",
]


#: Label of a value axis that no plate claims.
UNPLATED = "-"
#: Label of an event axis.
EVENT = "event"
#: Suffix marking the particle plate (the outermost plate of the layout).
PARTICLE_MARK = "*"


class SiteRow(NamedTuple):
    """One row of a trace table: one generation of one site.

    Attributes:
      name: the site's name.
      generation: 0 for the newest value of the name, 1 for the value it
        superseded, and so on (see
        :meth:`Trace.history() <combinators.core.trace.Trace.history>`).
      shape: the value's shape.
      axes: one label per value axis: the plate's name (``"particles*"`` for
        the particle plate), ``"-"`` for a batch axis that no plate claims,
        ``"event"`` for an event axis.
      distribution: the distribution's class name, or ``None`` if unknown
        (e.g. a site replayed from a combinator's output).
      kind: ``"observed"`` or ``"latent"``.
      auxiliary: drawn by the auxiliary kernel of ``extend``.
      program: ``"q"`` or ``"p"`` in a
        :func:`~combinators.inspect.inspect_propose` table, else ``""``.
      weight: ``"+log p"``, ``"-log q"`` or ``"no"`` in a
        :func:`~combinators.inspect.inspect_propose` table, else ``""``.
      loss_role: ``"target"``, ``"reverse"``, ``"proposal"`` or ``"forward"``
        in a :func:`~combinators.inspect.inspect_propose` table, else ``""``.
    """

    name: str
    generation: int
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    distribution: str | None
    kind: str
    auxiliary: bool
    program: str = ""
    weight: str = ""
    loss_role: str = ""


# ---------------------------------------------------------------------------
# Rows.
# ---------------------------------------------------------------------------


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x))


def _axis_labels(site: Any, shape: tuple[int, ...], particle_plate) -> tuple[str, ...]:
    """Labels the value's axes by the site's plates (right-aligned batch dims)."""
    event_dim = min(site.event_dim, len(shape))
    batch_ndim = len(shape) - event_dim
    by_dim = {frame.dim: frame for frame in site.plates}
    labels = []
    for axis in range(batch_ndim):
        frame = by_dim.get(axis - batch_ndim)
        if frame is None:
            labels.append(UNPLATED)
        elif particle_plate is not None and frame == particle_plate:
            labels.append(frame.name + PARTICLE_MARK)
        else:
            labels.append(frame.name)
    return tuple(labels) + (EVENT,) * event_dim


def _distribution_name(
    site: Any, name: str, generation: int, distributions
) -> str | None:
    known = getattr(site, "distribution", None)  # a field the Site may grow
    if known:
        return str(known)
    if distributions:
        return distributions.get((name, generation))
    return None


def site_rows(
    trace: Any,
    *,
    distributions: Mapping[tuple[str, int], str | None] | None = None,
    particle_plate=None,
) -> list[SiteRow]:
    """One :class:`SiteRow` per ``(name, generation)`` of ``trace``.

    Only shapes and static fields are read, so this works on traces holding
    abstract values (inside ``jit``) too.

    Args:
      trace: the trace.
      distributions: optional ``{(name, generation): class name}`` (as
        recorded by :func:`~combinators.inspect.print_trace`).
      particle_plate: the plate to mark as the particle axis; by default the
        outermost plate of the trace's layout
        (:func:`combinators.weights.layout_of`).

    Returns:
      The rows, in the trace's order, newest generation first.
    """
    if particle_plate is None:
        particle_plate = weights.layout_of(trace).particle_plate
    rows = []
    for name, generation, site in trace.generations():
        shape = _shape(site.value)
        rows.append(
            SiteRow(
                name=name,
                generation=generation,
                shape=shape,
                axes=_axis_labels(site, shape, particle_plate),
                distribution=_distribution_name(site, name, generation, distributions),
                kind="observed" if site.observed else "latent",
                auxiliary=site.auxiliary,
            )
        )
    return rows


# ---------------------------------------------------------------------------
# Formatting.
# ---------------------------------------------------------------------------

_COLUMNS = (
    ("program", "prog"),
    ("name", "site"),
    ("generation", "gen"),
    ("shape", "shape"),
    ("axes", "axes"),
    ("distribution", "distribution"),
    ("kind", "kind"),
    ("auxiliary", "aux"),
    ("weight", "weight"),
    ("loss_role", "loss role"),
)
_OPTIONAL = ("program", "distribution", "auxiliary", "weight", "loss_role")


def _cell(row: SiteRow, field: str) -> str:
    value = getattr(row, field)
    if field == "shape":
        return str(tuple(value))
    if field == "axes":
        return ", ".join(value)
    if field == "auxiliary":
        return "aux" if value else ""
    if field == "distribution":
        return value or "?"
    return str(value)


def _columns(rows: Sequence[SiteRow]) -> list[tuple[str, str]]:
    """The columns with content: optional ones are dropped when empty."""
    kept = []
    for field, title in _COLUMNS:
        if field in _OPTIONAL and not any(getattr(r, field) for r in rows):
            continue
        kept.append((field, title))
    return kept


def particle_note(rows: Sequence[SiteRow], particle_plate) -> str | None:
    """A note naming the particle plate, if the rows show one."""
    if particle_plate is None or not any(
        PARTICLE_MARK in label for r in rows for label in r.axes
    ):
        return None
    return (
        f"{PARTICLE_MARK} particle axis: plate {particle_plate.name!r} "
        f"(N={particle_plate.size}); gen 0 is the newest value of a name"
    )


def _concrete(x, what: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except jax.errors.JAXTypeError as err:
        raise ValueError(
            f"inspect: {what} is an abstract value (a jax tracer, inside jit, "
            f"vmap, grad or a lax loop); the trace table needs only shapes, but "
            f"the metrics summary needs numbers. Call describe(trace) without "
            f"metrics there, or return the metrics from the transformed "
            f"function and describe the concrete result."
        ) from err


def _fmt(x) -> str:
    x = float(x)
    return f"{x:.4g}"


def metric_lines(metrics) -> list[str]:
    """A short summary of a metrics record (needs concrete values)."""
    if metrics is None:
        return []
    log_weight = _concrete(metrics["log_weight"], "metrics['log_weight']")
    n = log_weight.shape[0] if log_weight.ndim else 1
    parts = [f"log_weight {tuple(log_weight.shape)}"]
    for key in ("ess", "log_Z", "loss", "log_density"):
        value = metrics[key] if key in metrics else None
        if value is None:
            continue
        value = _concrete(value, f"metrics[{key!r}]")
        if value.ndim:
            parts.append(f"{key} {tuple(value.shape)}")
        elif key == "ess":
            parts.append(f"ESS {_fmt(value)} of {n}")
        else:
            parts.append(f"{key} {_fmt(value)}")
    resampled = metrics["resampled"] if "resampled" in metrics else None
    if resampled is not None:
        flag = _concrete(resampled, "metrics['resampled']")
        if flag.ndim == 0:
            parts.append(f"resampled {'yes' if bool(flag) else 'no'}")
    lines = ["metrics: " + ", ".join(parts)]
    history = metrics["history"] if "history" in metrics else None
    if isinstance(history, History):
        ess = _concrete(history.ess, "history.ess")
        flags = _concrete(history.resampled, "history.resampled")
        if ess.ndim == 1:
            lines.append(
                f"history: {ess.shape[0]} entries (initial program + steps), "
                f"resampled at {int(np.sum(flags))} steps, "
                f"min ESS {_fmt(np.min(ess))}, "
                f"final log Z {_fmt(_concrete(history.log_Z, 'history.log_Z')[-1])}"
            )
        else:
            lines.append(f"history: arrays of shape {tuple(ess.shape)}")
    fixed = ("log_weight", "ess", "log_Z", "loss", "log_density", "resampled")
    others = [k for k in metrics if k not in fixed and k != "history"]
    if others:
        lines.append("extras: " + ", ".join(others))
    return lines


def text_table(rows: Sequence[SiteRow], title: str, notes: Sequence[str]) -> str:
    """The rows as a plain-text table with a title and notes."""
    columns = _columns(rows)
    cells = [[heading for _, heading in columns]] + [
        [_cell(row, field) for field, _ in columns] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for index, line in enumerate(cells):
        text = "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
        lines.append("  " + text.rstrip())
        if index == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    if not rows:
        lines = [title, "  (no sites)"]
    lines.extend(note for note in notes if note)
    return "\n".join(lines)


def html_table(rows: Sequence[SiteRow], title: str, notes: Sequence[str]) -> str:
    """The rows as an HTML table with a caption and notes."""
    columns = _columns(rows)
    head = "".join(f"<th>{html.escape(heading)}</th>" for _, heading in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(_cell(row, f))}</td>" for f, _ in columns)
        + "</tr>"
        for row in rows
    )
    caption = f"<caption>{html.escape(title)}</caption>" if title else ""
    foot = "".join(f"<div>{html.escape(n)}</div>" for n in notes if n)
    return (
        f"<table>{caption}<thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>{foot}"
    )


def _trace_parts(trace, metrics, distributions):
    particle_plate = weights.layout_of(trace).particle_plate
    rows = site_rows(trace, distributions=distributions, particle_plate=particle_plate)
    title = f"Trace with {len(trace)} site{'s' if len(trace) != 1 else ''}"
    notes = [particle_note(rows, particle_plate), *metric_lines(metrics)]
    return rows, title, notes


def describe(
    trace: Any,
    metrics: Metrics | Mapping | None = None,
    *,
    distributions: Mapping[tuple[str, int], str | None] | None = None,
) -> str:
    """A text table of a trace's sites, optionally with its metrics.

    Columns: site, generation (0 = newest), value shape, the value's axes
    (plate names, the particle plate marked ``*``, ``-`` for an unplated
    batch axis, ``event`` for event axes), distribution (when known),
    observed or latent, and ``aux`` for sites of an ``extend`` kernel.
    Columns that would be empty are left out.

    Args:
      trace: a :class:`~combinators.trace.Trace` (e.g. from
        :func:`~combinators.traced_evaluate`, also one returned by a
        ``jit``-compiled function).
      metrics: optional metrics record; adds a summary (log weight shape,
        ESS, log Z, loss, resampling, a ``scan`` history).
      distributions: optional ``{(name, generation): class name}``.

    Returns:
      The table as a string.

    Raises:
      ValueError: if ``metrics`` holds abstract values (inside ``jit``); the
        table without metrics only reads shapes and works there.

    Example:
      >>> def model(x):
      ...     with numpyro.plate("particles", 3):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
      >>> key = jax.random.key(0)
      >>> _, trace, metrics = coix.traced_evaluate(model, seed=key)(0.5)
      >>> print(describe(trace, metrics))
      Trace with 2 sites
        site  gen  shape  axes        kind
        ----  ---  -----  ----------  --------
        z     0    (3,)   particles*  latent
        x     0    ()                 observed
      * particle axis: plate 'particles' (N=3); gen 0 is the newest value of a name
      metrics: log_weight (3,), ESS ... of 3, log_Z ..., resampled no
    """
    return text_table(*_trace_parts(trace, metrics, distributions))


def describe_html(
    trace: Any,
    metrics: Metrics | Mapping | None = None,
    *,
    distributions: Mapping[tuple[str, int], str | None] | None = None,
) -> str:
    """The table of :func:`describe` as HTML (for notebooks).

    Args:
      trace: the trace.
      metrics: optional metrics record (summarised below the table).
      distributions: optional ``{(name, generation): class name}``.

    Returns:
      An HTML ``<table>`` followed by the notes.
    """
    return html_table(*_trace_parts(trace, metrics, distributions))
