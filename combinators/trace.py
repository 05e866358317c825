"""Compatibility module: traces live in :mod:`combinators.core.trace`."""

from combinators.core.trace import Plate, Site, Trace

__all__ = ["Plate", "Site", "Trace"]
