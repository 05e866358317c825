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

Precision at any population size: each particle's interval of the M slots
has length ``M w_i`` to float precision, however large N and M are. The
ends of the intervals are cumulative sums computed in double-float (about
44 bits) and held as an integer slot plus a fraction; the positions too
(``j + u`` for systematic and stratified resampling, a uniform integer slot
plus a uniform fraction for multinomial draws). So equal weights give every
particle exactly one offspring under systematic, stratified and residual
resampling, and systematic offspring counts are ``floor(M w_i)`` or
``ceil(M w_i)``, also at N = 10**6 in float32 (a float32 cumulative sum
scaled to [0, 1] has spacing 0.06 of a slot there). Systematic and
stratified resampling take O(N + M) time; multinomial draws come in random,
not sorted, order.

References:
  Douc, Cappe & Moulines (2005), "Comparison of resampling schemes for
  particle filtering", https://arxiv.org/abs/cs/0507025.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "CONDITIONAL_SCHEMES",
    "SCHEMES",
    "conditional_indices",
    "conditional_multinomial",
    "conditional_stratified",
    "conditional_systematic",
    "multinomial",
    "resample_indices",
    "residual",
    "stratified",
    "systematic",
    "valid_weights",
]


# ---------------------------------------------------------------------------
# Exact positions. A position in [0, M) is held as an integer slot and a
# fraction in [0, 1), and so are the ends of the particles' intervals: the
# cumulative sums of the scaled weights M w_i, computed in double-float
# (pairs of floats, about 44 bits) and corrected to end exactly at M. A float
# cumulative sum scaled to [0, 1] cannot do this: near 1 its spacing is
# 2**-24 (float32), i.e. 0.06 of a slot at M = 10**6, so that equal weights
# gave 5% of the particles 0 or 2 offspring there.
# ---------------------------------------------------------------------------


def _two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth).

    Additions only, so fused multiply-adds cannot change it.
    """
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


def _df_add(x, y):
    """The sum of two double-float numbers ``(hi, lo)``, to about 2**-44."""
    s, e = _two_sum(x[0], y[0])
    e = e + (x[1] + y[1])
    hi = s + e
    return hi, e - (hi - s)


_BLOCK = 128


def _scan(combine, elems, identity):
    """Inclusive prefix ``combine`` of a tuple of 1-D arrays, along axis 0.

    A sequential loop within blocks of 128 elements (vectorised across the
    blocks), then the same across the block totals, recursively: O(N) work
    in O(log N / log 128) small loops. A loop trip costs less than the
    kernels a blocking level adds: square blocks (32 + 32 trips at N = 1000,
    10 + 10 at N = 100) made the N = 100 filter step 20% slower on CPU.
    ``lax.associative_scan`` computes the same but XLA fuses its ~2 log2 N
    levels into large kernels that take seconds to compile and, on CPU, run
    slower.

    Args:
      combine: ``(carry, x) -> carry``, on tuples like ``elems``; associative.
      elems: the arrays, all of the same length.
      identity: a scalar per array: ``combine(identity, x) == x``.
    """
    size = elems[0].shape[0]

    def step(carry, x):
        carry = combine(carry, x)
        return carry, carry

    if size <= _BLOCK:
        init = tuple(
            jnp.asarray(i, e.dtype) for e, i in zip(elems, identity, strict=True)
        )
        return lax.scan(step, init, elems)[1]
    rows = -(-size // _BLOCK)
    pad = rows * _BLOCK - size  # padding follows every element: never summed in
    blocks = tuple(
        jnp.pad(e, (0, pad)).reshape(rows, _BLOCK).T for e in elems
    )  # (position in block, block)
    init = tuple(
        jnp.full(rows, i, e.dtype) for e, i in zip(elems, identity, strict=True)
    )
    _, within = lax.scan(step, init, blocks)
    totals = _scan(combine, tuple(w[-1] for w in within), identity)
    before = tuple(
        jnp.concatenate([jnp.full(1, i, t.dtype), t[:-1]])[None, :]
        for t, i in zip(totals, identity, strict=True)
    )
    return tuple(o.T.reshape(-1)[:size] for o in combine(before, within))


def _cummax(x):
    lowest = jnp.iinfo(x.dtype).min
    return _scan(lambda a, b: (jnp.maximum(a[0], b[0]),), (x,), (lowest,))[0]


def _df_sum(values):
    """``sum(values)`` as a double-float ``(hi, lo)``."""
    zero = jnp.zeros((), values.dtype)
    return lax.reduce((values, jnp.zeros_like(values)), (zero, zero), _df_add, (0,))


def _unnormalised(log_weights):
    """``exp(log w - max log w)`` in at least float32: the largest is 1."""
    log_weights = jnp.asarray(log_weights)
    dtype = jnp.promote_types(log_weights.dtype, jnp.float32)
    log_weights = log_weights.astype(dtype)
    return jnp.exp(log_weights - jnp.max(log_weights))


def _scaled(values, total):
    """``total * values / sum(values)``, each to float precision."""
    sum_hi, _ = _df_sum(values)
    scale = jnp.where(sum_hi > 0, jnp.asarray(total, values.dtype) / sum_hi, 0)
    return values * scale


def _cells(x, total):
    """The cumulative sums of ``x >= 0`` as ``n + f``, ending at ``total``.

    ``n`` is an int32 slot, ``f`` a fraction in [0, 1), and the last sum is
    exactly the integer ``total``.

    ``x`` should sum to ``total`` to float precision (see :func:`_scaled`);
    the remaining defect is spread over the sums in proportion, so each
    ``x_i`` is used to float precision and no error accumulates.
    """
    total = jnp.asarray(total, jnp.int32)
    high = total & ~0xFF  # at most 23 significant bits: exact in float32
    total_hi, total_lo = high.astype(x.dtype), (total - high).astype(x.dtype)
    s_hi, s_lo = _scan(_df_add, (x, jnp.zeros_like(x)), (0, 0))
    end_hi, end_lo = s_hi[-1], s_lo[-1]
    defect = ((total_hi - end_hi) + total_lo) - end_lo
    share = jnp.where(end_hi > 0, s_hi / jnp.where(end_hi > 0, end_hi, 1), 0)
    s_hi, s_lo = _df_add((s_hi, s_lo), (defect * share, jnp.zeros_like(x)))
    whole = jnp.floor(s_hi)
    frac = (s_hi - whole) + s_lo
    carry = jnp.floor(frac)
    frac = frac - carry
    whole = jnp.clip(whole, -1, 2**31 - 256).astype(jnp.int32)
    n = whole + carry.astype(jnp.int32)
    over = frac >= 1  # a fraction just below 1 that rounded up
    return n + over.astype(jnp.int32), jnp.where(over, 0, frac)


def _ancestors(ends, positive, num_slots: int):
    """Particle ``i`` fills slots ``ends[i-1] .. ends[i] - 1`` (O(N + M)).

    ``ends`` are the particles' slot ends (clipped to ``num_slots``). Each
    particle of positive weight marks its first slot, the last mark of a
    slot wins (a particle with no slot is overridden by the next one that
    starts there), and each slot takes the latest mark at or before it. A
    particle of zero weight marks nothing: a slot it would get by rounding,
    and any slot past the last end, goes to the particle of positive weight
    before it, so a zero-weight particle is never an ancestor.
    """
    starts = jnp.concatenate([jnp.zeros(1, ends.dtype), ends[:-1]])
    owner = jnp.arange(ends.shape[0], dtype=jnp.int32)
    target = jnp.where(positive, starts, num_slots)
    first = jnp.zeros(num_slots, jnp.int32).at[target].max(owner, mode="drop")
    return _cummax(first)


def _search(n, f, positive, cell, offset, num_cells: int):
    """The particle whose interval holds each position ``cell + offset``.

    With interval ends ``(n_i, f_i)`` nondecreasing up to rounding
    (``n_i`` in [0, num_cells]) that is ``#{i : (n_i, f_i) <= (cell_j, offset_j)}``: a
    table of slot starts gives the ends that lie in the position's slot,
    and a binary search runs among those only (a few steps unless many
    particles end in one slot). A particle of zero weight takes the end of
    the particle of positive weight before it, so that no position falls in
    its interval even by rounding; a position past the last end goes to the
    last particle of positive weight.
    """
    size = n.shape[0]
    index = jnp.arange(size, dtype=jnp.int32)
    previous = _cummax(jnp.where(positive, index, -1))
    n = jnp.where(previous >= 0, jnp.clip(n, 0, num_cells)[previous], 0)
    f = jnp.where(previous >= 0, f[previous], 0)
    first = jnp.full(num_cells + 2, size, jnp.int32).at[n].min(index, mode="drop")
    # start[t] = #{i : n_i < t}
    highest = jnp.iinfo(first.dtype).max
    start = _scan(lambda a, b: (jnp.minimum(a[0], b[0]),), (first[::-1],), (highest,))
    start = start[0][::-1]
    cell = jnp.clip(cell, 0, num_cells)
    bounds = (start[cell], start[cell + 1])

    def step(bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        not_above = f[jnp.minimum(mid, size - 1)] <= offset
        active = lo < hi
        return (
            jnp.where(active & not_above, mid + 1, lo),
            jnp.where(active & ~not_above, mid, hi),
        )

    found, _ = lax.while_loop(lambda b: jnp.any(b[0] < b[1]), step, bounds)
    return jnp.minimum(found, size - 1 - jnp.argmax(positive[::-1]))


def _uniform_positions(key, num_samples: int, num_cells):
    """Independent uniform positions on [0, num_cells), as ``(cell, offset)``.

    A uniform integer slot and a uniform offset in it, so that a position is
    resolved to float precision within its slot at any ``num_cells``.
    """
    key_cell, key_offset = jax.random.split(key)
    cell = jax.random.randint(key_cell, (num_samples,), 0, num_cells)
    return cell, jax.random.uniform(key_offset, (num_samples,))


def _systematic_from_uniform(u, log_weights, num_samples: int):
    x = _scaled(_unnormalised(log_weights), num_samples)
    n, f = _cells(x, num_samples)
    # Particle i takes the positions j + u (j = 0..M-1) below n_i + f_i.
    ends = jnp.clip(n + (f > u).astype(jnp.int32), 0, num_samples)
    return _ancestors(ends, x > 0, num_samples)


def systematic(key, log_weights, num_samples: int):
    """Systematic resampling: one uniform, M evenly spaced positions."""
    u = jax.random.uniform(key, ())
    return _systematic_from_uniform(u, log_weights, num_samples)


def stratified(key, log_weights, num_samples: int):
    """Stratified resampling: one uniform in each of M equal strata."""
    u = jax.random.uniform(key, (num_samples,))
    x = _scaled(_unnormalised(log_weights), num_samples)
    n, f = _cells(x, num_samples)
    # Position j + u_j is below n_i + f_i iff j < n_i, or j = n_i and u_j < f_i.
    ends = n + (f > u[jnp.clip(n, 0, num_samples - 1)]).astype(jnp.int32)
    return _ancestors(jnp.clip(ends, 0, num_samples), x > 0, num_samples)


def multinomial(key, log_weights, num_samples: int):
    """Multinomial resampling: M independent draws from the weights.

    The draws come in random (not sorted) order.
    """
    cell, offset = _uniform_positions(key, num_samples, num_samples)
    x = _scaled(_unnormalised(log_weights), num_samples)
    n, f = _cells(x, num_samples)
    return _search(n, f, x > 0, cell, offset, num_samples)


def residual(key, log_weights, num_samples: int):
    """Residual resampling: floor(M w_i) copies, the rest multinomially."""
    weights = _unnormalised(log_weights)
    scaled = _scaled(weights, num_samples)
    whole = jnp.floor(scaled)
    counts = whole.astype(jnp.int32)
    (fixed_ends,) = _scan(lambda a, b: (a[0] + b[0],), (counts,), (0,))
    num_fixed = fixed_ends[-1]
    fixed = _ancestors(jnp.minimum(fixed_ends, num_samples), counts > 0, num_samples)
    remainder = scaled - whole
    # All-zero residuals happen only when every slot is fixed, and then the
    # draws below are not used.
    remainder = jnp.where(
        jnp.all(remainder <= 0), (weights > 0).astype(remainder.dtype), remainder
    )
    # Independent draws for the slots after the fixed copies.
    num_drawn = jnp.maximum(num_samples - num_fixed, 0)
    cell, offset = _uniform_positions(key, num_samples, num_drawn)
    x = _scaled(remainder, num_drawn)
    n, f = _cells(x, num_drawn)
    drawn = _search(n, f, x > 0, cell, offset, num_samples)
    return jnp.where(jnp.arange(num_samples) < num_fixed, fixed, drawn)


#: The resampling schemes by name (``resample(q, method=name)``).
SCHEMES: dict[str, Callable] = {
    "systematic": systematic,
    "stratified": stratified,
    "multinomial": multinomial,
    "residual": residual,
}


# ---------------------------------------------------------------------------
# Conditional resampling: slot 0 is pinned to a given ancestor (conditional
# SMC, particle Gibbs). Each scheme is made exchangeable (a uniform random
# rotation of the slots, which keeps its offspring counts), so every slot's
# ancestor has marginal law w; the conditional scheme draws the other slots
# from that joint law given slot 0's ancestor k:
#   r(a | w) = w_k r(a_{1:N-1} | a_0 = k, w).
# ---------------------------------------------------------------------------


def conditional_multinomial(key, log_weights, ancestor):
    """Multinomial resampling given that slot 0 descends from ``ancestor``.

    Slots ``1..N-1`` are independent draws from the weights (they do not
    depend on slot 0); slot 0 is ``ancestor``.

    Args:
      key: a PRNG key.
      log_weights: unnormalised log weights, shape ``(N,)``.
      ancestor: the ancestor of slot 0 (an int, possibly traced).

    Returns:
      Indices of shape ``(N,)`` with ``indices[0] == ancestor``.

    References:
      Andrieu, Doucet & Holenstein (2010), "Particle Markov chain Monte
      Carlo methods", JRSS B 72(3), Section 4.4 (conditional SMC).
    """
    n = jnp.shape(log_weights)[0]
    return multinomial(key, log_weights, n).at[0].set(ancestor)


def conditional_systematic(key, log_weights, ancestor):
    """Systematic resampling given that slot 0 descends from ``ancestor``.

    The unconditional scheme is systematic resampling (positions ``j + U``,
    ``j = 0..N-1``, on the scaled weights' intervals) followed by a uniform
    random rotation ``s`` of the slots, so that each slot's ancestor has
    law ``w``. Given slot 0's ancestor ``k``, ``(s, U)`` are uniform on the
    pairs with ``s + U`` in particle ``k``'s interval ``[c_{k-1}, c_k)``:
    a uniform point ``v`` of that interval gives ``s = floor(v)``,
    ``U = v - s``. The other slots are the rotated systematic draw, so
    every particle ``i`` still has ``floor(N w_i)`` or ``ceil(N w_i)``
    offspring. O(N).

    Args:
      key: a PRNG key.
      log_weights: unnormalised log weights, shape ``(N,)``.
      ancestor: the ancestor of slot 0, of positive weight.

    Returns:
      Indices of shape ``(N,)`` with ``indices[0] == ancestor``.

    References:
      Chopin & Singh (2015), "On particle Gibbs sampling", Bernoulli 21(3),
      https://arxiv.org/abs/1304.1887, Section 3 (conditional systematic
      resampling).
    """
    return _conditional_rotation(key, log_weights, ancestor, lambda _, u, __: u)


def conditional_stratified(key, log_weights, ancestor):
    """Stratified resampling given that slot 0 descends from ``ancestor``.

    The unconditional scheme is stratified resampling (positions ``j +
    U_j``, ``j = 0..N-1``, independent uniforms, on the scaled weights'
    intervals) followed by a uniform random rotation ``s`` of the slots.
    Given slot 0's ancestor ``k``, ``(s, U_s)`` are uniform on the pairs
    with ``s + U_s`` in particle ``k``'s interval, as for
    :func:`conditional_systematic`, and the other strata keep independent
    uniforms. O(N).

    Args:
      key: a PRNG key.
      log_weights: unnormalised log weights, shape ``(N,)``.
      ancestor: the ancestor of slot 0, of positive weight.

    Returns:
      Indices of shape ``(N,)`` with ``indices[0] == ancestor``.

    References:
      Chopin & Singh (2015), "On particle Gibbs sampling", Bernoulli 21(3),
      https://arxiv.org/abs/1304.1887, Section 3 (conditional resampling by
      a random rotation of an ordered scheme).
    """
    key_pinned, key_rest = jax.random.split(key)
    n = jnp.shape(log_weights)[0]

    def uniforms(stratum, u_pinned, dtype):
        u = jax.random.uniform(key_rest, (n,), dtype)
        return u.at[stratum].set(u_pinned)

    return _conditional_rotation(key_pinned, log_weights, ancestor, uniforms)


def _conditional_rotation(key, log_weights, ancestor, uniforms):
    """An ordered scheme, rotated, given that slot 0 descends from ``ancestor``.

    Slot 0's stratum and offset are a uniform point of the ancestor's
    interval (:func:`_pinned_position`); ``uniforms(stratum, u_pinned,
    dtype)`` gives the offsets of all strata (a scalar for systematic
    resampling, one per stratum for stratified), and the slots are rotated
    so that slot 0 is the pinned stratum.
    """
    n = jnp.shape(log_weights)[0]
    x = _scaled(_unnormalised(log_weights), n)
    ends, fractions = _cells(x, n)
    stratum, u_pinned = _pinned_position(key, x, ends, fractions, ancestor)
    u = jnp.broadcast_to(uniforms(stratum, u_pinned, x.dtype), (n,))
    # As in stratified(): position j + u_j is below n_i + f_i iff j < n_i, or
    # j = n_i and u_j < f_i.
    below = fractions > u[jnp.clip(ends, 0, n - 1)]
    drawn_ends = jnp.clip(ends + below.astype(jnp.int32), 0, n)
    ordered = _ancestors(drawn_ends, x > 0, n)
    return jnp.roll(ordered, -stratum).at[0].set(ancestor)


def _pinned_position(key, x, ends, fractions, ancestor):
    """A uniform point of ``ancestor``'s scaled interval: ``(stratum, offset)``.

    The interval is ``[c_{k-1}, c_k)`` of the cumulative scaled weights
    (:func:`_cells` gives their integer and fractional parts); a uniform
    point ``v`` in it gives the stratum ``floor(v)`` and the offset
    ``v - floor(v)`` in ``[0, 1)``.
    """
    n = jnp.shape(x)[0]
    ancestor = jnp.asarray(ancestor, jnp.int32)
    has_start = ancestor > 0
    before = jnp.maximum(ancestor - 1, 0)
    start_slot = jnp.where(has_start, ends[before], 0)
    start_fraction = jnp.where(has_start, fractions[before], 0)
    offset = start_fraction + x[ancestor] * jax.random.uniform(key, (), x.dtype)
    whole = jnp.floor(offset)
    u = jnp.clip(offset - whole, 0, 1 - jnp.finfo(x.dtype).epsneg)
    stratum = (start_slot + whole.astype(jnp.int32)) % n
    return stratum, u


#: Conditional resampling schemes (slot 0 pinned), by name.
CONDITIONAL_SCHEMES: dict[str, Callable] = {
    "multinomial": conditional_multinomial,
    "stratified": conditional_stratified,
    "systematic": conditional_systematic,
}


def conditional_indices(key, log_weights, ancestor, method: str = "systematic"):
    """Ancestor indices with slot 0 pinned to ``ancestor`` (conditional SMC).

    Args:
      key: a PRNG key.
      log_weights: unnormalised log weights, shape ``(N,)``.
      ancestor: the ancestor of slot 0 (an int, possibly traced), of
        positive weight.
      method: one of :data:`CONDITIONAL_SCHEMES`.

    Returns:
      Integer indices of shape ``(N,)``, ``indices[0] == ancestor``.

    Raises:
      ValueError: for an unknown ``method``, a missing key or log weights
        that are not one particle axis.
    """
    if method not in CONDITIONAL_SCHEMES:
        raise ValueError(
            f"conditional resampling: unknown method {method!r}; choose one of "
            f"{sorted(CONDITIONAL_SCHEMES)}."
        )
    if key is None:
        raise ValueError(
            "conditional resampling: no PRNG key was given (key=None); pass "
            "one, e.g. jax.random.key(0)."
        )
    log_weights = jax.lax.stop_gradient(jnp.asarray(log_weights))
    if log_weights.ndim != 1:
        raise ValueError(
            f"conditional resampling ({method}): log weights must have one "
            f"particle axis, shape (N,); got shape {log_weights.shape}."
        )
    return CONDITIONAL_SCHEMES[method](key, log_weights, ancestor)


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
      ValueError: for an unknown ``method``, or a missing key (``None``).
    """
    if key is None:
        raise ValueError(
            "resample_indices: no PRNG key was given (key=None); pass one, e.g. "
            "jax.random.key(0). Coix's get_systematic_resampling_indices(..., "
            "None, n) draws from numpy's global generator instead; this library "
            "draws only from explicit keys, so results are reproducible."
        )
    # Ancestor indices are integers: no gradient flows through the search.
    log_weights = jax.lax.stop_gradient(jnp.asarray(log_weights))
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
