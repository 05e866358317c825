"""The reporting every reference program shares: folder, timer, JSON, summary, figure.

A program's ``run`` opens a :class:`Report` at its start (which creates the
output folder and starts the clock), draws its figure on :func:`axes`,
saves it with :meth:`Report.save_figure`, writes ``<stem>_metrics.json``
with :meth:`Report.write_metrics` and prints the final metrics with
:meth:`Report.summary`.

Example:
  >>> report = Report("out", "vae_moons")
  >>> ax = axes((16, 4), ncols=4)
  >>> report.save_figure(ax[0])  # out/vae_moons.png
  >>> report.write_metrics({"test_elbo": -1.2}, settings={"steps": 10})
  >>> report.summary("vae_moons: 10 steps", [("final test ELBO", "-1.2000")])
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from combinators import plots

__all__ = ["Report", "Timer", "axes", "standard_error"]


class Timer:
    """Wall-clock seconds since creation, frozen when used as a context manager.

    Example:
      >>> with Timer() as clock:
      ...     result = train(...)
      >>> clock.seconds  # the seconds ``train`` took
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._stop: float | None = None

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self._stop = None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds from the start to the context's exit, or to now if still open."""
        stop = self._stop if self._stop is not None else time.perf_counter()
        return stop - self._start


def standard_error(values) -> float:
    """The standard error of the mean of ``values`` (``ddof = 1``; 0 for one value)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2:
        return 0.0
    return float(values.std(ddof=1) / math.sqrt(values.size))


def axes(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, **kwargs):
    """Axes on a new standalone figure (``plots.new_axes``: Agg canvas, no pyplot).

    Args:
      figsize: the figure size in inches.
      nrows: rows of axes.
      ncols: columns of axes.
      **kwargs: passed on to ``Figure.subplots`` (e.g. ``width_ratios``,
        ``squeeze=False``).

    Returns:
      One ``Axes`` or an array of them, as ``Figure.subplots`` returns;
      ``ax.figure`` is the figure.
    """
    if nrows == 1 and not kwargs:
        return plots.new_axes(figsize=figsize, ncols=ncols)
    figure = plots.new_axes(figsize=figsize).figure
    figure.clear()  # keeps the constrained layout and the Agg canvas
    return figure.subplots(nrows, ncols, **kwargs)


class Report:
    """The output of one program run: ``<out>/<stem>.png`` and ``<stem>_metrics.json``.

    Creating it creates the folder ``out`` and starts the run's clock.

    Attributes:
      out: the output folder.
      stem: the file names' stem, e.g. ``"vae_moons"`` or ``"annealing_ring"``.
      program: the program's name, written as the record's ``"program"``.
      clock: the :class:`Timer` of the whole run.
      figure_path: ``<out>/<stem>.png``.
      metrics_path: ``<out>/<stem>_metrics.json``.
    """

    def __init__(self, out: str, stem: str, program: str | None = None) -> None:
        os.makedirs(out, exist_ok=True)
        self.out = out
        self.stem = stem
        self.program = program if program is not None else stem
        self.clock = Timer()
        self.figure_path = os.path.join(out, f"{stem}.png")
        self.metrics_path = os.path.join(out, f"{stem}_metrics.json")
        self._elapsed: float | None = None

    @property
    def elapsed(self) -> float:
        """Seconds since the start; frozen once the metrics are written."""
        return self._elapsed if self._elapsed is not None else self.clock.seconds

    def save_figure(self, ax, dpi: int = 100) -> str:
        """Saves the figure holding ``ax`` (axes, an array of axes or a figure).

        Args:
          ax: any axes of the figure, an array of them, or the figure.
          dpi: the resolution.

        Returns:
          The PNG's path.
        """
        if hasattr(ax, "flat"):  # an array of axes
            ax = ax.flat[0]
        figure = getattr(ax, "figure", ax)
        figure.savefig(self.figure_path, dpi=dpi)
        return self.figure_path

    def write_metrics(
        self,
        metrics: Mapping[str, float],
        *,
        settings: Mapping[str, Any] | None = None,
        timings: Mapping[str, float] | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> str:
        """Writes the JSON record and freezes :attr:`elapsed`.

        The record is ``{"program", **settings, "elapsed_seconds",
        **timings, "backend", "metrics", **extras}``.

        Args:
          metrics: the final metrics (floats).
          settings: the run's settings (steps, particles, seed, ...).
          timings: further durations in seconds (``train_seconds``, ...).
          extras: further entries (curves, per-step lists, ...).

        Returns:
          The JSON file's path.
        """
        self._elapsed = self.clock.seconds
        record: dict[str, Any] = {
            "program": self.program,
            **(settings or {}),
            "elapsed_seconds": self._elapsed,
            **(timings or {}),
            "backend": jax.default_backend(),
            "metrics": dict(metrics),
            **(extras or {}),
        }
        with open(self.metrics_path, "w") as f:
            json.dump(record, f, indent=2)
        return self.metrics_path

    def summary(
        self,
        header: str,
        rows: Sequence[tuple[str, str] | str],
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Prints the header, the rows, the elapsed time and the files written.

        Args:
          header: the first line, e.g. ``"vae_moons: 100 steps, seed 0"``.
          rows: ``(label, value)`` pairs, printed with aligned values, or
            whole lines.
          metrics: checked for non-finite values, which are flagged.
        """
        pairs = [row for row in rows if not isinstance(row, str)]
        width = max([len(label) for label, _ in pairs] + [len("elapsed")]) + 1
        print(header)
        for row in rows:
            if isinstance(row, str):
                print(f"  {row}")
            else:
                print(f"  {row[0] + ':':<{width}} {row[1]}")
        print(f"  {'elapsed:':<{width}} {self.elapsed:.1f} s")
        finite = metrics is None or all(math.isfinite(v) for v in metrics.values())
        warning = "" if finite else "  (non-finite metrics!)"
        print(f"  wrote {self.figure_path} and {self.metrics_path}{warning}")
