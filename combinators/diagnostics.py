"""Diagnostics of importance weights: ESS, conditional ESS, log Z error, k-hat.

Every function takes log weights whose axis 0 indexes particles; further
(trailing) axes are independent columns (e.g. a data batch, or independent
replications) and are diagnosed separately, so the result has the shape of
``log_weight.shape[1:]``. A 0-d log weight is one particle. All functions are
pure JAX and can be ``jax.jit``-ed; the particle count and the tail size of
:func:`pareto_khat` are static (taken from shapes).

A column whose log weights are not usable -- any NaN, any ``+inf``, or all
``-inf`` (every particle has weight 0) -- gives NaN for every diagnostic,
never a plausible-looking number. Individual ``-inf`` log weights (particles
outside the target's support) are fine.

:func:`summary` gathers the scalar diagnostics of a
:class:`~combinators.metrics.Metrics` record (or a raw log-weight array) into
a :class:`Diagnostics` record that prints as a table (also in Jupyter).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from combinators import weights

__all__ = [
    "Diagnostics",
    "LogNormalizerEstimate",
    "conditional_ess",
    "effective_sample_size",
    "log_normalizer",
    "log_normalizer_from_runs",
    "log_normalizer_mcse",
    "pareto_khat",
    "pareto_khat_threshold",
    "relative_ess",
    "summary",
]

# Weakly informative prior of PSIS on the GPD shape: `_PRIOR_STRENGTH`
# pseudo-observations at `_PRIOR_SHAPE` (Vehtari et al. 2024, appendix).
_PRIOR_SHAPE = 0.5
_PRIOR_STRENGTH = 10.0
# Zhang & Stephens (2009): the profile-likelihood grid has
# `_MIN_GRID_POINTS + floor(sqrt(M))` points.
_MIN_GRID_POINTS = 20


# ---------------------------------------------------------------------------
# Shapes and validity.
# ---------------------------------------------------------------------------


def _as_particles(log_weight) -> jax.Array:
    """Log weights with at least one (particle) axis."""
    return jnp.atleast_1d(jnp.asarray(log_weight))


def _valid(log_weight: jax.Array) -> jax.Array:
    """Per column: no NaN, no ``+inf``, and at least one positive weight."""
    bad = jnp.isnan(log_weight) | (log_weight == jnp.inf)
    return ~jnp.any(bad, axis=0) & jnp.any(log_weight > -jnp.inf, axis=0)


def _per_column(fn, log_weight: jax.Array) -> jax.Array:
    """Applies ``fn`` (one column of shape ``(N,)`` -> scalar) to each column."""
    n = log_weight.shape[0]
    columns = log_weight.reshape(n, -1).T
    return jax.vmap(fn)(columns).reshape(log_weight.shape[1:])


# ---------------------------------------------------------------------------
# Effective sample sizes.
# ---------------------------------------------------------------------------


@jax.jit
def effective_sample_size(log_weight) -> jax.Array:
    """Kish's effective sample size ``1 / sum_i Wbar_i^2``, per column.

    ``Wbar`` are the normalised weights ``softmax(log_weight, axis=0)``. The
    ESS is ``N`` for equal weights and 1 when one particle carries all the
    weight. Unlike :func:`combinators.weights.mean_effective_sample_size` (which
    averages over columns, as the ``ess`` metric does) the columns are kept.

    The ESS is itself a Monte Carlo estimate; it is meaningful only when the
    weights have finite variance (see :func:`pareto_khat`).

    Args:
      log_weight: log importance weights, particles on axis 0.

    Returns:
      The ESS, of shape ``log_weight.shape[1:]``; NaN for unusable columns.

    Example:
      >>> effective_sample_size(jnp.log(jnp.array([1.0, 1.0, 2.0])))  # 16/6
      Array(2.6666667, dtype=float32)

    References:
      Kish, L. (1965). Survey Sampling. Wiley.
      Kong, A. (1992). A note on importance sampling using standardized
      weights. Technical report 348, Department of Statistics, University of
      Chicago.
    """
    log_weight = _as_particles(log_weight)
    ess = weights.column_effective_sample_size(log_weight)
    return jnp.where(_valid(log_weight), ess, jnp.nan)


@jax.jit
def relative_ess(log_weight) -> jax.Array:
    """The effective sample size as a fraction of the particles, ``ESS / N``.

    Args:
      log_weight: log importance weights, particles on axis 0.

    Returns:
      ``ESS / N`` in ``[1/N, 1]``, of shape ``log_weight.shape[1:]``.
    """
    log_weight = _as_particles(log_weight)
    return effective_sample_size(log_weight) / log_weight.shape[0]


@jax.jit
def conditional_ess(log_weight_prev, log_incremental) -> jax.Array:
    """Conditional effective sample size of a reweighting step, per column.

    With ``W`` the normalised previous weights and ``v`` the incremental
    weights of the new step,

        CESS = N (sum_i W_i v_i)^2 / sum_i W_i v_i^2,

    computed in log space (any scale of either weight is fine). CESS is
    ``N`` when the increments are constant (the step changes nothing) and is
    the ESS of the increments when the previous weights are equal (e.g.
    right after resampling). Unlike the ESS of the new weights, it measures
    only the step's own degeneracy, which is what adaptive SMC tunes the
    next temperature or resampling decision on.

    Args:
      log_weight_prev: log weights before the step, particles on axis 0.
      log_incremental: the step's incremental log weights; broadcast against
        ``log_weight_prev`` (the particle axes must have equal sizes).

    Returns:
      CESS in ``[1, N]``, of the broadcast column shape; NaN where either
      argument is unusable.

    Raises:
      ValueError: when the two particle axes differ.

    Example:
      >>> conditional_ess(jnp.zeros(4), jnp.zeros(4))
      Array(4., dtype=float32)

    References:
      Zhou, Y., Johansen, A. M. and Aston, J. A. D. (2016). Toward automatic
      model comparison: an adaptive sequential Monte Carlo approach. Journal
      of Computational and Graphical Statistics 25(3), 701-726.
      https://arxiv.org/abs/1303.3123
    """
    log_weight_prev = _as_particles(log_weight_prev)
    log_incremental = _as_particles(log_incremental)
    if log_weight_prev.shape[0] != log_incremental.shape[0]:
        raise ValueError(
            "conditional_ess: the previous and incremental log weights have "
            f"{log_weight_prev.shape[0]} and {log_incremental.shape[0]} "
            f"particles (shapes {log_weight_prev.shape} and "
            f"{log_incremental.shape}); axis 0 must index the same particles."
        )
    shape = jnp.broadcast_shapes(log_weight_prev.shape, log_incremental.shape)
    log_weight_prev = jnp.broadcast_to(log_weight_prev, shape)
    log_incremental = jnp.broadcast_to(log_incremental, shape)
    n = shape[0]
    log_normalized_prev = jax.nn.log_softmax(log_weight_prev, axis=0)
    # Particles with zero previous weight contribute nothing, whatever their
    # increment; zero them explicitly so -inf + inf gives no NaN.
    alive = log_normalized_prev > -jnp.inf
    first = jnp.where(alive, log_normalized_prev + log_incremental, -jnp.inf)
    second = jnp.where(alive, log_normalized_prev + 2 * log_incremental, -jnp.inf)
    log_cess = jnp.log(n) + 2 * logsumexp(first, axis=0) - logsumexp(second, axis=0)
    valid = (
        _valid(log_weight_prev)
        & _valid(first)
        & ~jnp.any(jnp.isnan(log_incremental), axis=0)
    )
    return jnp.where(valid, jnp.exp(log_cess), jnp.nan)


# ---------------------------------------------------------------------------
# The normalising constant and its Monte Carlo error.
# ---------------------------------------------------------------------------


@jax.jit
def log_normalizer(log_weight) -> jax.Array:
    """Importance sampling estimate of log Z, per column.

    ``log Zhat = logsumexp(log_weight, axis=0) - log N``: the log of the mean
    weight. ``Zhat`` is unbiased for ``Z``; ``log Zhat`` is biased low by
    about ``mcse**2 / 2``. :func:`combinators.weights.log_normalizer` (the
    ``log_Z`` metric) sums these over columns.

    Args:
      log_weight: log importance weights, particles on axis 0.

    Returns:
      ``log Zhat`` of shape ``log_weight.shape[1:]``; NaN for unusable
      columns.
    """
    log_weight = _as_particles(log_weight)
    n = log_weight.shape[0]
    log_z = logsumexp(log_weight, axis=0) - jnp.log(n)
    return jnp.where(_valid(log_weight), log_z, jnp.nan)


@jax.jit
def log_normalizer_mcse(log_weight) -> jax.Array:
    """Monte Carlo standard error of ``log Zhat`` from one importance sample.

    By the delta method, ``se(log Zhat) ~= se(Zhat) / Zhat
    = sqrt(var(w) / N) / mean(w)``. With ``N Wbar_i = w_i / mean(w)`` (the
    normalised weights times ``N``) this is

        mcse = sqrt( sum_i (N Wbar_i - 1)^2 / ((N - 1) N) )
             = sqrt( (N / ESS - 1) / (N - 1) ),

    computed from ``expm1`` of log-space values, so neither large weights nor
    weights close to equal lose precision.

    The estimate needs independent, identically distributed weights: plain
    or annealed importance sampling, IWAE. It is *not* valid for the final
    weights of sequential Monte Carlo with resampling (the particles are
    dependent and ``log Zhat`` accumulates over steps); there the right error
    bar comes from independent runs, see :func:`log_normalizer_from_runs`.
    It is also unreliable when the weights have infinite variance
    (:func:`pareto_khat` above 0.5): then it typically underestimates the
    error.

    Args:
      log_weight: log importance weights, particles on axis 0.

    Returns:
      The standard error of ``log Zhat``, of shape ``log_weight.shape[1:]``;
      NaN for unusable columns and for a single particle.

    References:
      Owen, A. B. (2013). Monte Carlo theory, methods and examples, chapter 9
      (importance sampling). https://artowen.su.domains/mc/
    """
    log_weight = _as_particles(log_weight)
    n = log_weight.shape[0]
    # log(N Wbar_i) and N Wbar_i - 1, exact also for tiny deviations.
    log_scaled = log_weight - logsumexp(log_weight, axis=0) + jnp.log(n)
    deviation = jnp.expm1(log_scaled)
    variance = jnp.sum(deviation**2, axis=0) / (n - 1)
    mcse = jnp.sqrt(variance / n)
    return jnp.where(_valid(log_weight), mcse, jnp.nan)


class LogNormalizerEstimate(NamedTuple):
    """A pooled ``log Z`` estimate and its standard error.

    Attributes:
      log_Z: the log of the mean of the runs' ``Zhat``.
      mcse: its Monte Carlo standard error (delta method).
    """

    log_Z: jax.Array
    mcse: jax.Array


def log_normalizer_from_runs(log_Z_runs) -> LogNormalizerEstimate:
    """Pools independent runs' ``log Zhat`` into one estimate with an error bar.

    Each run (e.g. an SMC sampler with resampling, run with independent
    keys) gives an unbiased ``Zhat_r``; their mean is again unbiased, so the
    pooled estimate is ``log mean_r Zhat_r = logsumexp(log_Z_runs) - log R``,
    and its standard error follows from the spread of the ``Zhat_r`` by the
    delta method: ``sqrt(var(Zhat) / R) / mean(Zhat)``. The runs play the
    role of particles of :func:`log_normalizer_mcse`, which is exact here:
    the runs are independent even when each run's particles are not.

    Use at least a few tens of runs; when the runs' ``log Zhat`` spread by
    more than about 1 the error bar itself is unreliable.

    Args:
      log_Z_runs: the runs' log normaliser estimates on axis 0 (further
        axes are independent columns).

    Returns:
      A :class:`LogNormalizerEstimate` ``(log_Z, mcse)``.

    Example:
      >>> log_Z_runs = jnp.log(jnp.array([0.5, 1.5, 1.0, 1.0]))  # four runs
      >>> log_Z, mcse = log_normalizer_from_runs(log_Z_runs)
      >>> float(log_Z), float(mcse)  # log of the mean Zhat, sd(Zhat) / 2
      (0.0, 0.204)

    References:
      Del Moral, P. (2004). Feynman-Kac formulae: genealogical and
      interacting particle systems with applications. Springer (unbiasedness
      of the SMC estimate of Z).
    """
    return LogNormalizerEstimate(
        log_normalizer(log_Z_runs), log_normalizer_mcse(log_Z_runs)
    )


# ---------------------------------------------------------------------------
# Pareto k-hat.
# ---------------------------------------------------------------------------


def _tail_size(n: int, tail_fraction: float | None) -> int:
    """Tail length M: ``min(N / 5, 3 sqrt(N))`` (PSIS) or a given fraction."""
    if tail_fraction is None:
        return math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))
    if not 0.0 < tail_fraction < 1.0:
        raise ValueError(
            f"pareto_khat: tail_fraction must lie in (0, 1), got {tail_fraction!r}."
        )
    return math.ceil(tail_fraction * n)


def _gpd_shape(exceedances: jax.Array) -> jax.Array:
    """Zhang & Stephens' estimate of the GPD shape of sorted exceedances.

    The GPD with shape ``xi`` and scale ``sigma`` has density
    ``(1/sigma) (1 + xi x / sigma)^(-1/xi - 1)``. With ``theta = -xi / sigma``
    and ``k = -xi`` the log-likelihood is maximised over ``k`` in closed form,
    ``k(theta) = -mean(log(1 - theta x))``, leaving the profile
    log-likelihood ``l(theta) = M (log(theta / k(theta)) + k(theta) - 1)``.
    ``theta`` is estimated by its posterior mean over a grid of quantiles of
    Zhang & Stephens' data-dependent prior, and ``xi = -k(theta_hat)``.

    Args:
      exceedances: ``(M,)`` non-negative, ascending, largest positive.

    Returns:
      The estimated shape ``xi`` (before PSIS's prior adjustment).
    """
    m = exceedances.shape[0]
    x_max = exceedances[-1]
    # The first quartile, X_(floor(M/4 + 1/2)) (1-based order statistics).
    quartile = exceedances[max(math.floor(m / 4 + 0.5) - 1, 0)]
    # Ties at the threshold can make the quartile 0; use the smallest
    # positive exceedance instead (the grid needs a positive scale).
    smallest_positive = jnp.min(jnp.where(exceedances > 0, exceedances, jnp.inf))
    quartile = jnp.where(quartile > 0, quartile, smallest_positive)
    num_grid = _MIN_GRID_POINTS + math.floor(math.sqrt(m))
    j = jnp.arange(1, num_grid + 1, dtype=exceedances.dtype)
    # All grid points are < 1 / x_max, so 1 - theta x > 0 for every x.
    theta = 1.0 / x_max + (1.0 - jnp.sqrt(num_grid / (j - 0.5))) / (3.0 * quartile)
    k = -jnp.mean(jnp.log1p(-theta[:, None] * exceedances[None, :]), axis=1)
    # theta / k -> 1 / mean(x) as theta -> 0 (the exponential distribution).
    ratio = jnp.where(theta == 0, 1.0 / jnp.mean(exceedances), theta / k)
    profile_log_lik = m * (jnp.log(ratio) + k - 1.0)
    theta_hat = jnp.sum(jax.nn.softmax(profile_log_lik) * theta)
    return jnp.mean(jnp.log1p(-theta_hat * exceedances))


def _khat_of_column(tail_size: int, log_weight: jax.Array) -> jax.Array:
    """k-hat of one column ``(N,)`` of log weights."""
    largest, _ = jax.lax.top_k(log_weight, tail_size + 1)  # descending
    log_max, log_threshold = largest[0], largest[tail_size]
    log_tail = largest[:tail_size][::-1]  # ascending
    # (w_i - u) / w_max = (w_i / w_max) (1 - u / w_i), in log space.
    above = log_tail > log_threshold
    safe_tail = jnp.where(above, log_tail, log_max)
    exceedances = jnp.where(
        above,
        jnp.exp(safe_tail - log_max) * -jnp.expm1(log_threshold - safe_tail),
        0.0,
    )
    flat = exceedances[-1] <= 0  # the M + 1 largest weights are all equal
    safe = jnp.where(flat, jnp.linspace(0.0, 1.0, tail_size + 1)[1:], exceedances)
    xi = _gpd_shape(safe)
    khat = (tail_size * xi + _PRIOR_STRENGTH * _PRIOR_SHAPE) / (
        tail_size + _PRIOR_STRENGTH
    )
    return jnp.where(flat, -jnp.inf, khat)


@functools.partial(jax.jit, static_argnames="tail_fraction")
def pareto_khat(log_weight, tail_fraction: float | None = None) -> jax.Array:
    """Pareto k-hat: the estimated tail shape of the importance weights.

    The ``M`` largest weights' exceedances over the ``(M+1)``-th largest are
    fitted with a generalized Pareto distribution by the empirical-Bayes
    estimator of Zhang & Stephens (2009); the shape estimate is then shrunk
    towards 0.5 by PSIS's weakly informative prior,
    ``k = (M k + 10 * 0.5) / (M + 10)``. By default ``M = ceil(min(N / 5,
    3 sqrt(N)))`` (Vehtari et al.'s rule). The estimate does not depend on
    the scale of the weights (adding a constant to ``log_weight``).

    ``1 / k`` estimates how many moments the weights have: for ``k < 0.5``
    their variance is finite and the ESS and :func:`log_normalizer_mcse` are
    meaningful. Bounded weights give ``k < 0``, down to about -2 (shrunk to
    about -1.5 by the prior) when the weight function has a smooth maximum.
    Vehtari et al.'s thresholds (for Pareto-smoothed IS; the raw weights
    here already have infinite variance above 0.5):

    - ``k < 0.5``: good.
    - ``0.5 <= k < 0.7``: ok for PSIS; raw importance sampling converges
      slowly and its error estimates are too small.
    - ``k > 0.7``, or above the sample-size threshold
      ``min(1 - 1 / log10(N), 0.7)`` (:func:`pareto_khat_threshold`):
      unreliable; more particles will not help in practice, improve the
      proposal.

    Args:
      log_weight: log importance weights, particles on axis 0.
      tail_fraction: static; fit the ``ceil(tail_fraction * N)`` largest
        weights instead of the default tail size (must lie in (0, 1)).

    Returns:
      k-hat, of shape ``log_weight.shape[1:]``; NaN for unusable columns or
      fewer than 2 tail points (N < 6 by default); ``-inf`` when the
      ``M + 1`` largest weights are all equal (no tail, e.g. after
      resampling).

    Raises:
      ValueError: when ``tail_fraction`` is outside (0, 1).

    Example:
      >>> log_weight = jnp.log(jnp.linspace(0.1, 1.0, 100))  # bounded weights
      >>> k = pareto_khat(log_weight)
      >>> bool(k < 0.5), bool(k < pareto_khat_threshold(100))
      (True, True)

    References:
      Vehtari, A., Simpson, D., Gelman, A., Yao, Y. and Gabry, J. (2024).
      Pareto smoothed importance sampling. Journal of Machine Learning
      Research 25(72), 1-58. https://arxiv.org/abs/1507.02646
      Zhang, J. and Stephens, M. A. (2009). A new and efficient estimation
      method for the generalized Pareto distribution. Technometrics 51(3),
      316-325.
    """
    log_weight = _as_particles(log_weight)
    n = log_weight.shape[0]
    tail_size = _tail_size(n, tail_fraction)
    if tail_size < 2 or tail_size + 1 > n:
        return jnp.full(log_weight.shape[1:], jnp.nan, dtype=log_weight.dtype)
    khat = _per_column(lambda c: _khat_of_column(tail_size, c), log_weight)
    return jnp.where(_valid(log_weight), khat, jnp.nan)


def pareto_khat_threshold(num_particles: int) -> float:
    """Largest k-hat for which ``num_particles`` weights can be trusted.

    ``min(1 - 1 / log10(N), 0.7)`` (Vehtari et al. 2024, section 3.2.4):
    below it the Pareto-smoothed estimate's error is small with high
    probability; fewer particles tolerate only lighter tails (``N = 100``:
    0.5; ``N <= 10``: nothing).

    Args:
      num_particles: the number of particles ``N``.

    Returns:
      The threshold (``-inf`` for ``N <= 1``).
    """
    if num_particles <= 1:
        return -math.inf
    return min(1.0 - 1.0 / math.log10(num_particles), 0.7)


def _verdict(pareto_k: float, num_particles: int) -> str:
    if math.isnan(pareto_k):
        return "nan"
    if pareto_k > pareto_khat_threshold(num_particles):
        return "unreliable"
    return "good" if pareto_k < 0.5 else "ok"


# ---------------------------------------------------------------------------
# Summary record.
# ---------------------------------------------------------------------------

_SUMMARY_FIELDS = ("ess", "relative_ess", "log_Z", "log_Z_mcse", "pareto_k")


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """Scalar diagnostics of a set of importance weights.

    Columns (trailing axes of the log weights) are combined as the
    :class:`~combinators.metrics.Metrics` record does: ESS averaged,
    ``log_Z`` summed (independent problems), ``log_Z_mcse`` combined in
    quadrature, and the worst (largest) k-hat reported.

    Attributes:
      num_particles: the number of particles ``N`` (static).
      ess: Kish's effective sample size, see :func:`effective_sample_size`.
      relative_ess: ``ess / num_particles``.
      log_Z: the estimate of log Z, see :func:`log_normalizer`.
      log_Z_mcse: its Monte Carlo standard error, see
        :func:`log_normalizer_mcse` (not valid after SMC resampling).
      pareto_k: Pareto k-hat, see :func:`pareto_khat`.
    """

    num_particles: int
    ess: Any
    relative_ess: Any
    log_Z: Any
    log_Z_mcse: Any
    pareto_k: Any

    @property
    def pareto_k_threshold(self) -> float:
        """``min(1 - 1/log10(N), 0.7)``, see :func:`pareto_khat_threshold`."""
        return pareto_khat_threshold(self.num_particles)

    @property
    def verdict(self) -> str:
        """One word on k-hat, "good", "ok", "unreliable" or "nan".

        "unreliable" above :attr:`pareto_k_threshold`, else "good" below 0.5
        and "ok" otherwise; "nan" when the weights are not finite.
        """
        return _verdict(float(self.pareto_k), self.num_particles)

    def to_dict(self) -> dict[str, float]:
        """The fields as Python numbers (``num_particles`` an int)."""
        out: dict[str, float] = {"num_particles": self.num_particles}
        for name in _SUMMARY_FIELDS:
            out[name] = float(getattr(self, name))
        return out

    def _rows(self) -> list[tuple[str, str, str]]:
        values = self.to_dict()
        notes = {
            "relative_ess": "ess / num_particles",
            "log_Z_mcse": "delta method; not valid after resampling",
            "pareto_k": (
                f"{self.verdict} (unreliable above {self.pareto_k_threshold:.2f})"
            ),
        }
        rows = [("num_particles", str(self.num_particles), "")]
        for name in _SUMMARY_FIELDS:
            rows.append((name, f"{values[name]:.6g}", notes.get(name, "")))
        return rows

    def __str__(self) -> str:
        lines = ["Diagnostics"]
        for name, value, note in self._rows():
            line = f"  {name:<14}{value:>12}"
            lines.append(f"{line}   {note}" if note else line)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td>{html.escape(name)}</td>"
            f"<td style='text-align:right'>{html.escape(value)}</td>"
            f"<td>{html.escape(note)}</td></tr>"
            for name, value, note in self._rows()
        )
        return (
            "<table><thead><tr><th>Diagnostics</th><th>value</th><th></th>"
            f"</tr></thead><tbody>{cells}</tbody></table>"
        )


jax.tree_util.register_dataclass(
    Diagnostics, data_fields=list(_SUMMARY_FIELDS), meta_fields=["num_particles"]
)


def summary(metrics_or_log_weight, *, print_: bool = False) -> Diagnostics:
    """Scalar diagnostics of a program's weights as a printable record.

    Args:
      metrics_or_log_weight: a :class:`~combinators.metrics.Metrics` record
        (or a Coix-style dict with a ``"log_weight"`` entry) or an array of
        log weights with particles on axis 0.
      print_: also print the table (eager use only, not under ``jit``).

    Returns:
      A :class:`Diagnostics` record (a pytree, so ``summary`` can be
      ``jit``-ed on an array). Non-finite weights give NaN fields and the
      verdict "nan"; nothing raises.

    Raises:
      ValueError: when a metrics record has no log weights.

    Example:
      >>> log_weight = jnp.log(jnp.linspace(0.1, 1.0, 100))
      >>> diagnostics = summary(log_weight, print_=True)
      Diagnostics
        num_particles          100
        ess                81.4566
        relative_ess      0.814565   ess / num_particles
        log_Z            -0.597837
        log_Z_mcse       0.0479529   delta method; not valid after resampling
        pareto_k          -0.40265   good (unreliable above 0.50)
      >>> diagnostics.verdict
      'good'
    """
    log_weight = metrics_or_log_weight
    if isinstance(metrics_or_log_weight, Mapping):
        log_weight = metrics_or_log_weight.get("log_weight")
        if log_weight is None:
            raise ValueError(
                "summary: the metrics record has no 'log_weight' to diagnose."
            )
    result = _summarize(_as_particles(log_weight))
    if print_:
        print(result)
    return result


@jax.jit
def _summarize(log_weight: jax.Array) -> Diagnostics:
    """The fields of :func:`summary`, compiled as one program."""
    n = log_weight.shape[0]
    ess = jnp.mean(effective_sample_size(log_weight))
    return Diagnostics(
        num_particles=n,
        ess=ess,
        relative_ess=ess / n,
        log_Z=jnp.sum(log_normalizer(log_weight)),
        log_Z_mcse=jnp.sqrt(jnp.sum(log_normalizer_mcse(log_weight) ** 2)),
        pareto_k=jnp.max(pareto_khat(log_weight)),
    )
