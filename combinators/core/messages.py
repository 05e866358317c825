"""The metadata contract carried by numpyro sample messages.

Combinators annotate each sample message in ``msg["infer"]`` under the keys
below; every reader and writer of those keys goes through the functions of
this module, so the contract has one home:

* ``DEPTH``: how many ``suffix`` transforms wrap the site (a site that a
  later kernel re-samples is one generation older);
* ``AUXILIARY``: drawn by the auxiliary kernel of ``extend``;
* ``REPLAY``: the original :class:`~combinators.core.trace.Site` of a value
  replayed by ``empirical`` (a combinator's output);
* ``SUBSTITUTED``: the value was given by a proposal (``propose``);
* ``METRICS``: the message type that hands a metrics record to the
  enclosing evaluation.
"""

from __future__ import annotations

from typing import Any

from numpyro.primitives import apply_stack

from combinators.core.metrics import Metrics
from combinators.core.trace import Site

__all__ = [
    "AUXILIARY",
    "DEPTH",
    "METRICS",
    "REPLAY",
    "SUBSTITUTED",
    "depth",
    "emit_metrics",
    "is_auxiliary",
    "is_substituted",
    "replayed_site",
    "substituted_from",
    "with_infer",
]

#: ``msg["infer"]`` key for how many ``suffix`` transforms wrap the site.
DEPTH = "combinators.depth"
#: ``msg["infer"]`` key marking a site drawn by the auxiliary kernel of ``extend``.
AUXILIARY = "combinators.auxiliary"
#: ``msg["infer"]`` key for the original site of a value replayed by ``empirical``.
REPLAY = "combinators.replay"
#: ``msg["infer"]`` key marking a value given by a proposal (``propose``).
SUBSTITUTED = "combinators.substituted"
#: The message type that hands a metrics record to the enclosing evaluation.
METRICS = "combinators.metrics"


def _infer(msg) -> dict:
    return msg.get("infer") or {}


def with_infer(msg, **entries: Any) -> None:
    """Adds ``entries`` to the message's ``infer`` dict (a fresh dict)."""
    msg["infer"] = {**_infer(msg), **entries}


def depth(msg) -> int:
    """The site's depth: the number of ``suffix`` transforms around it."""
    return int(_infer(msg).get(DEPTH, 0))


def replayed_site(msg) -> Site | None:
    """The original site of a replayed value, or ``None`` for a fresh one."""
    return _infer(msg).get(REPLAY)


def is_auxiliary(msg) -> bool:
    """Whether an ``extend`` kernel drew the site."""
    return bool(_infer(msg).get(AUXILIARY, False))


def is_substituted(msg) -> bool:
    """Whether the site's value was given by a proposal."""
    return substituted_from(msg) is not None


def substituted_from(msg) -> tuple[str, int] | None:
    """The proposal's ``(name, generation)`` that gave the value, if any."""
    return _infer(msg).get(SUBSTITUTED)


def emit_metrics(metrics: Metrics) -> None:
    """Hands a metrics record to the enclosing evaluation, if any."""
    msg = {
        "type": METRICS,
        "name": METRICS,
        "fn": lambda: metrics,
        "args": (),
        "kwargs": {},
        "value": metrics,
        "infer": {},
        "cond_indep_stack": [],
    }
    apply_stack(msg)
