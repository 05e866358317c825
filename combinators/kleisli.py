"""Programs as kernels: left-to-right composition with ``>>`` and layers.

A program with arguments is a *kernel*: given its inputs ``x`` it defines a
distribution over its random choices and its outputs ``y``. Running one
kernel and feeding its outputs to the next is *Kleisli composition* for the
probability monad (Giry 1982, "A categorical approach to probability
theory"; Ścibior, Ghahramani & Gordon 2015, "Practical probabilistic
programming with monads", https://doi.org/10.1145/2804302.2804317): if
``k1(y | x)`` and ``k2(w | y)`` are kernels, their composite draws ``y`` from
``k1`` and then ``w`` from ``k2``. Keeping the trace, the composite's density
over both choices is ``k1(y | x) k2(w | y)``. Kleisli composition is
associative, which is what lets a chain of kernels be read left to right
without brackets.

In this library the composite is :func:`combinators.compose`, the
``compose`` combinator of Stites, Zimmermann, Wu, Sennesh & van de Meent
(2021), "Learning Proposals for Probabilistic Programs with Inference
Combinators", https://arxiv.org/abs/2103.00668. This module adds

* :class:`Kernel`, a callable wrapper with ``>>``:
  ``q1 >> q2`` runs ``q1`` and then ``q2`` on its outputs;
* :class:`ParamKernel`, a kernel family ``init(key) -> params``,
  ``bind(params) -> program`` (the shape of Optax's
  ``GradientTransformation``: a named pair of pure functions);
* :func:`stack` (``n`` copies with independent parameters) and
  :func:`repeat` (``n`` copies sharing one parameter set), which return a
  :class:`ParamKernel` again.

Names are names. ``>>`` composes with ``suffix=False``: every site name may
occur once in a chain, as in the paper's ``compose``, whose two traces are
joined. That is what a *target* built with ``>>`` needs, e.g.
``propose(prior >> decoder, encoder)``: with ``suffix=True`` the prior's
``z`` would become an older generation and the encoder's ``z`` would not
reach it (in Coix it would be renamed ``z_PREV_``). A kernel that re-samples
an earlier site (an MCMC move) is written ``compose(k, q)``, which keeps the
superseded value as an older generation. The copies made by :func:`stack`
and :func:`repeat` are different random variables, so their sites are
renamed explicitly with ``numpyro.handlers.scope``: copy ``i`` of a site
``h`` is called ``"{name}{i}/h"``. Plates keep their names, so the particle
plate is the same plate in every copy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from combinators.api import compose
from combinators.core.transforms import scope, scope_parts
from combinators.flax_utils import BindModule

__all__ = ["Kernel", "ParamKernel", "repeat", "stack"]


def _describe(program: Any) -> str:
    """A short name for a stage in a kernel's repr."""
    if isinstance(program, Kernel):
        return " >> ".join(_describe(stage) for stage in program.stages)
    scoped = scope_parts(program)
    if scoped is not None:
        prefix, divider, fn = scoped
        inner = _describe(fn)
        if isinstance(fn, Kernel) and len(fn.stages) > 1:
            inner = f"({inner})"
        return f"{prefix}{divider}{inner}"
    if isinstance(program, functools.partial):
        return f"partial({_describe(program.func)})"
    return getattr(program, "__name__", type(program).__name__)


class Kernel:
    """A program with ``>>``: ``q1 >> q2`` is ``compose(q2, q1, suffix=False)``.

    A kernel is a chain of one or more programs; calling it runs them left to
    right, each receiving the previous one's outputs (a tuple) as positional
    arguments. ``>>`` concatenates chains, so ``(a >> b) >> c`` and
    ``a >> (b >> c)`` are the same kernel (Kleisli composition is
    associative). A plain callable may stand on either side of ``>>`` as
    long as the other side is a :class:`Kernel`; two plain functions have
    no ``>>``, so wrap one of them first (``Kernel`` is also a decorator).

    Weighted programs (the outputs of ``propose``/``resample``) may be
    stages: the kernel is built with :func:`combinators.compose`, so when
    two stages are weighted their weights multiply (nested importance
    sampling).

    Args:
      *programs: callables or kernels, in the order they run.

    Raises:
      TypeError: if a program is not callable.
      ValueError: if no program is given.

    Example:
      >>> @Kernel
      ... def prior(x):
      ...     with numpyro.plate("particles", 4):
      ...         return numpyro.sample("z", dist.Normal(0.0, 1.0)), x
      >>> def decoder(z, x):
      ...     with numpyro.plate("particles", 4):
      ...         return (numpyro.sample("x", dist.Normal(z, 1.0), obs=x),)
      >>> def encoder(x):
      ...     with numpyro.plate("particles", 4):
      ...         return (numpyro.sample("z", dist.Normal(x / 2, 1.0)),)
      >>> target = prior >> decoder  # compose(decoder, prior, suffix=False)
      >>> program = coix.propose(target, encoder, loss_fn=coix.loss.elbo_loss)
      >>> key = jax.random.key(0)
      >>> _, trace, metrics = coix.traced_evaluate(program, seed=key)(0.5)
      >>> sorted(trace), metrics.log_weight.shape
      (['x', 'z'], (4,))

    References:
      Stites et al. (2021), https://arxiv.org/abs/2103.00668.
    """

    __slots__ = ("_program", "_stages")
    _program: Callable
    _stages: tuple[Callable, ...]

    def __init__(self, *programs: Callable):
        if not programs:
            raise ValueError("Kernel: give at least one program.")
        stages: list[Callable] = []
        for index, program in enumerate(programs):
            if isinstance(program, Kernel):
                stages.extend(program.stages)
            elif callable(program):
                stages.append(program)
            else:
                raise TypeError(
                    f"Kernel: program {index} must be a callable, got "
                    f"{type(program).__name__}: {program!r}."
                )
        composed = stages[0]
        for stage in stages[1:]:
            composed = compose(stage, composed, suffix=False)
        object.__setattr__(self, "_stages", tuple(stages))
        object.__setattr__(self, "_program", composed)

    def __setattr__(self, name, value):
        raise AttributeError("Kernel is immutable.")

    @property
    def stages(self) -> tuple[Callable, ...]:
        """The programs of the chain, in the order they run."""
        return self._stages

    def __call__(self, *args, **kwargs):
        """Runs the chain; keyword arguments go to the first program."""
        return self._program(*args, **kwargs)

    def __rshift__(self, other: Callable) -> Kernel:
        """``self >> other``: run ``self``, then ``other`` on its outputs."""
        _check_operand(self, other, side="right")
        return Kernel(self, other)

    def __rrshift__(self, other: Callable) -> Kernel:
        """``other >> self`` for a plain callable ``other``."""
        _check_operand(other, self, side="left")
        return Kernel(other, self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Kernel) and self._stages == other._stages

    def __hash__(self) -> int:
        return hash(self._stages)

    def __repr__(self) -> str:
        return f"Kernel({_describe(self)})"


def _check_operand(left: Any, right: Any, side: str) -> None:
    operand = right if side == "right" else left
    if not callable(operand):
        hint = (
            " A ParamKernel is a family of kernels: bind it first, family.bind(params)."
            if isinstance(operand, ParamKernel)
            else ""
        )
        raise TypeError(
            f"`>>` composes programs, but the {side} operand is not callable: "
            f"{type(left).__name__} >> {type(right).__name__} "
            f"({operand!r}).{hint}"
        )


class ParamKernel(NamedTuple):
    """A family of kernels indexed by parameters: ``bind(init(key))``.

    The convention for parameterised kernels used by :func:`stack` and
    :func:`repeat`, in the shape of Optax's ``GradientTransformation``: two
    pure functions, no state. Parameters are any pytree of arrays, so a
    family composes with ``jax.grad``, ``jax.jit`` and optax.

    Attributes:
      init: ``init(key) -> params`` draws initial parameters.
      bind: ``bind(params) -> program`` returns the kernel with those
        parameters (a :class:`Kernel` or any program).

    Example:
      >>> import functools
      >>> def layer(params, h):
      ...     with numpyro.plate("particles", 100):
      ...         return (numpyro.sample("h", dist.Normal(params["a"] * h, 1.0)),)
      >>> family = ParamKernel(
      ...     init=lambda key: {"a": jax.random.normal(key)},
      ...     bind=lambda params: Kernel(functools.partial(layer, params)),
      ... )
      >>> deep = stack(family, 3)          # three layers, three parameter sets
    """

    init: Callable[[jax.Array], Any]
    bind: Callable[[Any], Callable]

    @classmethod
    def from_module(cls, module, program: Callable, *example_args) -> ParamKernel:
        """A family from a Flax linen module and a program that calls it.

        Args:
          module: a Flax linen module.
          program: ``program(network, *args)``, where ``network`` is
            ``BindModule(module, params)`` (call ``network(x)``, or
            ``network.submodule(x)``).
          *example_args: inputs for ``module.init``.

        Returns:
          The family ``ParamKernel(init, bind)`` with ``init(key) =
          module.init(key, *example_args)`` and ``bind(params) =
          Kernel(partial(program, BindModule(module, params)))``.
        """

        def init(key):
            return module.init(key, *example_args)

        def bind(params):
            return Kernel(functools.partial(program, BindModule(module, params)))

        return cls(init, bind)


def _check_family(where: str, f: Any, n: Any, name: Any) -> None:
    if not isinstance(f, ParamKernel):
        raise TypeError(
            f"{where}: f must be a ParamKernel(init, bind), got "
            f"{type(f).__name__}: {f!r}; wrap a kernel factory as "
            f"ParamKernel(init=..., bind=...)."
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: n must be a positive int, got {n!r}.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: name must be a non-empty string, got {name!r}.")


def stack(f: ParamKernel, n: int, *, name: str = "layer") -> ParamKernel:
    """``n`` copies of a kernel family composed, each with its own parameters.

    ``stack(f, n).bind(params)`` is ``k_0 >> k_1 >> ... >> k_{n-1}`` with
    ``k_i = f.bind(params_i)``, where ``params_i`` is slice ``i`` of every
    leaf of ``params``. ``init(key)`` splits ``key`` into ``n`` keys and
    calls ``f.init`` on each (with ``jax.vmap``), so the copies are
    initialised independently and every leaf gains a leading axis of size
    ``n``. Site ``h`` of copy ``i`` is called ``f"{name}{i}/h"``.

    Args:
      f: the kernel family; its kernels must return arguments for
        themselves (``x -> x'`` of the same structure).
      n: the number of copies.
      name: the prefix of the copies' site names.

    Returns:
      A :class:`ParamKernel` whose ``bind`` returns a :class:`Kernel`.

    Raises:
      TypeError: if ``f`` is not a :class:`ParamKernel`.
      ValueError: if ``n`` is not a positive int, or (in ``bind``) a leaf of
        the parameters has no leading axis of size ``n``.

    Example:
      >>> import functools
      >>> def layer(params, h):
      ...     with numpyro.plate("particles", 4):
      ...         return (numpyro.sample("h", dist.Normal(params["a"] * h, 1.0)),)
      >>> family = ParamKernel(
      ...     init=lambda key: {"a": jax.random.normal(key)},
      ...     bind=lambda params: Kernel(functools.partial(layer, params)),
      ... )
      >>> deep = stack(family, 3)
      >>> params = deep.init(jax.random.key(0))
      >>> params["a"].shape  # one parameter set per copy
      (3,)
      >>> key = jax.random.key(1)
      >>> _, trace, _ = coix.traced_evaluate(deep.bind(params), seed=key)(jnp.ones(4))
      >>> list(trace)
      ['layer0/h', 'layer1/h', 'layer2/h']
    """
    _check_family("stack", f, n, name)

    def init(key):
        return jax.vmap(f.init)(jax.random.split(key, n))

    def bind(params):
        leaves, _ = jax.tree_util.tree_flatten_with_path(params)
        for path, leaf in leaves:
            shape = jnp.shape(leaf)
            if not shape or shape[0] != n:
                raise ValueError(
                    f"stack: parameter {jax.tree_util.keystr(path)} has shape "
                    f"{shape}; stack(f, {n}) needs a leading axis of size {n} "
                    f"(one slice per copy, as stack(f, {n}).init returns)."
                )
        copies = [
            scope(
                f.bind(jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], params)),
                f"{name}{i}",
            )
            for i in range(n)
        ]
        return Kernel(*copies)

    return ParamKernel(init, bind)


def repeat(f: ParamKernel, n: int, *, name: str = "layer") -> ParamKernel:
    """``n`` copies of a kernel family composed, all with the same parameters.

    The weight-tied counterpart of :func:`stack`:
    ``repeat(f, n).bind(params)`` is ``k >> k >> ... >> k`` (``n`` times)
    with ``k = f.bind(params)``, and ``init`` is ``f.init`` (one parameter
    set). The copies are still different random variables: site ``h`` of
    copy ``i`` is called ``f"{name}{i}/h"``.

    Args:
      f: the kernel family; its kernels must return arguments for
        themselves.
      n: the number of copies.
      name: the prefix of the copies' site names.

    Returns:
      A :class:`ParamKernel` whose ``bind`` returns a :class:`Kernel`.

    Raises:
      TypeError: if ``f`` is not a :class:`ParamKernel`.
      ValueError: if ``n`` is not a positive int.

    Example:
      >>> import functools
      >>> def layer(params, h):
      ...     with numpyro.plate("particles", 4):
      ...         return (numpyro.sample("h", dist.Normal(params["a"] * h, 1.0)),)
      >>> family = ParamKernel(
      ...     init=lambda key: {"a": jax.random.normal(key)},
      ...     bind=lambda params: Kernel(functools.partial(layer, params)),
      ... )
      >>> tied = repeat(family, 3)
      >>> params = tied.init(jax.random.key(0))
      >>> params["a"].shape  # one parameter set, shared by the copies
      ()
      >>> key = jax.random.key(1)
      >>> _, trace, _ = coix.traced_evaluate(tied.bind(params), seed=key)(jnp.ones(4))
      >>> list(trace)
      ['layer0/h', 'layer1/h', 'layer2/h']
    """
    _check_family("repeat", f, n, name)

    def bind(params):
        program = f.bind(params)
        return Kernel(*[scope(program, f"{name}{i}") for i in range(n)])

    return ParamKernel(f.init, bind)
