"""Weighted particles as an ArviZ ``InferenceData``: ``to_inference_data``.

A weighted evaluation (``traced_evaluate(program)(...)``: outputs, trace,
metrics) holds particles and their log importance weights. ArviZ's
summaries and plots expect ``(chain, draw, ...)`` arrays of equally
weighted draws, so the particles either become one chain of ``N`` draws
with their weights kept beside them (``sample_stats.log_weight`` and
``sample_stats.weight``, for ``xarray``'s ``.weighted(...)`` reductions and
ArviZ's Pareto-smoothed importance sampling, ``az.psislw``), or are first
resampled by their weights (``resample_key=``) into equally weighted
draws. Requires ``arviz`` (``pip install combinators[arviz]``).

References:
  Kumar, Carroll, Hartikainen & Martin (2019), "ArviZ a unified library for
  exploratory analysis of Bayesian models in Python", JOSS 4(33);
  Vehtari, Simpson, Gelman, Yao & Gabry (2024), "Pareto smoothed
  importance sampling", JMLR 25 (the k-hat diagnostic).
"""

from __future__ import annotations

import numpy as np

from combinators import weights
from combinators.core.evaluate import coerce_trace
from combinators.core.metrics import Metrics
from combinators.resampling import resample_indices

__all__ = ["to_inference_data"]

_WHERE = "to_inference_data"


def _particle_leading(value, layout) -> bool:
    shape = np.shape(value)
    return len(shape) >= layout.ndim and shape[0] == layout.shape[0]


def to_inference_data(
    trace, metrics: Metrics, *, resample_key=None, method="systematic"
):
    """An ``arviz.InferenceData`` of the particles of a weighted evaluation.

    With ArviZ 1.x the same groups come as an ``xarray.DataTree`` (what
    ArviZ 1.x works with), with the attributes on its root.

    Groups:

    * ``posterior``: every latent site drawn inside the particle plate, as one
      chain of ``N`` draws (``(1, N, ...)``; extra weight columns, e.g. a
      batch of data sets, stay as dims after ``draw``). With
      ``resample_key``, the ``N`` draws are resampled by weight (per
      column) and equally weighted.
    * ``sample_stats``: ``log_weight`` and the normalised ``weight``
      (over the particles, per column) of each draw, before resampling
      (uniform after it).
    * ``observed_data``: the observed sites' values.
    * ``smc_history`` (when ``metrics`` has a ``history``, e.g. from
      ``scan``, ``algo.smc`` or ``algo.tempered_smc``): per step ``ess``,
      ``log_Z``, ``log_Z_increment``, ``resampled`` and every record.
    * attributes: ``log_Z``, the mean ``ess`` and the Pareto k-hat of the
      weights (``az.psislw``; above 0.7 the importance weights are not
      reliable, Vehtari et al. 2024; ``-inf`` for equal weights).

    Args:
      trace: the trace of the evaluation (a ``Trace`` or a Coix dict trace).
      metrics: its metrics.
      resample_key: a PRNG key to resample the posterior by weight; ``None``
        keeps the particles and their weights.
      method: the resampling scheme for ``resample_key``.

    Returns:
      The ``InferenceData`` (ArviZ 0.x) or ``DataTree`` (ArviZ 1.x).

    Raises:
      ImportError: without ``arviz``.
      ValueError: if ``metrics`` has no log weights or no latent site carries
        the particle axis.

    Example:
      >>> def target(y):
      ...     with numpyro.plate("particles", 100):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         numpyro.sample("y", dist.Normal(z, 1.0), obs=y)
      >>> def proposal(y):
      ...     with numpyro.plate("particles", 100):
      ...         numpyro.sample("z", dist.Normal(0.0, 2.0))
      >>> program = coix.propose(target, proposal)
      >>> _, trace, metrics = coix.traced_evaluate(program, seed=jax.random.key(0))(1.0)
      >>> idata = to_inference_data(trace, metrics)
      >>> idata.posterior["z"].shape  # one chain of N draws
      (1, 100)
      >>> mean = idata.posterior["z"].weighted(idata.sample_stats["weight"]).mean()
    """
    try:
        import arviz as az  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - depends on the extra
        raise ImportError(
            f"{_WHERE}: needs arviz (pip install combinators[arviz])."
        ) from err
    trace = coerce_trace(trace).marginal()
    if metrics is None or metrics.log_weight is None:
        raise ValueError(f"{_WHERE}: metrics has no log weights.")
    layout = weights.layout_of(trace, where=_WHERE)
    log_weight = np.asarray(
        weights.reduce_to_layout(metrics.log_weight, layout, where=_WHERE), np.float64
    )
    if log_weight.ndim == 0:
        raise ValueError(f"{_WHERE}: the program has no particle axis.")
    # Drop the layout's trailing size-1 columns (e.g. a data plate's): they
    # index nothing, and sites broadcast along them.
    shape = list(log_weight.shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape.pop()
    log_weight = log_weight.reshape(shape)
    n = log_weight.shape[0]
    latents = {
        name: np.asarray(site.value)
        for name, site in trace.items()
        if not site.observed and _particle_leading(site.value, layout)
    }
    if not latents:
        raise ValueError(
            f"{_WHERE}: no latent site carries the particle axis ({n} particles); "
            f"sites: {sorted(trace)}."
        )
    weight = np.asarray(weights.normalize(log_weight), np.float64)
    k_hat = _pareto_k(az, log_weight.reshape(n, -1).T.copy())
    if resample_key is not None:
        indices = np.asarray(
            resample_indices(resample_key, log_weight, n, method)
        ).reshape(log_weight.shape)

        latents = {name: _pick_along(value, indices) for name, value in latents.items()}
        log_weight_out = np.full(log_weight.shape, -np.log(n))
        weight_out = np.full(log_weight.shape, 1.0 / n)
    else:
        log_weight_out, weight_out = log_weight, weight
    sample_stats = {"log_weight": log_weight_out[None], "weight": weight_out[None]}
    observed = {n_: np.asarray(s.value) for n_, s in trace.items() if s.observed}
    attrs = {
        "log_Z": float(np.asarray(metrics.log_Z)),
        "ess": float(np.mean(np.asarray(metrics.ess))),
        "pareto_k": float(np.max(k_hat)),
        "resampled": resample_key is not None,
    }
    groups = {
        "posterior": {name: value[None] for name, value in latents.items()},
        "sample_stats": sample_stats,
    }
    if observed:
        groups["observed_data"] = observed
    history = metrics.extras.get("history")
    history_data = None if history is None else _history_dataset(history)
    if _arviz_major(az) == 0:
        idata = az.from_dict(
            posterior=groups["posterior"],
            sample_stats=groups["sample_stats"],
            observed_data=groups.get("observed_data"),
            attrs=attrs,
        )
        if history_data is not None:
            idata.add_groups({"smc_history": history_data})
        return idata
    # ArviZ 1.x: an xarray DataTree, one child per group.
    import xarray as xr  # noqa: PLC0415  (an arviz dependency)

    tree = az.from_dict(groups)
    tree.attrs.update(attrs)
    if history_data is not None:
        tree["smc_history"] = xr.DataTree(history_data)
    return tree


def _arviz_major(az) -> int:
    return int(az.__version__.split(".")[0])


def _pareto_k(az, log_weights: np.ndarray) -> np.ndarray:
    """Pareto k-hat of each row of log weights (ArviZ 0.x or 1.x).

    A row of equal weights (e.g. just after resampling) has no tail at all:
    its k-hat is ``-inf`` (ArviZ 0.x would say ``inf``, 1.x raises).
    """
    k_hat = np.full(log_weights.shape[0], -np.inf)
    uneven = np.ptp(log_weights, axis=-1) > 0
    if not uneven.any():
        return k_hat
    rows = log_weights[uneven]
    if _arviz_major(az) == 0:
        k_hat[uneven] = az.psislw(rows)[1]
        return k_hat
    from arviz_stats.base import array_stats  # noqa: PLC0415  (ArviZ 1.x)

    # ArviZ 1.x's psislw takes log likelihoods (the weights of PSIS-LOO are
    # their negatives), 0.x's the log weights themselves.
    k_hat[uneven] = array_stats.psislw(-rows, axis=-1)[1]
    return k_hat


def _pick_along(value, indices):
    """``value[indices]`` along the particle axis, per weight column."""
    extra = value.ndim - indices.ndim
    if extra < 0:
        raise ValueError(
            f"{_WHERE}: a site of shape {value.shape} does not span the weights' "
            f"columns {indices.shape}."
        )
    index = indices.reshape(indices.shape + (1,) * extra)
    return np.take_along_axis(value, index, 0)


def _history_dataset(history):
    """A per-step ``xarray.Dataset`` of an SMC history (dim ``step``)."""
    import xarray as xr  # noqa: PLC0415  (an arviz dependency)

    fields = {
        "ess": history.ess,
        "log_Z": history.log_Z,
        "log_Z_increment": history.log_Z_increment,
        "resampled": history.resampled,
        **dict(history.records),
    }
    data = {}
    for key, value in fields.items():
        array = np.asarray(value)
        if array.ndim == 0:
            continue
        dims = ("step",) + tuple(f"{key}_dim_{i}" for i in range(array.ndim - 1))
        data[key] = (dims, array)
    return xr.Dataset(data)
