"""Resampling particles by their weights: ``resample``.

Every new particle carries ``log Z-hat`` of the incoming weights, so the
log Z estimate is unchanged, also when the number of particles changes.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from combinators import weights
from combinators.core import checked, evaluate
from combinators.core import keys as _keys
from combinators.core.metrics import Metrics
from combinators.core.trace import Plate, Site
from combinators.resampling import resample_indices

__all__ = ["resample"]


def _gather(x, indices, lead: int, event_dim: int, squeeze: bool):
    """Gathers particles of ``x``; ``lead`` axes precede the particle axis."""
    index = jnp.reshape(indices, (1,) * lead + indices.shape + (1,) * event_dim)
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(x)
        index = jnp.reshape(index, index.shape + (1,) * (data.ndim - index.ndim))
        out = jax.random.wrap_key_data(
            jnp.take_along_axis(data, index, axis=lead),
            impl=jax.random.key_impl(x),
        )
    else:
        out = jnp.take_along_axis(x, index, axis=lead)
    return jnp.squeeze(out, axis=lead) if squeeze else out


def _resample_site(site: Site, indices, n: int, layout_ndim: int, squeeze: bool):
    value, log_prob = site.value, site.log_prob
    batch_ndim = jnp.ndim(log_prob)
    if batch_ndim < layout_ndim:
        return site  # outside the particle plate: shared by all particles
    axis = batch_ndim - layout_ndim
    if jnp.shape(log_prob)[axis] != n:
        return site
    columns = indices.shape[1:]
    batch = list(jnp.shape(log_prob))
    for offset, size in enumerate(columns, start=axis + 1):
        batch[offset] = max(batch[offset], size)
    event_shape = tuple(jnp.shape(value)[jnp.ndim(value) - site.event_dim :])
    value_batch_ndim = jnp.ndim(value) - site.event_dim
    if value_batch_ndim >= batch_ndim - axis:
        # The value varies over particles: move it with its particle.
        value = jnp.broadcast_to(value, tuple(batch) + event_shape)
        value = _gather(value, indices, axis, site.event_dim, squeeze)
    # else: one value shared by all particles (e.g. an observation); only its
    # per-particle log density moves, so loop carries keep their shapes.
    log_prob = jnp.broadcast_to(log_prob, tuple(batch))
    log_prob = _gather(log_prob, indices, axis, 0, squeeze)
    particle_dim = -layout_ndim
    plates = []
    for frame in site.plates:
        if frame.dim == particle_dim:
            if squeeze:
                continue
            frame = Plate(frame.name, int(indices.shape[0]), frame.dim)
        plates.append(frame)
    return site.replace(value=value, log_prob=log_prob, plates=tuple(plates))


def _resample_output(out, trace_values: dict, indices, log_weight_shape, squeeze):
    n_dims = len(log_weight_shape)

    def gather_leaf(x):
        for original, resampled in trace_values.get(id(x), ()):
            if original is x:
                return resampled
        if isinstance(x, jax.Array) and tuple(x.shape[:n_dims]) == tuple(
            log_weight_shape
        ):
            return _gather(x, indices, 0, x.ndim - n_dims, squeeze)
        return x

    return jax.tree_util.tree_map(gather_leaf, out)


def _check_num_samples(num_samples):
    """``None``, ``()`` or a positive integer (NumPy integers included)."""
    if num_samples is None or (isinstance(num_samples, tuple) and not num_samples):
        return num_samples
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise ValueError(
            f"resample: num_samples must be a positive int, None or (), got "
            f"{num_samples!r} ({type(num_samples).__name__})."
        )
    if num_samples < 1:
        raise ValueError(
            f"resample: num_samples must be a positive int, None or (), got "
            f"{num_samples!r}."
        )
    return int(num_samples)


def _check_threshold(ess_threshold, num_samples):
    if ess_threshold is None:
        return None
    if (
        isinstance(ess_threshold, bool)
        or not isinstance(ess_threshold, numbers.Real)
        or not 0.0 < float(ess_threshold) <= 1.0
    ):
        raise ValueError(
            f"resample: ess_threshold is a fraction of the number of particles "
            f"in (0, 1], got {ess_threshold!r}."
        )
    if num_samples is not None:
        raise ValueError(
            f"resample: adaptive resampling (ess_threshold={ess_threshold}) keeps "
            f"the particle count, so num_samples must be None, got "
            f"{num_samples!r}."
        )
    return float(ess_threshold)


def _split_static(tree):
    """Array leaves of ``tree``, and a function putting them back.

    The arrays may pass through ``lax.cond``; the function puts them back
    among the static leaves.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = [isinstance(x, (jax.Array, jnp.ndarray)) for x in leaves]
    arrays = [x for x, a in zip(leaves, is_array, strict=False) if a]

    def rebuild(new_arrays):
        it = iter(new_arrays)
        return jax.tree_util.tree_unflatten(
            treedef,
            [next(it) if a else x for x, a in zip(leaves, is_array, strict=True)],
        )

    return arrays, rebuild


def resample(
    q: Callable,
    num_samples=None,
    *,
    method: str = "systematic",
    ess_threshold: float | None = None,
) -> Callable:
    """Resamples the particles of ``q`` in proportion to their weights.

    Every returned particle carries the log weight ``log Z-hat`` of the
    incoming weights (``logsumexp(w) - log N``), so the log Z estimate is
    unchanged, also when ``num_samples`` differs from N. Weights with extra
    axes (e.g. a data batch) are resampled column by column.

    With ``ess_threshold`` the resampling is adaptive (Liu & Chen 1995,
    "Blind deconvolution via sequential imputations", JASA; Del Moral,
    Doucet & Jasra 2012, "On adaptive resampling strategies for sequential
    Monte Carlo methods", Bernoulli): a column is resampled only when its
    effective sample size is below ``ess_threshold * N``; otherwise its
    particles and weights are carried forward unchanged, which keeps the
    log Z estimate exact. The decision is made under ``jit`` with
    ``lax.cond`` (no resampling work when no column needs it) and reported
    in ``metrics["resampled"]``.

    Args:
      q: a weighted program whose particle axis is declared by a plate.
      num_samples: the number M of particles after resampling (default N);
        ``()`` draws one particle and drops the particle axis.
      method: ``"systematic"`` (default), ``"stratified"``, ``"multinomial"``
        or ``"residual"``.
      ess_threshold: resample only when ESS < ``ess_threshold * N``
        (a fraction in (0, 1]); ``None`` always resamples.

    Returns:
      The resampled program. For an unweighted or single-particle ``q`` it
      is a no-op.

    Example:
      >>> smc_step = propose(p2, compose(kernel, resample(propose(p1, q1))))
      >>> adaptive = resample(q, ess_threshold=0.5)
    """
    evaluate.check_callable("resample", q=q)
    num_samples = _check_num_samples(num_samples)
    ess_threshold = _check_threshold(ess_threshold, num_samples)

    def resampled(*args, **kwargs):
        key_r, args = _keys.own_key(args)
        q_eval = evaluate.evaluate(q, where="resample")(*args, **kwargs)
        trace = q_eval.trace
        weighted = q_eval.metrics is not None or any(
            s.observed for _, _, s in trace.generations()
        )
        metrics = q_eval.metrics or evaluate.default_metrics(trace)
        log_weight = metrics.log_weight
        if not weighted or jnp.ndim(log_weight) == 0:
            return evaluate.empirical(q_eval.out, trace, q_eval.metrics)(
                *args, **kwargs
            )
        if key_r is None:
            raise ValueError(
                f"resample: no PRNG key was given; {_keys.HOW_TO_PASS_A_KEY}."
            )
        checked.check_log_weight("resample", log_weight)
        n = log_weight.shape[0]
        squeeze = num_samples == ()
        m = n if num_samples is None else (1 if squeeze else num_samples)
        log_z_columns = logsumexp(log_weight, axis=0) - jnp.log(n)
        indices = resample_indices(
            key_r, log_weight, m, method, valid=jnp.isfinite(log_z_columns)
        )
        ndim = jnp.ndim(log_weight)

        def move(chosen):
            values: dict[int, list] = {}

            def move_site(name, generation, site):
                new = _resample_site(site, chosen, n, ndim, squeeze)
                values.setdefault(id(site.value), []).append((site.value, new.value))
                return new

            new_trace = trace.map_sites(move_site)
            out = _resample_output(
                q_eval.out, values, chosen, log_weight.shape, squeeze
            )
            return new_trace, out

        if ess_threshold is None:
            new_trace, out = move(indices)
            new_log_weight = (
                log_z_columns
                if squeeze
                else jnp.broadcast_to(log_z_columns, (m,) + log_weight.shape[1:])
            )
            resampled_flag = jnp.asarray(True)
        else:
            need = weights.column_effective_sample_size(log_weight) < ess_threshold * n
            identity = jnp.reshape(jnp.arange(n), (n,) + (1,) * (ndim - 1)) * jnp.ones(
                indices.shape, indices.dtype
            )
            chosen = jnp.where(need, indices, identity)
            out_arrays, rebuild = _split_static(q_eval.out)

            def resample_branch(operands):
                trace_, _ = operands
                new_trace, out = move(chosen)
                return new_trace, _split_static(out)[0]

            new_trace, new_out_arrays = jax.lax.cond(
                jnp.any(need),
                resample_branch,
                lambda operands: operands,
                (trace, out_arrays),
            )
            out = rebuild(new_out_arrays)
            new_log_weight = jnp.where(need, log_z_columns, log_weight)
            resampled_flag = jnp.any(need)
        new_metrics = Metrics(
            log_weight=new_log_weight,
            ess=weights.mean_effective_sample_size(new_log_weight),
            log_Z=jnp.sum(log_z_columns),
            loss=metrics.loss,
            log_density=metrics.log_density,
            extras=metrics.extras,
            resampled=resampled_flag,
        )
        return evaluate.empirical(out, new_trace, new_metrics)(*args, **kwargs)

    return resampled
