"""Loops over programs compiled once: ``fori_loop`` and ``scan``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from combinators.core import evaluate
from combinators.core import keys as _keys
from combinators.core.metrics import ANCESTORS, History

__all__ = ["fori_loop", "scan"]


def _describe(tree) -> str:
    return str(
        jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
        )
    )


def _loop_runner(args, kwargs, where: str):
    """The loop's key and a function evaluating a program with a given key."""
    if _keys.can_extract_key(args):
        key = args[0]

        def run(program, k):
            return evaluate.evaluate(program, where=where)(k, *args[1:], **kwargs)

    else:
        key = _keys.require_key(where)

        def run(program, k):
            return evaluate.evaluate(program, seed=k, where=where)(*args, **kwargs)

    return key, run


class _SiteValue:
    """Stands in a loop carry's ``out`` for a leaf that is a site's value.

    ``lax`` loops give every carry leaf its own tracer, so an output that
    *is* a site's value (e.g. a target returning what it sampled) would stop
    being that value inside the body. Combinators that treat such outputs
    like the site (``resample`` gathers them with the site's particles)
    would then see a stranger array. The carry keeps a reference instead,
    resolved to the site's (same) tracer when the body replays the carry.
    """

    __slots__ = ("name", "generation")

    def __init__(self, name: str, generation: int):
        self.name, self.generation = name, generation

    def __repr__(self) -> str:
        return f"SiteValue({self.name!r}, {self.generation})"


jax.tree_util.register_pytree_node(
    _SiteValue,
    lambda ref: ((), (ref.name, ref.generation)),
    lambda aux, _: _SiteValue(*aux),
)


def _share_site_values(out, trace):
    """``out`` with every leaf that is a site's value replaced by a reference."""
    owners = {id(s.value): (n, g, s.value) for n, g, s in trace.generations()}

    def share(leaf):
        owner = owners.get(id(leaf))
        if owner is not None and owner[2] is leaf:
            return _SiteValue(owner[0], owner[1])
        return leaf

    return jax.tree_util.tree_map(share, out)


def _resolve_site_values(out, trace):
    """The inverse of :func:`_share_site_values` for ``trace``."""
    histories = trace.histories()

    def resolve(leaf):
        if isinstance(leaf, _SiteValue):
            return histories[leaf.name][leaf.generation].value
        return leaf

    return jax.tree_util.tree_map(
        resolve, out, is_leaf=lambda x: isinstance(x, _SiteValue)
    )


def _replay(out, trace, metrics):
    """The program a loop carry stands for (site references resolved)."""
    return evaluate.empirical(_resolve_site_values(out, trace), trace, metrics)


def _without_extras(metrics, names):
    """``metrics`` without the named per-step extras.

    A loop must not carry ``history`` (a nested loop's) nor :data:`ANCESTORS`
    (the indices of a ``resample(..., record_ancestors=True)`` inside the
    step): the initial program has neither, so carrying them would change
    the carry's structure.
    """
    extras = {k: v for k, v in metrics.extras.items() if k not in names}
    return metrics.replace(extras=extras)


def _check_bounds(where: str, lower, upper) -> None:
    """Concrete bounds must satisfy ``lower <= upper``."""
    try:
        low, high = int(lower), int(upper)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced bounds: jax.lax checks what it can
    if low > high:
        raise ValueError(
            f"{where}: lower={low} > upper={high}; the loop would run no step "
            f"and silently return the initial program. Give lower <= upper."
        )


def _check_carry(where: str, init, got) -> None:
    # jaxlib ships no stubs for PyTreeDef, so mypy cannot see its __ne__.
    if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(  # type: ignore[operator]
        init
    ) or _describe(got) != _describe(init):
        raise ValueError(
            f"{where}: the body's program changes the structure or shapes of "
            "the trace and metrics; every iteration must return the same "
            f"sites.\n  initial: {_describe(init)}\n  body:    {_describe(got)}"
        )


def fori_loop(lower: int, upper: int, body_fun: Callable, init_program: Callable):
    """Runs ``body_fun`` from ``lower`` to ``upper``, compiled once.

    Args:
      lower: first loop index.
      upper: loop index upper bound (exclusive).
      body_fun: ``body_fun(i, program) -> program``; the new program's trace
        and metrics must have the same structure and shapes as the initial
        program's.
      init_program: the program to start from.

    Returns:
      A program that runs the loop with ``jax.lax.fori_loop``.

    Raises:
      ValueError: if the body changes the structure of the trace.
    """
    evaluate.check_callable("fori_loop", body_fun=body_fun, init_program=init_program)
    _check_bounds("fori_loop", lower, upper)

    def looped(*args, **kwargs):
        key, run = _loop_runner(args, kwargs, "fori_loop")
        key_body, key_init = _keys.split_key(key)

        def as_carry(result):
            metrics = result.metrics or evaluate.default_metrics(
                result.trace, where="fori_loop"
            )
            trace = result.trace.rebased()
            out = _share_site_values(result.out, trace)
            return out, trace, _without_extras(metrics, (ANCESTORS,))

        def body(i, carry):
            program = body_fun(i, _replay(*carry))
            new = as_carry(run(program, _keys.fold_in_key(key_body, i)))
            # Checked while jax traces the body (once, as in Coix), before
            # jax.lax compares the carries with a less specific error.
            _check_carry("fori_loop", carry, new)
            return new

        init = as_carry(run(init_program, key_init))
        final = jax.lax.fori_loop(lower, upper, body, init)
        return _replay(*final)(*args, **kwargs)

    return looped


def scan(
    lower: int,
    upper: int,
    body_fun: Callable,
    init_program: Callable,
    *,
    record: Callable | None = None,
    unroll: bool = False,
):
    """A loop over programs that keeps a per-step history, compiled once.

    Like :func:`fori_loop`, but run with ``jax.lax.scan``, and the program
    carried from one step to the next keeps only the newest generation of
    each site. Older generations are marginalised out: their contribution
    is already in the weights, so particles and weights stay properly
    weighted for the newest values. This keeps the carry's shape fixed for
    sequential Monte Carlo written as ``compose(propose(p_t, k_t),
    resample(q))``, where each step scores only its new sites (O(N) per
    step). To keep a whole path, write it into a pre-allocated buffer that
    the programs return (resampling moves every output array whose leading
    axis is the particle axis) and index it with the step number.

    Args:
      lower: the first step index given to ``body_fun``.
      upper: the step index bound (exclusive).
      body_fun: ``body_fun(t, program) -> program``.
      init_program: the program of step ``lower - 1``.
      record: optional ``record(out, trace, metrics) -> pytree`` of per-step
        arrays to keep (e.g. filtering means). It sees each step's own
        metrics, including what the loop does not carry: the ancestor
        indices ``metrics["ancestors"]`` of a ``resample(...,
        record_ancestors=True)`` in the step (absent for the initial
        program); see :func:`combinators.smoothing.record_particles`.
      unroll: run the steps as a Python loop (``t`` is then a Python int, so
        ``body_fun`` may pick a different program per step, e.g. from a
        list); each step is traced separately, so compile time grows with
        the number of steps, and a step's trace may differ from the previous
        one (e.g. a path that grows by one state per step).

    Returns:
      A program whose ``metrics["history"]`` is a
      :class:`~combinators.core.metrics.History` whose fields are stacked
      over ``upper - lower + 1`` entries: the initial program, then every
      step.

    Raises:
      ValueError: if a step changes the structure or shapes of the carry.
    """
    evaluate.check_callable("scan", body_fun=body_fun, init_program=init_program)
    _check_bounds("scan", lower, upper)
    if record is not None and not callable(record):
        raise TypeError(f"scan: record must be callable, got {record!r}.")

    def scanned(*args, **kwargs):
        key, run = _loop_runner(args, kwargs, "scan")
        key_body, key_init = _keys.split_key(key)

        def as_carry(result):
            """The loop's carry, and the step's metrics for ``record``."""
            metrics = result.metrics or evaluate.default_metrics(
                result.trace, where="scan"
            )
            trace = result.trace.newest().rebased()
            out = _share_site_values(result.out, trace)
            carry = (out, trace, _without_extras(metrics, ("history", ANCESTORS)))
            return carry, _without_extras(metrics, ("history",))

        def summarize(carry, step_metrics, previous_log_Z):
            out, trace, metrics = carry
            out = _resolve_site_values(out, trace)
            return History(
                ess=metrics.ess,
                log_Z=metrics.log_Z,
                log_Z_increment=metrics.log_Z - previous_log_Z,
                resampled=jnp.asarray(metrics.resampled, dtype=bool),
                records=(
                    record(out, trace, step_metrics) if record is not None else {}
                ),
            )

        # One key per step, split before the loop (not derived inside it).
        num_steps = max(upper - lower, 0)
        step_keys = _keys.split_key_n(key_body, max(num_steps, 1))

        def body(carry, step):
            t, key_t = step
            out, trace, metrics = carry
            previous = _replay(
                out, trace, metrics.replace(resampled=jnp.asarray(False))
            )
            new, step_metrics = as_carry(run(body_fun(t, previous), key_t))
            if not unroll:  # unrolled steps may differ (e.g. a growing path)
                _check_carry("scan", carry, new)
            return new, summarize(new, step_metrics, metrics.log_Z)

        init, init_metrics = as_carry(run(init_program, key_init))
        init = (
            init[0],
            init[1],
            init[2].replace(resampled=jnp.asarray(init[2].resampled)),
        )
        first = summarize(init, init_metrics, jnp.zeros_like(init[2].log_Z))
        if unroll:
            final, summaries = init, [first]
            for t in range(lower, upper):
                final, summary = body(final, (t, step_keys[t - lower]))
                summaries.append(summary)
            history = jax.tree_util.tree_map(
                lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *summaries
            )
        else:
            final, steps = jax.lax.scan(
                body, init, (jnp.arange(lower, upper), step_keys[:num_steps])
            )
            history = jax.tree_util.tree_map(
                lambda a, b: jnp.concatenate([jnp.asarray(a)[None], b]), first, steps
            )
        out, trace, metrics = final
        metrics = metrics.replace(history=history)
        return _replay(out, trace, metrics)(*args, **kwargs)

    return scanned
