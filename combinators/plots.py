"""Figures for training curves, SMC diagnostics, weighted particles and images.

Every function draws on the matplotlib ``Axes`` it is given (``ax=``) and
returns it. Without one it creates a standalone ``matplotlib.figure.Figure``
on the Agg canvas (no pyplot, so nothing is registered globally, no window
opens and loops do not accumulate figures); save it with
``ax.figure.savefig(path)``. In a notebook, pass axes from
``plt.subplots()`` to show the figure inline.

Weighted particles are drawn with their self-normalised importance weights
``wbar_i = exp(log_weight_i) / sum_j exp(log_weight_j)``, so a histogram
estimates the target's marginal density (Owen 2013, "Monte Carlo theory,
methods and examples", chapter 9, self-normalised importance sampling).

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
  >>> ax = weighted_hist(trace["z"].value, metrics["log_weight"])
  >>> type(ax.figure).__name__  # ax.figure.savefig("posterior.png") saves it
  'Figure'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "image_grid",
    "loss_curve",
    "new_axes",
    "normalized_weights",
    "reconstructions",
    "smc_ess",
    "smc_history",
    "smc_log_Z",
    "weighted_hist",
    "weighted_hist2d",
]


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def new_axes(figsize: tuple[float, float] = (5.0, 3.5), ncols: int = 1):
    """Axes on a new standalone figure (Agg canvas, no pyplot).

    Args:
      figsize: the figure size in inches.
      ncols: the number of side-by-side axes.

    Returns:
      One ``Axes`` when ``ncols == 1``, else an array of them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig.subplots(1, ncols)


def _to_numpy(x, what: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except TypeError as err:  # jax tracers raise a TypeError subclass
        raise ValueError(
            f"plots: {what} must hold concrete numbers (plot outside jit/vmap/grad)."
        ) from err


def normalized_weights(log_weight, num_particles: int | None = None) -> np.ndarray:
    """Self-normalised importance weights of the particle axis (axis 0).

    Args:
      log_weight: log weights with particles on axis 0; trailing axes of size
        one (a layout column) are dropped. ``None`` gives equal weights.
      num_particles: the number of particles, needed when ``log_weight`` is
        ``None``.

    Returns:
      A float64 array of shape ``(N,)`` summing to one.

    Raises:
      ValueError: for several columns (pick one, e.g. ``log_weight[:, j]``)
        or for log weights that are not finite.
    """
    if log_weight is None:
        if num_particles is None:
            raise ValueError("plots: give log_weight or the number of particles.")
        return np.full(num_particles, 1.0 / num_particles)
    log_weight = _to_numpy(log_weight, "log_weight").astype(np.float64)
    if log_weight.ndim == 0:
        log_weight = log_weight[None]
    while log_weight.ndim > 1 and log_weight.shape[-1] == 1:
        log_weight = log_weight[..., 0]
    if log_weight.ndim != 1:
        raise ValueError(
            f"plots: log_weight has shape {log_weight.shape}: particles on axis 0 "
            f"and several columns (e.g. data points); plot one column, "
            f"log_weight[:, j]."
        )
    if np.isnan(log_weight).any() or np.isposinf(log_weight).any():
        raise ValueError("plots: log_weight has NaN or +inf entries.")
    top = np.max(log_weight)
    if not np.isfinite(top):
        raise ValueError("plots: every log weight is -inf (no particle has weight).")
    w = np.exp(log_weight - top)
    return w / np.sum(w)


def _particles(values, n_dims: int, what: str) -> np.ndarray:
    """Values as ``(N,)`` (1-D) or ``(N, 2)`` (2-D); size-one axes dropped."""
    values = _to_numpy(values, what).astype(np.float64)
    if n_dims == 1:
        flat = np.squeeze(values)
        if flat.ndim != 1:
            raise ValueError(
                f"plots: {what} has shape {values.shape}; expected one number per "
                f"particle (N,) (size-one axes are dropped)."
            )
        return flat
    if values.ndim < 2 or values.shape[-1] != 2:
        raise ValueError(
            f"plots: {what} has shape {values.shape}; expected (N, 2) points."
        )
    return values.reshape(-1, 2)


def _visible_range(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """The range of the particles with a visible weight.

    Particles whose normalised weight is below ``1e-3 / N`` (a thousandth of
    a uniform weight) are ignored, so together they hold less than 0.1% of
    the mass; with equal weights this is the values' full range.
    """
    visible = x[w >= 1e-3 / len(w)]
    low, high = float(np.min(visible)), float(np.max(visible))
    if low == high:
        low, high = low - 0.5, high + 0.5
    return low, high


def _history_field(history, field: str) -> np.ndarray:
    """A field of a ``coix.History``, a metrics record holding one, or a dict."""
    if hasattr(history, "extras") and "history" in history.extras:
        history = history.extras["history"]
    value = history[field] if isinstance(history, Mapping) else getattr(history, field)
    value = _to_numpy(value, f"history.{field}")
    if value.ndim != 1:
        raise ValueError(
            f"plots: history.{field} has shape {value.shape}; expected one entry "
            f"per step. For the histories of several runs (vmap), plot one run: "
            f"jax.tree_util.tree_map(lambda x: x[i], history)."
        )
    return value


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` entries, ignoring non-finite ones.

    Entry ``k`` averages ``y[k : k + window]`` (``len(y) - window + 1``
    entries); a window with no finite entry gives NaN.
    """
    finite = np.isfinite(y)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, y, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    total = sums[window:] - sums[:-window]
    count = counts[window:] - counts[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ---------------------------------------------------------------------------
# Training curves.
# ---------------------------------------------------------------------------


def loss_curve(
    history,
    keys: str | Sequence[str] = "loss",
    *,
    ax=None,
    window: int = 1,
    logx: bool = False,
    negate: bool = False,
    labels: Sequence[str] | None = None,
    first_step: int = 1,
):
    """Loss (or ELBO, log Z, ESS, ...) curves over training steps.

    Args:
      history: ``TrainResult.history`` (a dict of per-step arrays), a
        ``TrainResult``, one array, or a dict of arrays.
      keys: the entries of ``history`` to draw (ignored for an array).
      ax: the axes to draw on (default: a new figure).
      window: moving-average window; with ``window > 1`` the raw curve is
        drawn faintly and its trailing moving average on top (non-finite
        entries, e.g. skipped steps, are left out of the averages).
      logx: logarithmic step axis.
      negate: draw ``-value`` (e.g. the ELBO from the ``elbo_loss``).
      labels: legend labels, one per key (default: the keys, with a minus
        sign when negated).
      first_step: the step number of the first entry (``train`` counts from
        1).

    Returns:
      The axes, with one line per key, or two per key with smoothing (raw,
      then smoothed).

    Example:
      >>> history = {"loss": jnp.linspace(2.0, 1.0, 50)}  # e.g. TrainResult.history
      >>> ax = loss_curve(history, window=5, negate=True, labels=["ELBO"])
      >>> len(ax.lines)  # the raw curve and its moving average
      2
    """
    if window < 1:
        raise ValueError(f"loss_curve: window must be >= 1, got {window}.")
    if hasattr(history, "history") and not isinstance(history, Mapping):
        history = history.history  # a TrainResult
    if isinstance(history, Mapping):
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in history]
        if missing:
            raise KeyError(
                f"loss_curve: {missing} not in the history; it has {sorted(history)}."
            )
        curves = [(k, history[k]) for k in keys]
    else:
        curves = [("value", history)]
    if labels is not None and len(labels) != len(curves):
        raise ValueError(f"loss_curve: {len(labels)} labels for {len(curves)} curves.")
    ax = ax if ax is not None else new_axes()
    for index, (key, values) in enumerate(curves):
        y = _to_numpy(values, key).astype(np.float64).reshape(-1)
        if negate:
            y = -y
        steps = np.arange(first_step, first_step + len(y))
        label = labels[index] if labels is not None else ("-" if negate else "") + key
        color = f"C{index}"
        if window > 1 and len(y) >= window:
            ax.plot(steps, y, color=color, alpha=0.3, lw=0.7)
            ax.plot(
                steps[window - 1 :],
                _moving_average(y, window),
                color=color,
                lw=1.2,
                label=f"{label} (mean of {window})",
            )
        else:
            ax.plot(steps, y, color=color, lw=1.0, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("step")
    if len(curves) == 1 and labels is None:
        ax.set_ylabel(("-" if negate else "") + curves[0][0])
    else:
        ax.legend(fontsize=8)
    return ax


# ---------------------------------------------------------------------------
# Sequential Monte Carlo.
# ---------------------------------------------------------------------------


def _mark_resampling(ax, steps, y, resampled) -> bool:
    """Triangles on the curve at the steps that resampled; whether any did."""
    flags = resampled.astype(bool)
    if flags.any():
        ax.scatter(
            steps[flags],
            y[flags],
            marker="v",
            s=22,
            color="C3",
            zorder=3,
            label="resampled",
        )
    return bool(flags.any())


def smc_ess(
    history,
    *,
    ax=None,
    num_particles: int | None = None,
    relative: bool = False,
    mark_resampling: bool = True,
    threshold: float | None = None,
):
    """Effective sample size over the steps of an SMC run.

    Args:
      history: ``metrics["history"]`` of ``coix.scan`` / ``algo.smc`` (a
        ``coix.History``), or the metrics record holding it. Entry 0 is the
        initial program, entry ``t`` the program after step ``t``.
      ax: the axes (default: a new figure).
      num_particles: N; draws the line ESS = N (or 1 with ``relative``).
      relative: draw ESS / N (needs ``num_particles``).
      mark_resampling: mark the steps that resampled (``history.resampled``:
        step ``t`` resampled the incoming particles before extending them)
        with triangles on the curve.
      threshold: the adaptive resampling threshold as a fraction of N (the
        ``ess_threshold`` given to ``resample`` / ``algo.smc``); draws the
        line ESS = threshold N (needs ``num_particles``), below which a
        step resamples.

    Returns:
      The axes, with the ESS line, the N line if ``num_particles`` is given,
      the threshold line if ``threshold`` is, and one scatter of resampling
      steps if any step resampled.

    Raises:
      ValueError: for ``relative`` or ``threshold`` without
        ``num_particles``, or a threshold outside ``(0, 1]``.
    """
    ess = _history_field(history, "ess").astype(np.float64)
    if relative:
        if num_particles is None:
            raise ValueError("smc_ess: relative=True needs num_particles.")
        ess = ess / num_particles
    steps = np.arange(len(ess))
    ax = ax if ax is not None else new_axes()
    if threshold is not None:
        if num_particles is None:
            raise ValueError("smc_ess: threshold needs num_particles.")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(
                f"smc_ess: threshold is a fraction of N in (0, 1], got {threshold}."
            )
    ax.plot(steps, ess, "-", color="C0", lw=1.2, label="ESS / N" if relative else "ESS")
    show_legend = False
    if num_particles is not None:
        ax.axhline(
            1.0 if relative else num_particles,
            color="0.5",
            ls="--",
            lw=0.8,
            label="N",
        )
    if threshold is not None and num_particles is not None:
        ax.axhline(
            threshold if relative else threshold * num_particles,
            color="C3",
            ls=":",
            lw=1.0,
            label=f"resampling threshold ({threshold:g} N)",
        )
        show_legend = True
    resampled = _history_field(history, "resampled")
    if mark_resampling and _mark_resampling(ax, steps, ess, resampled):
        show_legend = True
    if show_legend:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("ESS / N" if relative else "ESS")
    ax.set_ylim(bottom=0)
    return ax


def smc_log_Z(
    history,
    *,
    ax=None,
    increments: bool = False,
    reference=None,
    mark_resampling: bool = True,
    error: bool = False,
):
    """The running log normaliser estimate (or its increments) over SMC steps.

    Args:
      history: a ``coix.History`` (or metrics holding one).
      ax: the axes (default: a new figure).
      increments: draw ``log_Z_increment`` (``log Z_t - log Z_{t-1}``, the
        log of step ``t``'s average incremental weight) as bars instead of
        the running ``log_Z``.
      reference: the exact value(s) to compare with: a scalar (a horizontal
        line) or one value per entry (a dashed line), e.g. from a Kalman
        filter.
      mark_resampling: mark resampling steps on the running curve.
      error: draw the error ``estimate - reference`` (needs ``reference``)
        against a zero line instead of both curves; the scale of the error
        is then visible where the two curves would overlap.

    Returns:
      The axes.

    Raises:
      ValueError: for ``error`` without ``reference``.
    """
    steps = np.arange(len(_history_field(history, "log_Z")))
    ax = ax if ax is not None else new_axes()
    show_legend = False
    field = "log_Z_increment" if increments else "log_Z"
    y = _history_field(history, field).astype(np.float64)
    name = "log Z increment" if increments else "log Z"
    if error:
        if reference is None:
            raise ValueError("smc_log_Z: error=True needs the reference.")
        exact = np.broadcast_to(
            _to_numpy(reference, "reference").astype(np.float64).reshape(-1)
            if np.ndim(reference)
            else float(reference),
            y.shape,
        )
        ax.plot(steps, y - exact, "-", color="C1", lw=1.2, label=f"{name} error")
        ax.axhline(0.0, color="k", ls="--", lw=0.8, label="exact")
        resampled = _history_field(history, "resampled")
        if mark_resampling and not increments:
            _mark_resampling(ax, steps, y - exact, resampled)
        ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} estimate - exact")
        return ax
    if increments:
        ax.bar(steps, y, width=0.8, color="C1", label="log Z increment")
    else:
        ax.plot(steps, y, "-", color="C1", lw=1.2, label="log Z estimate")
        resampled = _history_field(history, "resampled")
        if mark_resampling and _mark_resampling(ax, steps, y, resampled):
            show_legend = True
    if reference is not None:
        reference = _to_numpy(reference, "reference").astype(np.float64)
        if reference.ndim == 0:
            ax.axhline(float(reference), color="k", ls="--", lw=0.8, label="exact")
        else:
            ax.plot(steps, reference.reshape(-1), "k--", lw=0.8, label="exact")
        show_legend = True
    if show_legend:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("log Z increment" if increments else "log Z")
    return ax


def smc_history(
    history, *, axes=None, num_particles: int | None = None, reference=None
):
    """ESS and running log Z of an SMC run, side by side.

    Args:
      history: a ``coix.History`` (or metrics holding one).
      axes: two axes (default: a new figure with two panels).
      num_particles: N, for the ESS = N line.
      reference: the exact log Z (scalar or per entry).

    Returns:
      The two axes ``(ess_ax, log_Z_ax)``.
    """
    if axes is None:
        axes = new_axes(figsize=(10.0, 3.5), ncols=2)
    ess_ax, log_z_ax = axes
    smc_ess(history, ax=ess_ax, num_particles=num_particles)
    smc_log_Z(history, ax=log_z_ax, reference=reference)
    return ess_ax, log_z_ax


# ---------------------------------------------------------------------------
# Weighted particles.
# ---------------------------------------------------------------------------


def _log_density_values(log_density: Callable, points: np.ndarray) -> np.ndarray:
    values = _to_numpy(log_density(points), "log_density(x)").astype(np.float64)
    return values.reshape(points.shape[: points.ndim - (points.ndim > 1)])


def weighted_hist(
    values,
    log_weight=None,
    *,
    ax=None,
    bins: int | Sequence[float] = 40,
    range: tuple[float, float] | None = None,
    density: bool = True,
    log_density: Callable | None = None,
    normalize_density: bool = False,
    color: str = "C0",
    label: str | None = "particles",
):
    """Histogram of one-dimensional particles weighted by their importance weights.

    Bar ``k`` has height ``sum_{i in bin k} wbar_i`` (``density=False``) or
    that mass divided by the bin's width (``density=True``), with ``wbar``
    the self-normalised weights. Particles outside ``range`` are not drawn
    and their mass is not redistributed.

    Args:
      values: one value per particle, shape ``(N,)`` (size-one axes dropped),
        e.g. ``trace["z"].value``.
      log_weight: the particles' log weights, e.g. ``metrics["log_weight"]``
        (``None``: equal weights, e.g. after resampling).
      ax: the axes (default: a new figure).
      bins: the number of bins or their edges.
      range: ``(low, high)`` of the bins (default: the range of the
        particles whose weight is at least a thousandth of a uniform weight,
        so the bins span the visible mass; less than 0.1% is left out).
      density: heights as densities (comparable with ``log_density``) rather
        than masses.
      log_density: optional ``f(x) -> log p(x)`` for an array ``x`` of shape
        ``(G,)``; ``exp(f)`` is drawn over the bins' range.
      normalize_density: normalise ``exp(f)`` numerically over the plotted
        range (for an unnormalised target).
      color: the bars' colour.
      label: the bars' legend label.

    Returns:
      The axes, with one bar per bin (``ax.patches``) and, with
      ``log_density``, one line.
    """
    x = _particles(values, 1, "values")
    w = normalized_weights(log_weight, num_particles=x.shape[0])
    if w.shape[0] != x.shape[0]:
        raise ValueError(
            f"weighted_hist: {x.shape[0]} values but {w.shape[0]} weights."
        )
    if range is None and np.ndim(bins) == 0:
        range = _visible_range(x, w)
    edges = np.histogram_bin_edges(x, bins=bins, range=range)
    mass, edges = np.histogram(x, bins=edges, weights=w)
    heights = mass / np.diff(edges) if density else mass
    ax = ax if ax is not None else new_axes()
    ax.bar(
        edges[:-1],
        heights,
        width=np.diff(edges),
        align="edge",
        color=color,
        alpha=0.6,
        label=label,
    )
    if log_density is not None:
        grid = np.linspace(edges[0], edges[-1], 400)
        curve = np.exp(_log_density_values(log_density, grid))
        if normalize_density:
            curve = curve / np.sum(0.5 * (curve[1:] + curve[:-1]) * np.diff(grid))
        if not density:
            curve = curve * np.mean(np.diff(edges))  # mass per bin width
        ax.plot(grid, curve, color="k", lw=1.2, label="density")
    ax.set_ylabel("density" if density else "weight per bin")
    if label is not None or log_density is not None:
        ax.legend(fontsize=8)
    return ax


def weighted_hist2d(
    values,
    log_weight=None,
    *,
    ax=None,
    kind: str = "hist2d",
    bins: int = 40,
    range: Sequence[Sequence[float]] | None = None,
    log_density: Callable | None = None,
    levels: Sequence[float] = (0.05, 0.3, 0.7),
    cmap: str = "viridis",
):
    """Two-dimensional particles as a weighted 2-D histogram or hexbin.

    Each cell shows the sum of the self-normalised weights of the particles
    in it (a probability mass).

    Args:
      values: points, shape ``(N, 2)``.
      log_weight: their log weights (``None``: equal weights).
      ax: the axes (default: a new figure).
      kind: ``"hist2d"`` (square cells) or ``"hexbin"``.
      bins: cells per axis (``gridsize`` for hexbin).
      range: ``((xlow, xhigh), (ylow, yhigh))`` (default: as for
        :func:`weighted_hist`, per coordinate).
      log_density: optional ``f(xy) -> log p(xy)`` for an array ``xy`` of
        shape ``(G, 2)``; its contours are drawn at ``levels`` (fractions of
        the density's maximum on the grid, so it may be unnormalised).
      levels: contour levels as fractions of the maximum density.
      cmap: the colour map.

    Returns:
      The axes, with one ``QuadMesh`` (hist2d) or ``PolyCollection``
      (hexbin), plus contour lines with ``log_density``.
    """
    xy = _particles(values, 2, "values")
    w = normalized_weights(log_weight, num_particles=xy.shape[0])
    if w.shape[0] != xy.shape[0]:
        raise ValueError(
            f"weighted_hist2d: {xy.shape[0]} points but {w.shape[0]} weights."
        )
    if range is None:
        range = [_visible_range(xy[:, d], w) for d in (0, 1)]
    ax = ax if ax is not None else new_axes(figsize=(4.5, 4.0))
    if kind == "hist2d":
        ax.hist2d(xy[:, 0], xy[:, 1], bins=bins, range=range, weights=w, cmap=cmap)
    elif kind == "hexbin":
        ax.hexbin(
            xy[:, 0],
            xy[:, 1],
            C=w,
            reduce_C_function=np.sum,
            gridsize=bins,
            extent=(*range[0], *range[1]),
            cmap=cmap,
        )
    else:
        raise ValueError(
            f"weighted_hist2d: kind is 'hist2d' or 'hexbin', got {kind!r}."
        )
    if log_density is not None:
        gx = np.linspace(range[0][0], range[0][1], 120)
        gy = np.linspace(range[1][0], range[1][1], 120)
        xx, yy = np.meshgrid(gx, gy)
        grid = np.stack([xx.ravel(), yy.ravel()], axis=-1)
        log_p = _log_density_values(log_density, grid).reshape(xx.shape)
        density = np.exp(log_p - np.max(log_p))
        ax.contour(xx, yy, density, levels=sorted(levels), colors="w", linewidths=0.8)
    ax.set_xlim(*range[0])
    ax.set_ylim(*range[1])
    return ax


# ---------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------


def _images(images, shape: tuple[int, ...] | None) -> np.ndarray:
    """Images as ``(n, h, w)`` or ``(n, h, w, channels)``."""
    images = _to_numpy(images, "images").astype(np.float64)
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if images.ndim < 2 or math.prod(images.shape[1:]) != math.prod(shape):
            raise ValueError(
                f"plots: images of shape {images.shape} cannot be reshaped to "
                f"(n, *{shape})."
            )
        images = images.reshape((images.shape[0],) + shape)
    if images.ndim == 2:
        raise ValueError(
            f"plots: images of shape {images.shape} are flat; give shape=(h, w)."
        )
    if images.ndim not in (3, 4) or (
        images.ndim == 4 and images.shape[-1] not in (3, 4)
    ):
        raise ValueError(
            f"plots: images must be (n, h, w) or (n, h, w, 3|4), got {images.shape}."
        )
    return images


def _mosaic(images: np.ndarray, ncols: int, pad: int) -> np.ndarray:
    """Tiles ``(n, h, w[, c])`` images row by row; gaps are NaN."""
    n, h, w = images.shape[:3]
    nrows = math.ceil(n / ncols)
    tail = images.shape[3:]
    out = np.full(
        (nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad) + tail, np.nan
    )
    for index in np.arange(n):
        r, c = divmod(int(index), ncols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = (
            images[index]
        )
    return out


def image_grid(
    images,
    *,
    shape: tuple[int, ...] | None = None,
    ax=None,
    ncols: int | None = None,
    max_images: int | None = 64,
    pad: int = 1,
    cmap: str = "gray",
    vmin: float | None = None,
    vmax: float | None = None,
):
    """A grid of images (samples, reconstructions) drawn as one image.

    Args:
      images: ``(n, h, w)``, ``(n, h, w, 3|4)`` or flat ``(n, h*w)`` with
        ``shape``.
      shape: the shape of one image, e.g. ``(28, 28)``, for flat images.
      ax: the axes (default: a new figure).
      ncols: images per row (default: about ``sqrt(n)``).
      max_images: draw at most this many (``None``: all).
      pad: pixels between images (drawn in the axes' background colour).
      cmap: colour map of one-channel images.
      vmin: the value drawn black (default: the images' minimum).
      vmax: the value drawn white (default: the images' maximum).

    Returns:
      The axes with one ``AxesImage`` (``ax.images[0]``); its array is the
      tiled grid, images placed row by row.
    """
    images = _images(images, shape)
    if max_images is not None:
        images = images[:max_images]
    n = images.shape[0]
    if n == 0:
        raise ValueError("image_grid: no images.")
    ncols = min(n, ncols if ncols is not None else math.ceil(math.sqrt(n)))
    mosaic = _mosaic(images, ncols, pad)
    ax = (
        ax
        if ax is not None
        else new_axes(figsize=(6.0, 6.0 * mosaic.shape[0] / mosaic.shape[1]))
    )
    finite = images[np.isfinite(images)]
    if mosaic.ndim == 3:  # colour images: gaps drawn white
        ax.imshow(np.nan_to_num(mosaic, nan=1.0), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        return ax
    ax.imshow(
        np.ma.masked_invalid(mosaic),
        cmap=cmap,
        vmin=vmin if vmin is not None else (finite.min() if finite.size else None),
        vmax=vmax if vmax is not None else (finite.max() if finite.size else None),
        interpolation="nearest",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def reconstructions(
    originals,
    reconstructed,
    *,
    shape: tuple[int, ...] | None = None,
    ax=None,
    max_images: int = 10,
    pad: int = 1,
    cmap: str = "gray",
    labels: tuple[str, str] = ("data", "reconstruction"),
):
    """Originals above their reconstructions, one column per example.

    Args:
      originals: ``(n, h, w)`` or flat ``(n, h*w)`` with ``shape``.
      reconstructed: the same shape as ``originals``, e.g. decoder means.
      shape: the shape of one image for flat inputs.
      ax: the axes (default: a new figure).
      max_images: columns drawn.
      pad: pixels between images.
      cmap: the colour map.
      labels: the two rows' labels.

    Returns:
      The axes with one ``AxesImage`` of two rows.
    """
    top = _images(originals, shape)[:max_images]
    bottom = _images(reconstructed, shape)[:max_images]
    if top.shape != bottom.shape:
        raise ValueError(
            f"reconstructions: originals {top.shape} and reconstructions "
            f"{bottom.shape} differ in shape."
        )
    n, h = top.shape[0], top.shape[1]
    if ax is None:
        ax = new_axes(figsize=(min(1.0 * n + 1.0, 14.0), 2.4))
    image_grid(
        np.concatenate([top, bottom]),
        ax=ax,
        ncols=n,
        max_images=None,
        pad=pad,
        cmap=cmap,
        vmin=float(np.nanmin([top.min(), bottom.min()])),
        vmax=float(np.nanmax([top.max(), bottom.max()])),
    )
    ax.set_yticks([h / 2 - 0.5, h + pad + h / 2 - 0.5])
    ax.set_yticklabels(labels)
    ax.tick_params(axis="y", length=0)
    return ax
