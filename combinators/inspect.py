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
  >>> def target(y):
  ...     with numpyro.plate("particles", 3):
  ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
  ...         numpyro.sample("y", dist.Normal(z, 1.0), obs=y)
  >>> def proposal(y):
  ...     with numpyro.plate("particles", 3):
  ...         numpyro.sample("z", dist.Normal(y / 2, 1.0))
  >>> print(inspect_propose(target, proposal, 0.5, seed=jax.random.key(0)))
  propose(p, q): log w = log w_in + sum(+log p rows) - sum(-log q rows)
    prog  site  gen  shape  axes        distribution  kind      weight  loss role
    ----  ----  ---  -----  ----------  ------------  --------  ------  ---------
    q     z     0    (3,)   particles*  Normal        latent    -log q  forward
    p     z     0    (3,)   particles*  Normal        latent    +log p  target
    p     y     0    ()                 Normal        observed  +log p  target
  * particle axis: plate 'particles' (N=3); gen 0 is the newest value of a name
  w_in: the proposal's own weight ...
  loss role: as combinators.loss reads traces ...
  metrics: log_weight (3,), ESS ... of 3, log_Z ..., resampled no
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple, TextIO

from combinators import weights
from combinators.api import propose
from combinators.core.evaluate import DistributionNotes, traced_evaluate
from combinators.core.metrics import Metrics
from combinators.core.pretty import (
    SiteRow,
    describe,
    describe_html,
    html_table,
    metric_lines,
    particle_note,
    site_rows,
    text_table,
)
from combinators.core.trace import Trace
from combinators.loss.roles import site_roles

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

# ---------------------------------------------------------------------------
# Tracing helpers.
# ---------------------------------------------------------------------------


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
      >>> def model(y):
      ...     with numpyro.plate("particles", 3):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         numpyro.sample("y", dist.Normal(z, 1.0), obs=y)
      >>> out, trace, metrics = print_trace(model, 0.5, seed=jax.random.key(0))
      Trace with 2 sites
        site  gen  shape  axes        distribution  kind
        ----  ---  -----  ----------  ------------  --------
        z     0    (3,)   particles*  Normal        latent
        y     0    ()                 Normal        observed
      * particle axis: plate 'particles' (N=3); gen 0 is the newest value of a name
      metrics: log_weight (3,), ESS ... of 3, log_Z ..., resampled no
    """
    recorder = DistributionNotes(program)
    out, trace, metrics = traced_evaluate(recorder, seed=seed)(*args, **kwargs)
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
            particle_note(self.rows, layout.particle_plate),
            "w_in: the proposal's own weight (for a plain q, log q of its observed "
            "sites); weight 'no': drawn by p itself, cancels",
            "loss role: as combinators.loss reads traces (rws/fkl/rkl/apg losses); "
            "elbo/iwae/avo losses see sites only through the weight",
            *metric_lines(self.metrics),
        ]
        return self.rows, title, notes

    def __str__(self) -> str:
        return text_table(*self._parts())

    def _repr_html_(self) -> str:
        return html_table(*self._parts())


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
      >>> def target(y):
      ...     with numpyro.plate("particles", 3):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         numpyro.sample("y", dist.Normal(z, 1.0), obs=y)
      >>> def proposal(y):
      ...     with numpyro.plate("particles", 3):
      ...         numpyro.sample("z", dist.Normal(y / 2, 1.0))
      >>> key = jax.random.key(0)
      >>> inspection = inspect_propose(target, proposal, 0.5, seed=key)
      >>> for row in inspection.rows:
      ...     print(row.program, row.name, row.weight, row.loss_role)
      q z -log q forward
      p z +log p target
      p y +log p target
    """
    seen: list[tuple[Trace, Trace]] = []

    def recording_loss(q_trace, p_trace, incoming, incremental):
        seen.append((q_trace, p_trace))
        if loss_fn is None:
            return 0.0
        return loss_fn(q_trace, p_trace, incoming, incremental)

    p_notes, q_notes = DistributionNotes(p), DistributionNotes(q)
    program = propose(
        p_notes, q_notes, loss_fn=recording_loss, detach=detach, chain=chain
    )
    out, trace, metrics = traced_evaluate(program, seed=seed)(*args, **kwargs)
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
    proposal, targets = site_roles(q_trace, p_trace)
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
