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
    "POOL_SIZE",
    "can_extract_key",
    "check_seed",
    "draw_key",
    "fold_in_key",
    "key_from_handlers",
    "key_stream",
    "lazy_seed",
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

#: Keys handed out per derivation by :class:`key_stream`.
POOL_SIZE = 8


def _wants_key(handler: handlers.seed, msg) -> bool:
    """Whether a message should get a key from ``handler`` (numpyro's rule)."""
    if msg["type"] in handler.hide_types or msg["type"] not in _RANDOM_TYPES:
        return False
    return msg["kwargs"]["rng_key"] is None and msg["value"] is None


def draw_key(handler: handlers.seed):
    """A fresh key from a seed handler (``None`` if it has no key).

    A :class:`key_stream` or :class:`lazy_seed` hands out its next key; a
    plain ``numpyro.handlers.seed`` splits its key as numpyro does.
    """
    if isinstance(handler, _KeyHandler):
        return handler.draw()
    if handler.rng_key is None:
        return None
    handler.rng_key, key = jax.random.split(handler.rng_key)
    return key


class _KeyHandler(handlers.seed):
    """A seed handler whose statements take their keys from :meth:`draw`."""

    def __init__(self, fn, rng_seed=None):
        super().__init__(fn, rng_seed=rng_seed)
        # Built afresh for every evaluation, so it may keep state (numpyro's
        # seed otherwise runs a stateless clone of itself).
        self.stateful = True

    def draw(self):
        """The next key, or ``None`` if there is none."""
        raise NotImplementedError

    def process_message(self, msg) -> None:
        """Gives a statement that needs a key the next one."""
        if not _wants_key(self, msg):
            return
        key = self.draw()
        if key is not None:
            msg["kwargs"]["rng_key"] = key


class key_stream(_KeyHandler):  # noqa: N801 (a handler, like numpyro's seed)
    """A seed handler that derives its keys :data:`POOL_SIZE` at a time.

    numpyro's ``seed`` splits its key once per sample statement, a chain of
    dependent threefry evaluations (each a few XLA kernels inside compiled
    loops). Here one split gives the next ``POOL_SIZE`` keys and a key to
    continue from, and the statements take them in order: a typical SMC
    step (a resampling key and a proposal's site keys) derives all its keys
    in one evaluation, as a hand-written step does with one
    ``jax.random.split``. The keys are as independent as numpyro's; they
    are different keys, so a program seeded here draws different values
    than under ``numpyro.handlers.seed`` with the same key.

    Args:
      fn: the program.
      rng_seed: a PRNG key (typed or raw) or an int.
    """

    def __init__(self, fn, rng_seed):
        super().__init__(fn, rng_seed)
        self._pool: list = []

    def draw(self):
        """The next key; derives ``POOL_SIZE`` more when the pool is empty."""
        if self.rng_key is None:
            return None
        if not self._pool:
            keys = jax.random.split(self.rng_key, POOL_SIZE + 1)
            self.rng_key = keys[0]
            self._pool = [keys[i] for i in range(POOL_SIZE, 0, -1)]
        return self._pool.pop()


class lazy_seed(_KeyHandler):  # noqa: N801 (a handler, like numpyro's seed)
    """A seed handler that takes its keys from an enclosing one, when needed.

    Every combinator evaluates its programs in their own handler scope,
    which blocks the enclosing seed handler; this one stands in for it,
    drawing each key from the parent only when a statement asks for one. A
    deterministic evaluation (replaying a traced program) draws none, and a
    sampling one costs no key derivation beyond the parent's (under a
    :class:`key_stream`, usually none at all).

    Args:
      fn: the program.
      parent: the seed handler the keys come from.
    """

    def __init__(self, fn, parent: handlers.seed):
        self._parent = parent
        super().__init__(fn)

    def draw(self):
        """A fresh key from the parent (``None`` if it has none)."""
        return draw_key(self._parent)


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
