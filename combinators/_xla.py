"""A guard against an XLA CPU miscompilation in jaxlib 0.10.

jaxlib 0.10.x fuses some reductions on CPU through the experimental
YNNPACK path and returns wrong numbers without any error once arrays pass
about 2^15 elements, e.g. ``jit(lambda x, g: jnp.sum(c * x**2, 1)[:, None] *
g)`` on ``(11000, 3)`` inputs (78 wrong rows; eager mode is right). Turning
that fusion off (``--xla_cpu_experimental_ynn_fusion_type=``) fixes it. The
flag must be in ``XLA_FLAGS`` before JAX creates its CPU backend, so
importing :mod:`combinators` adds it when JAX has not computed anything yet,
and warns otherwise. Older jaxlib versions do not know the flag and are left
alone.
"""

from __future__ import annotations

import os
import warnings

import jax

_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _affected(version: str) -> bool:
    return version.startswith("0.10.")


def guard_cpu_fusion() -> None:
    """Adds the flag to ``XLA_FLAGS`` for affected jaxlib versions."""
    if not _affected(jax.__version__):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return
    from jax._src import xla_bridge  # noqa: PLC0415

    if xla_bridge.backends_are_initialized():
        warnings.warn(
            "combinators: JAX's backend started before combinators was "
            f"imported, so the fix for a jaxlib {jax.__version__} CPU "
            "miscompilation could not be applied; set "
            f"XLA_FLAGS={_FLAG} before starting Python (see "
            "combinators/_xla.py).",
            stacklevel=3,
        )
        return
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}".strip()
