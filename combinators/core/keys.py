"""PRNG keys: taken from a program's first argument or from a seed handler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers
from numpyro.primitives import _PYRO_STACK

from combinators.types import is_typed_key

__all__ = [
    "HOW_TO_PASS_A_KEY",
    "can_extract_key",
    "check_seed",
    "fold_in_key",
    "key_from_handlers",
    "require_key",
    "own_key",
    "split_key",
    "split_key_n",
    "split_program_args",
]

#: The end of every "no PRNG key" error message, naming the three ways to give one.
HOW_TO_PASS_A_KEY = (
    "pass one with traced_evaluate(program, seed=jax.random.key(0)), run the "
    "program under numpyro.handlers.seed, or give a key as the program's first "
    "argument"
)


def can_extract_key(args) -> bool:
    """Whether ``args[0]`` is a PRNG key (typed, or raw uint32 ``(..., 2)``)."""
    if not args:
        return False
    x = args[0]
    if not isinstance(x, jax.Array):
        return False
    if is_typed_key(x):
        return True
    return x.dtype == jnp.uint32 and x.ndim >= 1 and x.shape[-1] == 2


def _flat(key):
    if is_typed_key(key):
        return jnp.reshape(key, (-1,))
    return jnp.reshape(key, (-1, 2))


def _unflat(keys, like):
    if is_typed_key(like):
        return jnp.reshape(keys, like.shape)
    return jnp.reshape(keys, like.shape)


def check_seed(where: str, seed) -> None:
    """Raises unless ``seed`` is one PRNG key (or an int seed, or ``None``).

    A typed key of shape ``()`` (``jax.random.key(0)``), a raw ``uint32``
    key of shape ``(2,)`` and a Python int are accepted.
    """
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        return
    if is_typed_key(seed):
        if jnp.shape(seed) == ():
            return
        problem = f"a batch of typed keys of shape {jnp.shape(seed)}"
    elif hasattr(seed, "dtype") and hasattr(seed, "shape"):
        if seed.dtype == jnp.uint32 and tuple(seed.shape) == (2,):
            return
        problem = f"an array of dtype {seed.dtype} and shape {tuple(seed.shape)}"
    else:
        problem = f"{type(seed).__name__} {seed!r}"
    raise TypeError(
        f"{where}: seed must be one PRNG key, e.g. jax.random.key(0) (or a raw "
        f"uint32 key of shape (2,)), got {problem}; for several keys, vmap "
        f"over them."
    )


def split_program_args(args) -> tuple[tuple, tuple]:
    """Arguments for a target and a proposal: a key argument is split."""
    if can_extract_key(args):
        key_p, key_q = split_key(args[0])
        return (key_p, *args[1:]), (key_q, *args[1:])
    return args, args


def own_key(args) -> tuple:
    """A combinator's own key, and the arguments to pass on.

    If ``args[0]`` is a key it is split: one half is returned, the other
    replaces it in the arguments. Otherwise the key comes from an enclosing
    seed handler (``None`` if there is none) and the arguments are unchanged.
    """
    if can_extract_key(args):
        own, rest = split_key(args[0])
        return first_key(own), (rest, *args[1:])
    return key_from_handlers(), args


def split_key(key):
    """Splits a (possibly batched) key into two keys of the same shape."""
    pairs = jax.vmap(lambda k: jax.random.split(k, 2))(_flat(key))
    return _unflat(pairs[:, 0], key), _unflat(pairs[:, 1], key)


def split_key_n(key, num: int):
    """``num`` keys from a (possibly batched) key, stacked on a new axis 0."""
    keys = jax.vmap(lambda k: jax.random.split(k, max(num, 1)))(_flat(key))
    keys = jax.vmap(lambda k: _unflat(k, key))(jnp.swapaxes(keys, 0, 1))
    return keys[:num]


def fold_in_key(key, i):
    """``jax.random.fold_in`` on a (possibly batched) key."""
    folded = jax.vmap(lambda k: jax.random.fold_in(k, i))(_flat(key))
    return _unflat(folded, key)


def first_key(key):
    """One key from a (possibly batched) key array."""
    return _flat(key)[0]


def enclosing_seed():
    """The seed handler that a sample statement here would reach, or ``None``."""
    for handler in reversed(_PYRO_STACK):
        if isinstance(handler, handlers.seed):
            return handler
        if isinstance(handler, handlers.block):
            return None
    return None


_RANDOM_TYPES = ("sample", "prng_key", "plate", "control_flow")


class lazy_seed(handlers.seed):  # noqa: N801 (a handler, like numpyro's seed)
    """A seed handler whose key is split off an enclosing one when first needed.

    A nested evaluation (every combinator evaluates its programs in their own
    handler scope) needs randomness only if it samples; replaying a traced
    program does not. Drawing the key lazily spares a key split (an XLA
    kernel inside compiled loops) per deterministic evaluation, and the
    first draw splits the parent's key three ways (parent, own, site).

    Args:
      fn: the program.
      parent: the seed handler the keys come from.
    """

    def __init__(self, fn, parent: handlers.seed):
        self._parent = parent
        super().__init__(fn)
        # Built afresh for every evaluation, so it may keep state (numpyro's
        # seed otherwise runs a stateless clone of itself).
        self.stateful = True

    def _draw(self):
        """A fresh key for one site; takes this handler's key on first use."""
        if self.rng_key is None:
            parent = self._parent
            if isinstance(parent, lazy_seed) and parent.rng_key is None:
                parent.rng_key = parent._draw()
            if parent.rng_key is None:
                return None
            parent.rng_key, self.rng_key, key = jax.random.split(parent.rng_key, 3)
            return key
        self.rng_key, key = jax.random.split(self.rng_key)
        return key

    def process_message(self, msg) -> None:
        if msg["type"] in self.hide_types or msg["type"] not in _RANDOM_TYPES:
            return
        if msg["kwargs"]["rng_key"] is not None or msg["value"] is not None:
            return
        key = self._draw()
        if key is not None:
            msg["kwargs"]["rng_key"] = key


def has_seed_handler() -> bool:
    """Whether a ``numpyro.handlers.seed`` is active around the caller."""
    return any(isinstance(h, handlers.seed) for h in _PYRO_STACK)


def key_from_handlers():
    """A fresh key from an enclosing seed handler, or ``None`` if there is none."""
    if not has_seed_handler():
        return None
    return numpyro.prng_key()


def require_key(where: str):
    """A fresh key from an enclosing seed handler; raises if there is none."""
    key = key_from_handlers()
    if key is None:
        raise ValueError(f"{where}: no PRNG key was given; {HOW_TO_PASS_A_KEY}.")
    return key
