"""PRNG keys: taken from a program's first argument or from a seed handler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers
from numpyro.primitives import _PYRO_STACK

__all__ = [
    "can_extract_key",
    "fold_in_key",
    "key_from_handlers",
    "require_key",
    "split_key",
]

HOW_TO_PASS_A_KEY = (
    "pass one with traced_evaluate(program, seed=jax.random.key(0)), run the "
    "program under numpyro.handlers.seed, or give a key as the program's first "
    "argument"
)


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def can_extract_key(args) -> bool:
    """Whether ``args[0]`` is a PRNG key (typed, or raw uint32 ``(..., 2)``)."""
    if not args:
        return False
    x = args[0]
    if not isinstance(x, jax.Array):
        return False
    if _is_typed_key(x):
        return True
    return x.dtype == jnp.uint32 and x.ndim >= 1 and x.shape[-1] == 2


def _flat(key):
    if _is_typed_key(key):
        return jnp.reshape(key, (-1,))
    return jnp.reshape(key, (-1, 2))


def _unflat(keys, like):
    if _is_typed_key(like):
        return jnp.reshape(keys, like.shape)
    return jnp.reshape(keys, like.shape)


def split_key(key):
    """Splits a (possibly batched) key into two keys of the same shape."""
    pairs = jax.vmap(lambda k: jax.random.split(k, 2))(_flat(key))
    return _unflat(pairs[:, 0], key), _unflat(pairs[:, 1], key)


def fold_in_key(key, i):
    """``jax.random.fold_in`` on a (possibly batched) key."""
    folded = jax.vmap(lambda k: jax.random.fold_in(k, i))(_flat(key))
    return _unflat(folded, key)


def first_key(key):
    """One key from a (possibly batched) key array."""
    return _flat(key)[0]


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
