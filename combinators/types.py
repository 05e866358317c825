"""Type aliases and protocols shared by the whole library.

The two core abstractions have a type here: a :data:`Program` (a function
using numpyro primitives; combinators take and return programs) and a
:class:`LossFn` (the shared signature of every objective in
:mod:`combinators.loss`). This module imports only JAX, so every other module
may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax

__all__ = ["Array", "LossFn", "PRNGKey", "Program", "is_typed_key"]

#: A JAX array (log weights, values, log densities).
Array = jax.Array

#: A PRNG key, either a typed key (``jax.random.key(0)``, preferred) or a raw
#: ``uint32`` array of shape ``(..., 2)``.
PRNGKey = jax.Array

#: A program, that is a Python function using numpyro primitives (``sample``,
#: ``plate``, ``deterministic``). Combinators take programs and return
#: programs.
Program = Callable[..., Any]


class LossFn(Protocol):
    """The shared signature of every objective in :mod:`combinators.loss`.

    ``q_trace`` is the proposal's trace, ``p_trace`` the (extended)
    target's trace, and the log weights have the particle layout (axis 0
    indexes particles). The result is a scalar to *minimise*; with
    ``aggregate=False`` the per-particle terms whose sum is that scalar (or
    has its gradient).
    """

    def __call__(
        self,
        q_trace: Any,
        p_trace: Any,
        incoming_log_weight: Array,
        incremental_log_weight: Array,
        aggregate: bool = True,
    ) -> Array:
        """Returns the loss (a scalar) or its per-particle terms."""
        ...


def is_typed_key(x: Any) -> bool:
    """Whether ``x`` is an array of typed PRNG keys (``jax.random.key``)."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
