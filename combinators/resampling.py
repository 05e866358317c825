"""Resampling schemes as pure functions of a key and log weights.

Every scheme returns ancestor indices ``a_1..a_M`` whose offspring counts
``c_i = #{j : a_j = i}`` satisfy ``E[c_i] = M * w_i`` (unbiased resampling),
where ``w`` are the normalised weights. Weights with more axes than the
particle axis (axis 0) are resampled column by column, each column with its
own randomness.

Non-finite weights are never hidden: if a column has a NaN or +inf log
weight, or all its log weights are -inf, no resampling is possible; the
indices returned are the identity ``j mod N`` (particles are not copied
from index 0) and the caller reports log Z and ESS as NaN or -inf.

References:
  Douc, Cappe & Moulines (2005), "Comparison of resampling schemes for
  particle filtering", https://arxiv.org/abs/cs/0507025.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "SCHEMES",
    "multinomial",
    "resample_indices",
    "residual",
    "stratified",
    "systematic",
    "valid_weights",
]


def _normalised(log_weights):
    weights = jax.nn.softmax(log_weights)
    cdf = jnp.cumsum(weights)
    return weights, cdf / cdf[-1]


def _search(cdf, positions):
    # side="right": index i is chosen iff cdf[i-1] <= u < cdf[i], so a
    # particle of zero weight (cdf[i] == cdf[i-1]) can never be chosen. A
    # position that rounds up to 1.0 in float32 falls past the end; it goes
    # to the last particle of positive weight, never to a zero-weight one.
    n = cdf.shape[0]
    positive = jnp.diff(cdf, prepend=0.0) > 0
    last_positive = n - 1 - jnp.argmax(positive[::-1])
    return jnp.minimum(jnp.searchsorted(cdf, positions, side="right"), last_positive)


def _systematic_from_uniform(u, log_weights, num_samples: int):
    _, cdf = _normalised(log_weights)
    positions = (u + jnp.arange(num_samples)) / num_samples
    return _search(cdf, positions)


def systematic(key, log_weights, num_samples: int):
    """Systematic resampling: one uniform, M evenly spaced positions."""
    return _systematic_from_uniform(jax.random.uniform(key, ()), log_weights, num_samples)


def stratified(key, log_weights, num_samples: int):
    """Stratified resampling: one uniform in each of M equal strata."""
    _, cdf = _normalised(log_weights)
    u = jax.random.uniform(key, (num_samples,))
    positions = (u + jnp.arange(num_samples)) / num_samples
    return _search(cdf, positions)


def multinomial(key, log_weights, num_samples: int):
    """Multinomial resampling: M independent draws from the weights."""
    _, cdf = _normalised(log_weights)
    u = jax.random.uniform(key, (num_samples,))
    return _search(cdf, jnp.sort(u))


def residual(key, log_weights, num_samples: int):
    """Residual resampling: floor(M w_i) copies, the rest multinomially."""
    weights, _ = _normalised(log_weights)
    n = weights.shape[0]
    scaled = num_samples * weights
    counts = jnp.floor(scaled).astype(jnp.int32)
    num_fixed = jnp.sum(counts)
    fixed = jnp.repeat(jnp.arange(n), counts, total_repeat_length=num_samples)
    remainder = scaled - counts
    # All-zero residuals happen only when every slot is fixed, and then the
    # draws below are not used.
    remainder = jnp.where(
        jnp.all(remainder <= 0), jnp.ones_like(remainder), jnp.maximum(remainder, 0.0)
    )
    cdf = jnp.cumsum(remainder)
    # Independent, unsorted inverse-cdf draws (O(M log N)): the slots after
    # the fixed copies must be an i.i.d. sample, not the largest of M sorted
    # draws.
    drawn = _search(cdf / cdf[-1], jax.random.uniform(key, (num_samples,)))
    slot = jnp.arange(num_samples)
    return jnp.where(slot < num_fixed, fixed, drawn)


SCHEMES: dict[str, Callable] = {
    "systematic": systematic,
    "stratified": stratified,
    "multinomial": multinomial,
    "residual": residual,
}


def valid_weights(log_weights):
    """Per column: no NaN, no +inf, and at least one finite log weight."""
    log_weights = jnp.asarray(log_weights)
    no_nan = ~jnp.any(jnp.isnan(log_weights), axis=0)
    no_inf = ~jnp.any(log_weights == jnp.inf, axis=0)
    some = jnp.any(log_weights > -jnp.inf, axis=0)
    return no_nan & no_inf & some


def resample_indices(
    key, log_weights, num_samples: int, method: str = "systematic", *, valid=None
):
    """Ancestor indices for log weights of shape ``(N, *columns)``.

    Args:
      key: a PRNG key.
      log_weights: unnormalised log weights, particle axis first.
      num_samples: the number M of particles to draw.
      method: one of ``"systematic"``, ``"stratified"``, ``"multinomial"``,
        ``"residual"``.
      valid: optional per-column validity (shape ``columns``), e.g.
        ``isfinite(logsumexp(log_weights, 0))`` when the caller has it;
        computed by :func:`valid_weights` otherwise. Invalid columns keep
        their particles (identity indices).

    Returns:
      Integer indices of shape ``(M, *columns)`` into axis 0.

    Raises:
      ValueError: for an unknown ``method``.
    """
    if method not in SCHEMES:
        raise ValueError(
            f"resample: unknown method {method!r}; choose one of {sorted(SCHEMES)}."
        )
    scheme = SCHEMES[method]
    log_weights = jnp.asarray(log_weights)
    n = log_weights.shape[0]
    columns = log_weights.shape[1:]
    identity = jnp.arange(num_samples) % n
    if valid is None:
        valid = valid_weights(log_weights)
    if not columns:
        # One column: no vmap (same draws as the batched path below).
        if method == "systematic":
            indices = _systematic_from_uniform(
                jax.random.uniform(key, (1,))[0], log_weights, num_samples
            )
        else:
            indices = scheme(jax.random.split(key, 1)[0], log_weights, num_samples)
        return jnp.where(valid, indices, identity)
    flat = jnp.reshape(log_weights, (n, -1))
    num_columns = flat.shape[1]
    if method == "systematic":
        # One uniform per column, drawn together (as Coix does, so that the
        # same key gives the same ancestors).
        uniforms = jax.random.uniform(key, (num_columns,))
        indices = jax.vmap(
            lambda u, lw: _systematic_from_uniform(u, lw, num_samples), in_axes=(0, 1)
        )(uniforms, flat)
    else:
        column_keys = jax.random.split(key, num_columns)
        indices = jax.vmap(lambda k, lw: scheme(k, lw, num_samples), in_axes=(0, 1))(
            column_keys, flat
        )  # (C, M)
    valid = jnp.reshape(valid, (num_columns,))
    indices = jnp.where(valid[:, None], indices, identity[None, :])
    return jnp.reshape(jnp.transpose(indices), (num_samples, *columns))
