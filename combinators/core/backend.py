"""Coix's backend API, for scripts that import ``coix.core``.

numpyro is the only backend, and there is no global backend state: these
functions check names and answer as Coix's would for its numpyro backend.
Sites are never renamed in this library's traces (an older value of ``z``
is ``trace.history("z")[1]``, not ``z_PREV_``); :func:`desuffix` strips
suffixes from Coix-format dict traces only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from combinators.core.coix_traces import SUFFIX, split_suffix
from combinators.core.keys import require_key
from combinators.core.trace import Trace

__all__ = [
    "BACKENDS",
    "desuffix",
    "get_backend_name",
    "prng_key",
    "register_backend",
    "set_backend",
]

#: Names Coix scripts use for the numpyro backend.
BACKENDS = ("numpyro", "coix.numpyro", "combinators.numpyro")


def _check(where: str, backend: Any) -> None:
    if backend not in BACKENDS:
        raise ValueError(
            f"{where}: only the numpyro backend exists ({', '.join(BACKENDS)}), "
            f"got {backend!r}."
        )


def set_backend(backend: str) -> None:
    """Accepted for Coix scripts; numpyro is the only backend.

    Raises:
      ValueError: for any backend other than numpyro.
    """
    _check("set_backend", backend)


def register_backend(backend: str, **functions: Any) -> None:
    """Accepted for Coix scripts registering the numpyro backend.

    Args:
      backend: the backend's name; must name numpyro.
      **functions: Coix's ``traced_evaluate``, ``empirical``, ``suffix``,
        ``prng_key``, ``detach`` and ``stick_the_landing``; ignored, since
        this library's own implementations are always used.

    Raises:
      ValueError: for any backend other than numpyro.
    """
    del functions
    _check("register_backend", backend)


def get_backend_name() -> str:
    """The backend's name, as Coix reports its numpyro backend."""
    return "coix.numpyro"


def desuffix(trace):
    """Strips the ``_PREV_`` suffixes a name does not need, as Coix does.

    A :class:`~combinators.core.trace.Trace` is returned unchanged: its
    names never carry suffixes (older values are generations). For a
    Coix-format dict, every name loses as many suffixes as the least
    suffixed name with the same bare name has, so ``{"z_PREV_", "v_PREV_",
    "v"}`` becomes ``{"z", "v_PREV_", "v"}``; a renamed dict site is marked
    ``"suffix": True`` (in a copy; the input is not changed).
    """
    if isinstance(trace, Trace) or not isinstance(trace, Mapping):
        return trace
    fewest: dict[str, int] = {}
    for name in trace:
        bare, count = split_suffix(name)
        fewest[bare] = min(count, fewest.get(bare, count))
    renamed = {}
    for name, site in trace.items():
        bare, count = split_suffix(name)
        keep = count - fewest[bare]
        new_name = bare + SUFFIX * keep
        if new_name != name and isinstance(site, Mapping):
            site = {**site, "suffix": True}
        renamed[new_name] = site
    return renamed


def prng_key():
    """A fresh PRNG key from the enclosing ``numpyro.handlers.seed``.

    Raises:
      ValueError: outside a seed handler (says how to pass a key).
    """
    return require_key("prng_key")
