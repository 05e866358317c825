"""Coix's backend API, for scripts that import ``coix.core``.

numpyro is the only backend, and there is no global backend state: these
functions check names and answer as Coix's would for its numpyro backend.
Sites are never renamed here (an older value of ``z`` is
``trace.history("z")[1]``, not ``z_PREV_``), so :func:`desuffix` has
nothing to strip.
"""

from __future__ import annotations

from typing import Any

from combinators.core.keys import require_key

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
    """Returns ``trace`` unchanged: site names never carry ``_PREV_`` here."""
    return trace


def prng_key():
    """A fresh PRNG key from the enclosing ``numpyro.handlers.seed``.

    Raises:
      ValueError: outside a seed handler (says how to pass a key).
    """
    return require_key("prng_key")
