"""Readable tables of traces: what each site is and what it does.

A trace is a mapping from names to generations of sites (see
:mod:`combinators.trace`). This module prints one row per ``(name,
generation)``: the value's shape and which of its axes are plates (the
particle plate marked ``*``), the distribution when it is known, whether the
site is observed or latent, whether an ``extend`` kernel drew it
(auxiliary), and, for an importance-sampling step ``propose(p, q)``, which
sites enter the log weight and which role each plays in the losses.

Roles are read from trace fields, exactly as :mod:`combinators.loss` does
(never from names):

* weight: ``propose`` adds ``log p`` of the target sites that are observed
  or were given by the proposal, and subtracts ``log q`` of every proposal
  site (``api.propose``'s docstring). Target latents the proposal did not
  give are drawn from the target and cancel; they do not enter the weight.
* loss role: ``target`` (newest non-auxiliary site of p), ``reverse``
  (auxiliary site of p), ``proposal`` (oldest generation in q of a target
  name, when some kernel re-sampled a site) and ``forward`` (any other site
  of q). Losses that look at traces (``rws_loss``, ``fkl_loss``,
  ``rkl_loss``, ``apg_loss``) use these roles; ``elbo_loss``, ``iwae_loss``
  and ``avo_loss`` see the sites only through the weight.

Example:
  >>> out, trace, metrics = print_trace(program, y, seed=jax.random.key(0))
  >>> print(describe(trace, metrics))
  >>> print(inspect_propose(target, proposal, y, seed=jax.random.key(0)))
"""

from __future__ import annotations

import html
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TextIO

import jax
import numpy as np
from numpyro.primitives import Messenger

from combinators import handlers as _handlers
from combinators import loss as _loss
from combinators import weights
from combinators.metrics import History, Metrics
from combinators.trace import Site, Trace

__all__ = [
    "Inspection",
    "SiteRow",
    "describe",
    "describe_html",
    "inspect_propose",
    "print_propose",
    "print_trace",
    "site_rows",
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
        superseded, and so on (see :meth:`Trace.history`).
      shape: the value's shape.
      axes: one label per value axis: the plate's name (``"particles*"`` for
        the particle plate), ``"-"`` for a batch axis that no plate claims,
        ``"event"`` for an event axis.
      distribution: the distribution's class name, or ``None`` if unknown
        (e.g. a site replayed from a combinator's output).
      kind: ``"observed"`` or ``"latent"``.
      auxiliary: drawn by the auxiliary kernel of ``extend``.
      program: ``"q"`` or ``"p"`` in a :func:`inspect_propose` table, else
        ``""``.
      weight: ``"+log p"``, ``"-log q"`` or ``"no"`` in a
        :func:`inspect_propose` table, else ``""``.
      loss_role: ``"target"``, ``"reverse"``, ``"proposal"`` or ``"forward"``
        in a :func:`inspect_propose` table, else ``""``.
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


def _axis_labels(site: Site, shape: tuple[int, ...], particle_plate) -> tuple[str, ...]:
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
    site: Site, name: str, generation: int, distributions
) -> str | None:
    known = getattr(site, "distribution", None)  # a field the Site may grow
    if known:
        return str(known)
    if distributions:
        return distributions.get((name, generation))
    return None


def site_rows(
    trace: Trace,
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
        recorded by :func:`print_trace`).
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


def _particle_note(rows: Sequence[SiteRow], particle_plate) -> str | None:
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


def _metric_lines(metrics) -> list[str]:
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


def _text_table(rows: Sequence[SiteRow], title: str, notes: Sequence[str]) -> str:
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


def _html_table(rows: Sequence[SiteRow], title: str, notes: Sequence[str]) -> str:
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
    notes = [_particle_note(rows, particle_plate), *_metric_lines(metrics)]
    return rows, title, notes


def describe(
    trace: Trace,
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
      >>> _, trace, metrics = traced_evaluate(program, seed=jax.random.key(0))()
      >>> print(describe(trace, metrics))
    """
    return _text_table(*_trace_parts(trace, metrics, distributions))


def describe_html(
    trace: Trace,
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
    return _html_table(*_trace_parts(trace, metrics, distributions))


# ---------------------------------------------------------------------------
# Tracing helpers.
# ---------------------------------------------------------------------------


class _DistributionRecorder(Messenger):
    """Notes each sample site's distribution and whether it was substituted.

    Wraps a program (so it sits inside the combinators' own handlers and
    sees their metadata). Replayed sites (a combinator's output) are noted
    without a distribution: only a ``Delta`` of the original is visible.
    """

    def __init__(self, fn):
        self.notes: dict[str, dict[int, tuple[str | None, bool]]] = {}
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["type"] != "sample":
            return
        infer = msg.get("infer") or {}
        depth = int(infer.get(_handlers._DEPTH, 0))
        replay = infer.get(_handlers._REPLAY)
        if replay is not None:
            name = getattr(replay, "distribution", None)
        else:
            name = type(_handlers._base_distribution(msg["fn"])).__name__
        substituted = bool(infer.get(_handlers._SUBSTITUTED, False))
        # The first evaluation wins: propose(detach=True) evaluates the target
        # a second time with every latent given.
        self.notes.setdefault(msg["name"], {}).setdefault(depth, (name, substituted))

    def by_generation(self) -> dict[tuple[str, int], tuple[str | None, bool]]:
        """``{(name, generation): (distribution, substituted)}``.

        Generations rank a name's depths, newest (smallest depth) first, as
        the trace does.
        """
        out = {}
        for name, by_depth in self.notes.items():
            for generation, depth in enumerate(sorted(by_depth)):
                out[(name, generation)] = by_depth[depth]
        return out


def print_trace(
    program: Callable,
    *args,
    seed=None,
    file: TextIO | None = None,
    **kwargs,
):
    """Traces ``program(*args, **kwargs)`` and prints its trace table.

    Args:
      program: a program (plain numpyro function or a combinator's output).
      *args: the program's arguments.
      seed: a PRNG key for its sample statements (``jax.random.key(0)``),
        as for :func:`~combinators.traced_evaluate`.
      file: where to print (default ``sys.stdout``).
      **kwargs: the program's keyword arguments.

    Returns:
      ``(out, trace, metrics)``, as ``traced_evaluate`` returns them.

    Example:
      >>> out, trace, metrics = print_trace(model, y, seed=jax.random.key(0))
    """
    recorder = _DistributionRecorder(program)
    out, trace, metrics = _handlers.traced_evaluate(recorder, seed=seed)(
        *args, **kwargs
    )
    names = {key: note[0] for key, note in recorder.by_generation().items()}
    print(describe(trace, metrics, distributions=names), file=file or sys.stdout)
    return out, trace, metrics


class Inspection(NamedTuple):
    """What :func:`inspect_propose` saw of one ``propose(p, q)`` step.

    Attributes:
      rows: the proposal's sites (``program="q"``), then the target's
        (``program="p"``), with weight and loss roles.
      out: the step's output.
      trace: the step's trace (the target's marginal).
      metrics: the step's metrics.
      q_trace: the proposal's trace, as the loss saw it.
      p_trace: the target's trace (auxiliary sites included), as the loss saw
        it.
    """

    rows: list[SiteRow]
    out: Any
    trace: Trace
    metrics: Metrics
    q_trace: Trace
    p_trace: Trace

    def _parts(self):
        layout = weights.layout_of(self.q_trace, self.p_trace)
        title = "propose(p, q): log w = log w_in + sum(+log p rows) - sum(-log q rows)"
        notes = [
            _particle_note(self.rows, layout.particle_plate),
            "w_in: the proposal's own weight (for a plain q, log q of its observed "
            "sites); weight 'no': drawn by p itself, cancels",
            "loss role: as combinators.loss reads traces (rws/fkl/rkl/apg losses); "
            "elbo/iwae/avo losses see sites only through the weight",
            *_metric_lines(self.metrics),
        ]
        return self.rows, title, notes

    def __str__(self) -> str:
        return _text_table(*self._parts())

    def _repr_html_(self) -> str:
        return _html_table(*self._parts())


def inspect_propose(
    p: Callable,
    q: Callable,
    *args,
    seed=None,
    loss_fn: Callable | None = None,
    detach: bool = False,
    chain: bool = False,
    **kwargs,
) -> Inspection:
    """Runs ``propose(p, q)`` once and tells which site does what.

    Evaluates ``combinators.propose(p, q, loss_fn=..., detach=..., chain=...)``
    with a loss that also records the proposal's and target's traces (the
    given ``loss_fn``'s value is kept), so the roles shown are the ones the
    library used.

    Args:
      p: the target program.
      q: the proposal program.
      *args: the arguments of the step.
      seed: a PRNG key (``jax.random.key(0)``).
      loss_fn: the step's loss (optional).
      detach: as for :func:`~combinators.propose`.
      chain: as for :func:`~combinators.propose`.
      **kwargs: the step's keyword arguments.

    Returns:
      An :class:`Inspection`; ``print()`` it for the table.

    Example:
      >>> print(inspect_propose(target, proposal, y, seed=jax.random.key(0)))
    """
    from combinators.api import propose

    seen: list[tuple[Trace, Trace]] = []

    def recording_loss(q_trace, p_trace, incoming, incremental):
        seen.append((q_trace, p_trace))
        if loss_fn is None:
            return 0.0
        return loss_fn(q_trace, p_trace, incoming, incremental)

    if loss_fn is not None and getattr(loss_fn, "pathwise", False):
        recording_loss.pathwise = True
    p_notes, q_notes = _DistributionRecorder(p), _DistributionRecorder(q)
    program = propose(
        p_notes, q_notes, loss_fn=recording_loss, detach=detach, chain=chain
    )
    out, trace, metrics = _handlers.traced_evaluate(program, seed=seed)(*args, **kwargs)
    q_trace, p_trace = seen[-1]
    return Inspection(
        _propose_rows(
            q_trace, p_trace, q_notes.by_generation(), p_notes.by_generation()
        ),
        out,
        trace,
        metrics,
        q_trace,
        p_trace,
    )


def _propose_rows(q_trace, p_trace, q_notes, p_notes) -> list[SiteRow]:
    particle_plate = weights.layout_of(q_trace, p_trace).particle_plate
    proposal, targets = _loss._roles(q_trace, p_trace)
    q_rows = site_rows(
        q_trace,
        distributions={k: v[0] for k, v in q_notes.items()},
        particle_plate=particle_plate,
    )
    rows = [
        row._replace(
            program="q",
            weight="-log q",
            loss_role="proposal"
            if (row.name, row.generation) in proposal
            else "forward",
        )
        for row in q_rows
    ]
    p_rows = site_rows(
        p_trace,
        distributions={k: v[0] for k, v in p_notes.items()},
        particle_plate=particle_plate,
    )
    for row in p_rows:
        substituted = p_notes.get((row.name, row.generation), (None, False))[1]
        if row.auxiliary:
            role = "reverse"
        elif row.generation == 0 and row.name in targets:
            role = "target"
        else:
            role = ""
        rows.append(
            row._replace(
                program="p",
                weight="+log p" if row.kind == "observed" or substituted else "no",
                loss_role=role,
            )
        )
    return rows


def print_propose(
    p: Callable,
    q: Callable,
    *args,
    seed=None,
    loss_fn: Callable | None = None,
    file: TextIO | None = None,
    **kwargs,
):
    """Prints the table of :func:`inspect_propose`.

    Args:
      p: the target program.
      q: the proposal program.
      *args: the arguments of the step.
      seed: a PRNG key.
      loss_fn: the step's loss (optional).
      file: where to print (default ``sys.stdout``).
      **kwargs: the step's keyword arguments.

    Returns:
      ``(out, trace, metrics)`` of the step.
    """
    inspection = inspect_propose(p, q, *args, seed=seed, loss_fn=loss_fn, **kwargs)
    print(inspection, file=file or sys.stdout)
    return inspection.out, inspection.trace, inspection.metrics
