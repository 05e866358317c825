"""Training several seeds of one configuration at once: one compiled, vmapped scan.

The reproduction programs train each configuration from ``S`` seeds and
report means and standard errors over them. :func:`scan_replicates` runs
the ``S`` replicates together, ``jax.vmap`` over a ``lax.scan`` of the
training steps, compiled once, and summarises each per-step metric by its
means over a few segments of training (the training curve) and its total.

Example:
  >>> import jax, jax.numpy as jnp
  >>> def init(key):
  ...     return jnp.zeros(())
  >>> def body(x, key):
  ...     x = x + 1.0
  ...     return x, {"x": x}
  >>> final, means, totals = scan_replicates(
  ...     init, body, jax.random.split(jax.random.key(0), 3), 6, num_segments=2
  ... )
  >>> final.tolist(), means["x"][0].tolist(), totals["x"][0].item()
  ([6.0, 6.0, 6.0], [2.0, 5.0], 21.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["FAST_COMPILE", "num_segments_for", "scan_replicates"]

#: ``jax.jit`` compiler options for tiny (smoke) runs, where compilation
#: dominates: XLA's lowest backend optimisation level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def num_segments_for(steps: int, most: int) -> int:
    """The largest number of equal segments, at most ``most``, dividing ``steps``."""
    return max(n for n in range(1, min(most, steps) + 1) if steps % n == 0)


def scan_replicates(
    init: Callable[[jax.Array], Any],
    body: Callable[[Any, jax.Array], tuple[Any, dict[str, jax.Array]]],
    keys: jax.Array,
    steps: int,
    *,
    num_segments: int = 10,
    fast_compile: bool = False,
) -> tuple[Any, dict[str, jax.Array], dict[str, jax.Array]]:
    """Runs ``steps`` of ``body`` from ``init(key)``, for every key at once.

    Each key is split into an initialisation key and a training key; the
    training key is split into one key per step.

    Args:
      init: ``key -> carry``, the replicate's initial state.
      body: ``(carry, key) -> (carry, metrics)``, one training step, with
        ``metrics`` a dict of scalars.
      keys: one key per replicate, shape ``(S,)``.
      steps: the number of steps.
      num_segments: the training curve has at most this many points
        (:func:`num_segments_for`).
      fast_compile: compile with :data:`FAST_COMPILE`.

    Returns:
      ``(carry, means, totals)``: the final carries (leading axis ``S``);
      per metric its means over each segment of training, ``(S, segments)``,
      and its sum over all steps, ``(S,)``.
    """
    segments = num_segments_for(steps, num_segments)

    def one(key):
        key_init, key_train = jax.random.split(key)
        carry, history = jax.lax.scan(
            body, init(key_init), jax.random.split(key_train, steps)
        )
        means = {
            name: jnp.mean(v.reshape(segments, -1), axis=1)
            for name, v in history.items()
        }
        totals = {name: jnp.sum(v) for name, v in history.items()}
        return carry, means, totals

    options = FAST_COMPILE if fast_compile else None
    return jax.jit(jax.vmap(one), compiler_options=options)(keys)
