"""Utilities kept under Coix's ``coix.util`` names."""

from __future__ import annotations

import jax.numpy as jnp

from combinators.core.keys import can_extract_key
from combinators.flax_utils import BindModule
from combinators.resampling import resample_indices
from combinators.train import TrainResult, group_optimizers, make_step, train

__all__ = [
    "BindModule",
    "TrainResult",
    "can_extract_key",
    "get_systematic_resampling_indices",
    "group_optimizers",
    "make_step",
    "train",
]


def get_systematic_resampling_indices(log_weights, rng_key, num_samples):
    """Systematic resampling indices of shape ``(num_samples, *columns)``."""
    return resample_indices(
        rng_key, jnp.asarray(log_weights), num_samples, "systematic"
    )
