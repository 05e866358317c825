"""Checked mode: non-finite weights, densities and losses become errors.

Compiled importance samplers fail quietly: a NaN in one site's log density
turns every weight, the log Z estimate and the loss into NaN, and nothing
says where it came from. :func:`checked` runs a function with the
combinators' finiteness checks switched on. Inside ``jit``, ``grad``,
``vmap``, ``lax.scan`` and ``lax.cond`` the checks are functionalised by
``jax.experimental.checkify``, and the first failure is raised after the
call as an error that names the combinator, the site and the shapes.

What is checked, at every ``propose`` and ``resample``:

* a site's log density is NaN (target or proposal);
* a target site's log density is ``+inf``, or a proposal site's is ``-inf``
  (a draw the proposal gives zero density: its weight is ``+inf``);
* a log weight is NaN or ``+inf``, or every log weight of a column is
  ``-inf`` (no particle has positive weight);
* the loss is not finite.

A target density of ``-inf`` for some particles (a draw outside the
target's support) is a legitimate zero weight and is not an error.

Checks cost a reduction per site and are off by default; the mode is a
handler on numpyro's stack for the duration of the call, not global state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from numpyro.primitives import _PYRO_STACK, Messenger

from combinators.core.trace import Site

__all__ = [
    "check_log_weight",
    "check_loss",
    "check_observation",
    "check_sites",
    "checked",
    "is_checked",
]


class _CheckedMode(Messenger):
    """Marks the extent of a :func:`checked` call on numpyro's handler stack."""


def is_checked() -> bool:
    """Whether the caller runs inside :func:`checked`."""
    return any(isinstance(handler, _CheckedMode) for handler in _PYRO_STACK)


def checked(fn: Callable, *, jit: bool = True) -> Callable:
    """``fn`` with the combinators' finiteness checks turned into errors.

    Args:
      fn: any function that evaluates combinator programs (a loss, a
        ``traced_evaluate`` call, a training step). Pass the plain function,
        not a ``jax.jit``-compiled one: the checks are added when it is
        traced.
      jit: compile the checked function with ``jax.jit``.

    Returns:
      A function with ``fn``'s signature and outputs that raises
      ``jax.errors.JaxRuntimeError`` (message: combinator, site, shape) when
      a check fails.

    Example:
      >>> def target(scale):
      ...     with numpyro.plate("particles", 3):
      ...         z = numpyro.sample("z", dist.Normal(0.0, scale))
      ...         numpyro.sample("y", dist.Normal(z, 1.0), obs=0.5)
      >>> def proposal(scale):
      ...     with numpyro.plate("particles", 3):
      ...         numpyro.sample("z", dist.Normal(0.0, 1.0))
      >>> program = coix.propose(target, proposal)
      >>> log_Z = coix.checked(
      ...     lambda key, scale: coix.traced_evaluate(program, seed=key)(scale)[2].log_Z
      ... )
      >>> log_Z(jax.random.key(0), -1.0)  # a negative scale: NaN log densities
      Traceback (most recent call last):
      ...
      jax...JaxRuntimeError: propose: site 'z' of the target has a NaN log density ...
    """

    @functools.wraps(fn)
    def with_checks(*args, **kwargs):
        with _CheckedMode():
            return fn(*args, **kwargs)

    functional = checkify.checkify(with_checks, errors=checkify.user_checks)
    if jit:
        functional = jax.jit(functional)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        error, out = functional(*args, **kwargs)
        error.throw()
        return out

    return run


def _shape(x) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def check_sites(where: str, role: str, named_sites: Iterable[tuple[str, Site]]) -> None:
    """Checks the log densities of ``(name, site)`` pairs (in checked mode).

    Args:
      where: the combinator, e.g. ``"propose"``.
      role: ``"target"`` or ``"proposal"``; decides which infinity is bad.
      named_sites: the sites with their names.
    """
    if not is_checked():
        return
    bad_infinity = jnp.inf if role == "target" else -jnp.inf
    meaning = (
        "an infinite target density"
        if role == "target"
        else "a draw the proposal gives zero density (an infinite weight)"
    )
    for name, site in named_sites:
        log_prob = jnp.asarray(site.log_prob)
        checkify.check(
            ~jnp.any(jnp.isnan(log_prob)),
            f"{where}: site {name!r} of the {role} has a NaN log density "
            f"(log density shape {_shape(log_prob)}, value shape "
            f"{_shape(site.value)}); check the parameters of its distribution.",
        )
        checkify.check(
            ~jnp.any(log_prob == bad_infinity),
            f"{where}: site {name!r} of the {role} has log density "
            f"{float(bad_infinity)} ({meaning}; log density shape "
            f"{_shape(log_prob)}).",
        )


def check_log_weight(where: str, log_weight) -> None:
    """Checks log weights (in checked mode).

    No NaN or ``+inf``, and every column has a particle of positive weight.
    """
    if not is_checked():
        return
    log_weight = jnp.asarray(log_weight)
    shape = _shape(log_weight)
    checkify.check(
        ~jnp.any(jnp.isnan(log_weight)),
        f"{where}: NaN log weight (log weights of shape {shape}, particle axis first).",
    )
    checkify.check(
        ~jnp.any(log_weight == jnp.inf),
        f"{where}: log weight +inf (log weights of shape {shape}).",
    )
    if log_weight.ndim:
        checkify.check(
            jnp.all(jnp.any(log_weight > -jnp.inf, axis=0)),
            f"{where}: every particle of a column has log weight -inf, so no "
            f"particle has positive weight (log weights of shape {shape}).",
        )


def check_loss(where: str, loss_name: str, loss) -> None:
    """Checks that a loss is finite (in checked mode)."""
    if not is_checked():
        return
    checkify.check(
        jnp.all(jnp.isfinite(loss)),
        f"{where}: the loss {loss_name} is not finite (shape {_shape(loss)}).",
    )


def check_observation(where: str, name: str, fn, value) -> None:
    """Checks traced observed data (in checked mode): finite and in support."""
    if not is_checked():
        return
    value = jnp.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.inexact):
        checkify.check(
            jnp.all(jnp.isfinite(value)),
            f"{where}: observed site {name!r} has NaN or infinite data (shape "
            f"{_shape(value)}).",
        )
    support = getattr(fn, "support", None)
    try:
        inside = None if support is None else support(value)
    except NotImplementedError:  # a dependent support (e.g. Delta)
        inside = None
    if inside is not None:
        checkify.check(
            jnp.all(inside),
            f"{where}: observed site {name!r} has data outside the support "
            f"{support} of {type(fn).__name__} (shape {_shape(value)}).",
        )
