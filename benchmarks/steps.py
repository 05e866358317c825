"""Training-step wrappers shared by the workloads, and small helpers.

Every training workload times a step ``step((params, opt_state), key,
*inputs) -> ((params, opt_state), aux)``. Three wrappers build one from a
loss ``loss_fn(params, key, *inputs) -> (loss, aux)``:

* :func:`plain_step`: ``value_and_grad`` and an optax update, nothing else
  (what a careful user writes by hand; the hand-written floor and the
  tutorial-style steps use it);
* :func:`library_step`: the library's own step,
  :func:`combinators.train.make_step` (what ``combinators.util.train``
  compiles), which also skips non-finite updates and reports the squared
  gradient norm;
* :func:`coix_style_step`: the step that Coix 0.1.0's ``util.train``
  compiles, re-stated here (its step function is local to ``train``): the
  same value and gradient, the squared gradient norm in the metrics, and a
  ``lax.cond`` that applies a zero update when a gradient is not finite.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

__all__ = ["MethodBinder", "coix_style_step", "library_step", "plain_step"]


def plain_step(loss_fn: Callable, optimizer: optax.GradientTransformation):
    """``value_and_grad`` + optax update; ``aux`` is the loss."""

    def step(state, key, *inputs):
        params, opt_state = state
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, key, *inputs
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def library_step(loss_fn: Callable, optimizer: optax.GradientTransformation):
    """The library's training step (:func:`combinators.train.make_step`).

    ``aux`` is the step's metrics (a dict with ``loss``), as
    ``combinators.util.train`` receives them.
    """
    from combinators.train import make_step

    inner = make_step(loss_fn, optimizer)

    def step(state, key, *inputs):
        params, opt_state, metrics = inner(*state, key, *inputs)
        return (params, opt_state), metrics

    return step


def coix_style_step(loss_fn: Callable, optimizer: optax.GradientTransformation):
    """The step of Coix 0.1.0's ``util.train`` (see the module docstring)."""

    def skip(grads, opt_state, params):
        del params
        return jax.tree_util.tree_map(jnp.zeros_like, grads), opt_state

    def step(state, key, *inputs):
        params, opt_state = state
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, key, *inputs
        )
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
        metrics = dict(metrics)
        metrics["squared_grad_norm"] = sum(
            jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)
        )
        finite = jnp.all(jnp.isfinite(jax.flatten_util.ravel_pytree(grads)[0]))
        updates, opt_state = jax.lax.cond(
            finite, optimizer.update, skip, grads, opt_state, params
        )
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        return (params, opt_state), metrics

    return step


class MethodBinder:
    """Calls methods or submodules of a Flax linen module with fixed parameters.

    ``MethodBinder(module, params).encoder(x)`` is
    ``module.apply(params, x, method=lambda m, x: m.encoder(x))``. A neutral
    helper, so the Coix and hand-written versions do not depend on the
    library's ``BindModule``.
    """

    def __init__(self, module, params):
        self._module = module
        self._params = params

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            return self._module.apply(
                self._params,
                *args,
                method=lambda m, *a, **kw: getattr(m, name)(*a, **kw),
                **kwargs,
            )

        return call
