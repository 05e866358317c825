"""Compatibility module: evaluation and program transforms.

The code lives in :mod:`combinators.core.evaluate` (``traced_evaluate``,
``empirical``) and :mod:`combinators.core.transforms` (``suffix``,
``detach``, ``stick_the_landing``); this module keeps the historical import
path ``combinators.handlers``.
"""

from combinators.core.evaluate import (
    Evaluation,
    check_callable,
    combine_metrics,
    default_metrics,
    empirical,
    evaluate,
    metrics_from_log_weight,
    traced_evaluate,
)
from combinators.core.messages import emit_metrics
from combinators.core.transforms import auxiliary, detach, stick_the_landing, suffix

__all__ = [
    "Evaluation",
    "auxiliary",
    "check_callable",
    "combine_metrics",
    "default_metrics",
    "detach",
    "emit_metrics",
    "empirical",
    "evaluate",
    "metrics_from_log_weight",
    "stick_the_landing",
    "suffix",
    "traced_evaluate",
]
