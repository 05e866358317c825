"""Compatibility module: metrics live in :mod:`combinators.core.metrics`."""

from combinators.core.metrics import History, Metrics

__all__ = ["History", "Metrics"]
