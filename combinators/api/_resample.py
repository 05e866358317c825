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
from combinators.core.metrics import ANCESTORS, Metrics
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


def _leads_with_particles(x, log_weight_shape) -> bool:
    """Whether ``x``'s leading dims are the weights' (particle axis first).

    A weight column of size 1 stands for a dim along which the weight is
    constant (e.g. a data plate of a local latent): ``x`` may have any size
    there, and its entries move with their particle.
    """
    lead = tuple(jnp.shape(x)[: len(log_weight_shape)])
    if len(lead) < len(log_weight_shape) or not lead or lead[0] != log_weight_shape[0]:
        return False
    return all(w in (1, d) for d, w in zip(lead[1:], log_weight_shape[1:], strict=True))


def _resample_output(out, trace_values: dict, indices, log_weight_shape, squeeze):
    n_dims = len(log_weight_shape)

    def gather_leaf(x):
        for original, resampled in trace_values.get(id(x), ()):
            if original is x:
                return resampled
        if isinstance(x, jax.Array) and _leads_with_particles(x, log_weight_shape):
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


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"resample: {name} must be True or False, got {value!r} "
            f"({type(value).__name__})."
        )
    return value


def _score_surrogate(log_weight, ancestors):
    """Zero-valued log weights whose gradient is the resampling score.

    ``log W_a - stop_gradient(log W_a)`` for each new particle's ancestor
    ``a``, with ``W`` the normalised incoming weights: exactly ``0.0`` in
    the forward pass, and the gradient of ``log P(a)``, the log probability
    of the draw, in the backward pass (Ścibior & Wood 2021). Ancestors with
    a non-finite weight (a column where resampling was impossible) get 0.

    Args:
      log_weight: incoming log weights, shape ``(N,) + columns``.
      ancestors: ancestor indices, shape ``(M,) + columns``.

    Returns:
      An array shaped like ``ancestors``.
    """
    log_normalised = log_weight - logsumexp(log_weight, axis=0, keepdims=True)
    chosen = jnp.take_along_axis(log_normalised, ancestors, axis=0)
    finite = jnp.isfinite(chosen)
    chosen = jnp.where(finite, chosen, 0.0)
    return jnp.where(finite, chosen - jax.lax.stop_gradient(chosen), 0.0)


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
    record_ancestors: bool = False,
    score_gradient: bool = False,
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

    Gradients. By default (``score_gradient=False``) the ancestor draw is
    held fixed: gradients flow through the particles' values and through
    ``log Z-hat`` of the incoming weights, but not through which particles
    were chosen, so the gradient of the final ``log Z-hat`` (e.g. VSMC's
    objective) is biased (Maddison et al. 2017, Le et al. 2018 and
    Naesseth et al. 2018 drop this term). With ``score_gradient=True``
    every new particle's log weight becomes ``log Z-hat + log W_a -
    stop_gradient(log W_a)``, where ``W`` are the normalised incoming
    weights and ``a`` the particle's ancestor: the values are unchanged
    (bit for bit), and the gradient gains the score of the ancestor draw,
    so ``grad Z-hat`` is an unbiased estimate of ``grad Z`` (the
    stop-gradient estimator of Ścibior & Wood 2021). It adds variance
    (a score-function term). Its unbiasedness needs only unbiased
    offspring counts, ``E[c_i] = M W_i``, which every scheme here has.

    Args:
      q: a weighted program whose particle axis is declared by a plate.
      num_samples: the number M of particles after resampling (default N);
        ``()`` draws one particle and drops the particle axis.
      method: ``"systematic"`` (default), ``"stratified"``, ``"multinomial"``
        or ``"residual"``.
      ess_threshold: resample only when ESS < ``ess_threshold * N``
        (a fraction in (0, 1]); ``None`` always resamples.
      record_ancestors: also report each new particle's ancestor index
        (among the incoming particles; the identity for columns that were
        not resampled) as ``metrics["ancestors"]`` (key
        :data:`combinators.core.metrics.ANCESTORS`). Loops keep it out of
        their carry; a ``scan`` record sees it (e.g.
        :func:`combinators.smoothing.record_particles`).
      score_gradient: add the stop-gradient score of the ancestor draw to
        the new log weights (see Gradients above).

    Returns:
      The resampled program. For an unweighted or single-particle ``q`` it
      is a no-op.

    Example:
      >>> def target():
      ...     with numpyro.plate("particles", 8):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         numpyro.sample("y", dist.Normal(z, 1.0), obs=0.5)
      >>> def proposal():
      ...     with numpyro.plate("particles", 8):
      ...         numpyro.sample("z", dist.Normal(0.0, 2.0))
      >>> weighted = coix.propose(target, proposal)
      >>> program = resample(weighted, record_ancestors=True)
      >>> run = jax.jit(lambda key: coix.traced_evaluate(program, seed=key)())
      >>> _, _, metrics = run(jax.random.key(0))
      >>> bool(jnp.all(metrics.log_weight == metrics.log_Z))  # equal, log Z-hat
      True
      >>> metrics["ancestors"].shape
      (8,)
      >>> adaptive = resample(weighted, ess_threshold=0.5)  # only if ESS < N / 2
      >>> unbiased = resample(weighted, score_gradient=True)

    References:
      Ścibior & Wood (2021), "Differentiable particle filtering without
      modifying the forward pass", https://arxiv.org/abs/2106.10314.
    """
    evaluate.check_callable("resample", q=q)
    num_samples = _check_num_samples(num_samples)
    ess_threshold = _check_threshold(ess_threshold, num_samples)
    record_ancestors = _check_flag("record_ancestors", record_ancestors)
    score_gradient = _check_flag("score_gradient", score_gradient)

    def resampled(*args, **kwargs):
        key_r, args = _keys.own_key(args)
        q_eval = evaluate.evaluate(q, where="resample")(*args, **kwargs)
        trace = q_eval.trace
        weighted = q_eval.metrics is not None or any(
            s.observed for _, _, s in trace.generations()
        )
        metrics = q_eval.metrics or evaluate.default_metrics(trace, where="resample")
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

        def draw_indices():
            return resample_indices(
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
            chosen = draw_indices()
            new_trace, out = move(chosen)
            new_log_weight = jnp.broadcast_to(
                log_z_columns, (m,) + log_weight.shape[1:]
            )
            if score_gradient:
                new_log_weight = new_log_weight + _score_surrogate(log_weight, chosen)
            if squeeze:
                new_log_weight = new_log_weight[0]
            resampled_flag = jnp.asarray(True)
        else:
            need = weights.column_effective_sample_size(log_weight) < ess_threshold * n
            identity = jnp.broadcast_to(
                jnp.reshape(jnp.arange(n), (n,) + (1,) * (ndim - 1)),
                log_weight.shape,
            )
            out_arrays, rebuild = _split_static(q_eval.out)

            # The search for ancestors runs only in the taken branch: a step
            # that resamples no column pays for none of it.
            def resample_branch(operands):
                chosen = jnp.where(need, draw_indices(), identity)
                new_trace, out = move(chosen)
                return new_trace, _split_static(out)[0], chosen

            def keep(operands):
                trace_, out_arrays_ = operands
                return trace_, out_arrays_, identity

            new_trace, new_out_arrays, chosen = jax.lax.cond(
                jnp.any(need), resample_branch, keep, (trace, out_arrays)
            )
            out = rebuild(new_out_arrays)
            equal = log_z_columns
            if score_gradient:
                equal = equal + _score_surrogate(log_weight, chosen)
            new_log_weight = jnp.where(need, equal, log_weight)
            resampled_flag = jnp.any(need)
        extras = dict(metrics.extras)
        if record_ancestors:
            extras[ANCESTORS] = chosen
        new_metrics = Metrics(
            log_weight=new_log_weight,
            ess=weights.mean_effective_sample_size(new_log_weight),
            log_Z=jnp.sum(log_z_columns),
            loss=metrics.loss,
            log_density=metrics.log_density,
            extras=extras,
            resampled=resampled_flag,
        )
        return evaluate.empirical(out, new_trace, new_metrics)(*args, **kwargs)

    return resampled
