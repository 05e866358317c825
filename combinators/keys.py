"""Compatibility module: PRNG key handling lives in :mod:`combinators.core.keys`."""

from combinators.core.keys import (
    HOW_TO_PASS_A_KEY,
    can_extract_key,
    fold_in_key,
    key_from_handlers,
    require_key,
    split_key,
    split_key_n,
)

__all__ = [
    "HOW_TO_PASS_A_KEY",
    "can_extract_key",
    "fold_in_key",
    "key_from_handlers",
    "require_key",
    "split_key",
    "split_key_n",
]
