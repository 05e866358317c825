"""Sequencing programs: ``compose``, ``extend`` and ``newest``.

References:
  Stites, Zimmermann, Wu, Sennesh & van de Meent (2021), "Learning Proposals
  for Probabilistic Programs with Inference Combinators",
  https://arxiv.org/abs/2103.00668.
"""

from __future__ import annotations

from collections.abc import Callable

from combinators.core import evaluate, transforms

__all__ = ["compose", "extend", "newest"]


def _as_args(out, where: str, role: str) -> tuple:
    if isinstance(out, tuple):
        return out
    raise TypeError(
        f"{where}: {role} must return a tuple of arguments for the next program, "
        f"got {type(out).__name__}; return `(value,)` for a single value."
    )


def compose(q2: Callable, q1: Callable, suffix: bool = True) -> Callable:
    """Runs ``q2(*q1(...))``: a kernel ``q2`` after a program ``q1``.

    Args:
      q2: the program run second; receives ``q1``'s outputs as arguments.
      q1: the program run first; must return a tuple.
      suffix: if True, sites of ``q1`` that ``q2`` samples again become an
        older generation of that name (the trace keeps both); if False, a name
        in both is an error.

    Returns:
      The composed program. If both ``q1`` and ``q2`` are weighted, their
      weights multiply (nested importance sampling).

    Example:
      >>> def q(x):
      ...     with numpyro.plate("particles", 4):
      ...         return (numpyro.sample("z", dist.Normal(x, 1.0)),)
      >>> def kernel(z):
      ...     with numpyro.plate("particles", 4):
      ...         return (numpyro.sample("z", dist.Normal(z, 0.1)),)
      >>> program = compose(kernel, q)
      >>> _, trace, _ = coix.traced_evaluate(program, seed=jax.random.key(0))(0.0)
      >>> len(trace.history("z"))  # the kernel's value, then the one it replaced
      2
    """
    evaluate.check_callable("compose", q2=q2, q1=q1)

    def composed(*args, **kwargs):
        first = transforms.suffix(q1) if suffix else q1
        return q2(*_as_args(first(*args, **kwargs), "compose", "q1"))

    return composed


def extend(p: Callable, f: Callable) -> Callable:
    """Target ``p`` extended by an auxiliary kernel ``f``: ``p(x) f(y | x)``.

    The sites of ``f`` are marked auxiliary and one generation older, so in
    ``propose(extend(p, f), compose(k, q))`` the reverse kernel ``f`` scores
    the values that the forward kernel ``k`` replaced. ``f`` integrates to
    one, so the marginal of ``p`` (and its normaliser) are unchanged.

    Args:
      p: the target program; must return a tuple of arguments for ``f``.
      f: the auxiliary (reverse) kernel.

    Returns:
      A program that returns ``p``'s outputs.
    """
    evaluate.check_callable("extend", p=p, f=f)

    def extended(*args, **kwargs):
        out = p(*args, **kwargs)
        transforms.auxiliary(transforms.suffix(f))(*_as_args(out, "extend", "p"))
        return out

    return extended


def newest(q: Callable) -> Callable:
    """Keeps only the newest generation of each site of ``q``.

    The older generations are marginalised out: ``q``'s weights already
    account for them, so the particles stay properly weighted for the newest
    values. Sequential Monte Carlo written as ``compose(propose(p_t, k_t),
    resample(q))`` uses it to keep one generation per step (:func:`scan`
    does it for every carried program).

    Args:
      q: a program.

    Returns:
      A program with the same outputs and metrics and a one-generation
      trace.
    """
    evaluate.check_callable("newest", q=q)

    def marginalised(*args, **kwargs):
        result = evaluate.evaluate(q, where="newest")(*args, **kwargs)
        return evaluate.empirical(result.out, result.trace.newest(), result.metrics)(
            *args, **kwargs
        )

    return marginalised
