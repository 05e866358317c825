"""Tracing programs with numpyro effect handlers.

This is the only module that talks to numpyro's handler stack. It turns a
program into ``(out, trace, metrics)`` (:func:`traced_evaluate`), turns such a
triple back into a program (:func:`empirical`), and provides the program
transforms ``suffix``, ``detach`` and ``stick_the_landing``.

Metadata travels with each sample message in ``msg["infer"]`` under private
keys: the generation depth (incremented by :func:`suffix`), the auxiliary
flag (set by ``extend``) and, for sites replayed by :func:`empirical`, the
original :class:`~combinators.trace.Site`. Site names are never rewritten.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.primitives import Messenger, apply_stack

from combinators import keys as _keys
from combinators import weights
from combinators.metrics import Metrics
from combinators.trace import Plate, Site, Trace

__all__ = [
    "Evaluation",
    "detach",
    "empirical",
    "evaluate",
    "stick_the_landing",
    "suffix",
    "traced_evaluate",
]

_DEPTH = "combinators.depth"
_AUXILIARY = "combinators.auxiliary"
_REPLAY = "combinators.replay"
_SUBSTITUTED = "combinators.substituted"
_METRICS = "combinators.metrics"


def check_callable(where: str, **programs: Any) -> None:
    """Raises a ``TypeError`` naming the combinator for non-callable programs."""
    for name, program in programs.items():
        if not callable(program):
            raise TypeError(
                f"{where}: argument {name!r} must be a program (a callable), "
                f"got {type(program).__name__}: {program!r}."
            )


def _with_infer(msg, **entries) -> None:
    msg["infer"] = {**(msg.get("infer") or {}), **entries}


# ---------------------------------------------------------------------------
# Distribution wrapper for detach / stick_the_landing.
# ---------------------------------------------------------------------------


class _StopGradient(dist.Distribution):
    """Stops gradients through the sample or through the parameters."""

    def __init__(self, base_dist, detach_sample=False, detach_params=False):
        self.base_dist = base_dist
        self.detach_sample = detach_sample
        self.detach_params = detach_params
        super().__init__(base_dist.batch_shape, base_dist.event_shape)

    @property
    def support(self):
        return self.base_dist.support

    @property
    def has_rsample(self):
        return self.base_dist.has_rsample

    def sample(self, key, sample_shape=()):
        value = self.base_dist.sample(key, sample_shape)
        return jax.lax.stop_gradient(value) if self.detach_sample else value

    def log_prob(self, value):
        base = self.base_dist
        if self.detach_params:
            base = jax.lax.stop_gradient(base)
        return base.log_prob(value)

    def tree_flatten(self):
        leaves, treedef = jax.tree_util.tree_flatten(self.base_dist)
        return leaves, (treedef, self.detach_sample, self.detach_params)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        treedef, detach_sample, detach_params = aux
        base = jax.tree_util.tree_unflatten(treedef, leaves)
        return cls(base, detach_sample=detach_sample, detach_params=detach_params)


def _base_distribution(fn):
    while True:
        inner = getattr(fn, "base_dist", None)
        if inner is None:
            return fn
        fn = inner


# ---------------------------------------------------------------------------
# Program transforms.
# ---------------------------------------------------------------------------


class suffix(Messenger):  # noqa: N801 (Coix's name for the transform)
    """Marks every site of a program as one generation older.

    ``compose(q2, q1)`` runs ``q1`` under this transform, so that a site that
    ``q2`` samples again supersedes ``q1``'s value instead of clashing with
    it. The site keeps its name; its generation is recorded in the trace.
    """

    def process_message(self, msg):
        if msg["type"] == "sample":
            _with_infer(msg, **{_DEPTH: msg.get("infer", {}).get(_DEPTH, 0) + 1})


class auxiliary(Messenger):  # noqa: N801
    """Marks the sites of a program as auxiliary (the kernel of ``extend``)."""

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        infer = msg.get("infer") or {}
        replay = infer.get(_REPLAY)
        if replay is not None:
            _with_infer(msg, **{_REPLAY: replay.replace(auxiliary=True)})
        _with_infer(msg, **{_AUXILIARY: True})


class detach(Messenger):  # noqa: N801
    """Stops gradients through the values of a program's latent sites.

    The log densities still depend on the parameters, so the program gives
    score-function (REINFORCE-style) gradients, as reweighted wake-sleep and
    the nested-VI objectives need.
    """

    def process_message(self, msg):
        if msg["type"] != "sample" or msg.get("is_observed", False):
            return
        replay = (msg.get("infer") or {}).get(_REPLAY)
        if replay is not None:
            _with_infer(
                msg,
                **{_REPLAY: replay.replace(value=jax.lax.stop_gradient(replay.value))},
            )
        else:
            msg["fn"] = _StopGradient(msg["fn"], detach_sample=True)


class stick_the_landing(Messenger):  # noqa: N801
    """Stops gradients through distribution parameters inside log densities.

    Gives the sticking-the-landing estimator of Roeder, Wu & Duvenaud (2017),
    "Sticking the Landing: Simple, Lower-Variance Gradient Estimators for
    Variational Inference", https://arxiv.org/abs/1703.09194: the pathwise
    gradient of ``log q(z)`` flows only through ``z``.
    """

    def process_message(self, msg):
        if msg["type"] != "sample" or msg.get("is_observed", False):
            return
        if (msg.get("infer") or {}).get(_REPLAY) is None:
            msg["fn"] = _StopGradient(msg["fn"], detach_params=True)


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


class Evaluation(NamedTuple):
    """Everything one traced evaluation of a program produced.

    Attributes:
      out: the program's return value.
      trace: its sites.
      metrics: metrics emitted by a combinator inside the program, or ``None``
        for a plain (unweighted) program.
      substituted: maps ``(name, generation)`` of each site whose value was
        given through ``latents`` to the latents key ``(name, depth)`` it took.
    """

    out: Any
    trace: Trace
    metrics: Metrics | None
    substituted: Mapping


class _Substitute(Messenger):
    """Replaces values of latent sites, matched by name and generation."""

    def __init__(self, fn, latents, where):
        self.latents = latents
        self.where = where
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        infer = msg.get("infer") or {}
        key = (msg["name"], infer.get(_DEPTH, 0))
        if key not in self.latents:
            return
        name = msg["name"]
        if msg.get("is_observed", False):
            raise ValueError(
                f"{self.where}: the proposal samples a latent site {name!r} that "
                f"the target observes; a site is either observed or latent. "
                f"Rename the proposal's site or drop `obs=` in the target."
            )
        if infer.get(_REPLAY) is not None:
            raise ValueError(
                f"{self.where}: site {name!r} of the target is a replayed sample "
                f"of a weighted program (the output of propose/resample/"
                f"fori_loop); a target must score its sites, so pass the "
                f"unweighted target program instead."
            )
        value = self.latents[key]
        expected = tuple(msg["fn"].batch_shape) + tuple(msg["fn"].event_shape)
        try:
            jnp.broadcast_shapes(jnp.shape(value), expected)
        except ValueError:
            frames = [(f.name, f.size, f.dim) for f in msg["cond_indep_stack"]]
            raise ValueError(
                f"{self.where}: site {name!r}: the proposal's value has shape "
                f"{tuple(jnp.shape(value))} but the target's distribution has "
                f"shape {expected} (target plates {frames}); the particle sizes "
                f"of the target and the proposal disagree."
            ) from None
        msg["value"] = value
        _with_infer(msg, **{_SUBSTITUTED: True})


def _site_from_message(msg) -> Site:
    fn = msg["fn"]
    value = msg["value"]
    log_prob = fn.log_prob(value)
    mask = msg.get("mask")
    if mask is not None:
        log_prob = jnp.where(mask, log_prob, 0.0)
    scale = msg.get("scale")
    if scale is not None:
        log_prob = scale * log_prob
    event_dim = fn.event_dim
    value_batch = jnp.shape(value)[: max(jnp.ndim(value) - event_dim, 0)]
    log_prob = jnp.broadcast_to(
        log_prob, jnp.broadcast_shapes(jnp.shape(log_prob), value_batch)
    )
    base = _base_distribution(fn)
    plates = tuple(
        Plate(f.name, int(f.size), int(f.dim))
        for f in sorted(msg["cond_indep_stack"], key=lambda f: f.dim)
    )
    return Site(
        value=value,
        log_prob=log_prob,
        observed=bool(msg.get("is_observed", False)),
        event_dim=int(event_dim),
        plates=plates,
        auxiliary=bool((msg.get("infer") or {}).get(_AUXILIARY, False)),
        reparameterized=bool(fn.has_rsample) or isinstance(base, dist.Unit),
        deterministic=isinstance(base, dist.Delta),
    )


class _Recorder(Messenger):
    """Records sample sites and emitted metrics of one evaluation."""

    def __init__(self, fn, where):
        self.where = where
        self.records: list[tuple[str, int, Site, bool]] = []
        self.metrics: list[Metrics] = []
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["value"] is not None:
            return
        if msg.get("is_observed", False) or _REPLAY in (msg.get("infer") or {}):
            return
        if msg["kwargs"].get("rng_key") is None:
            raise ValueError(
                f"{self.where}: site {msg['name']!r} needs a PRNG key to draw a "
                f"sample and none was given; {_keys.HOW_TO_PASS_A_KEY}."
            )

    def postprocess_message(self, msg):
        if msg["type"] == _METRICS:
            self.metrics.append(msg["value"])
            return
        if msg["type"] != "sample":
            return
        infer = msg.get("infer") or {}
        replay = infer.get(_REPLAY)
        if replay is not None:
            declared = {frame.name for frame in replay.plates}
            for frame in msg.get("cond_indep_stack", ()):
                if frame.name not in declared:
                    raise ValueError(
                        f"{self.where}: plate {frame.name!r} wraps the output of a "
                        f"combinator at site {msg['name']!r}; a combinator's "
                        f"programs run in their own scope, so declare the plate "
                        f"inside the programs given to it (e.g. "
                        f"propose(plate(p), plate(q)))."
                    )
        site = replay if replay is not None else _site_from_message(msg)
        if infer.get(_AUXILIARY, False) and not site.auxiliary:
            site = site.replace(auxiliary=True)
        self.records.append(
            (msg["name"], infer.get(_DEPTH, 0), site, infer.get(_SUBSTITUTED, False))
        )


def _normalise(records, where) -> tuple[Trace, dict]:
    """Orders each name's sites by depth into generations, newest first."""
    by_name: dict[str, list[tuple[int, Site, bool]]] = {}
    for name, depth, site, substituted in records:
        by_name.setdefault(name, []).append((depth, site, substituted))
    histories = {}
    substituted = {}
    for name, entries in by_name.items():
        entries.sort(key=lambda e: e[0])
        depths = [e[0] for e in entries]
        if len(set(depths)) != len(depths):
            raise ValueError(
                f"{where}: duplicate site name {name!r}; every sample statement "
                f"of a program needs a unique name (use numpyro.handlers.scope "
                f"to prefix the names of a repeated sub-program)."
            )
        histories[name] = tuple(e[1] for e in entries)
        substituted.update(
            {(name, g): (name, e[0]) for g, e in enumerate(entries) if e[2]}
        )
    return Trace(histories), substituted


def evaluate(
    program: Callable,
    latents: Mapping | None = None,
    seed=None,
    where: str = "traced_evaluate",
) -> Callable[..., Evaluation]:
    """Internal traced evaluation; see :func:`traced_evaluate`.

    Args:
      program: the program.
      latents: values to substitute, keyed by ``(name, generation)``.
      seed: a PRNG key for the program's sample statements; if ``None``, a key
        is drawn from an enclosing seed handler when there is one.
      where: the combinator name used in error messages.

    Returns:
      A function of the program's arguments returning an :class:`Evaluation`.
    """
    check_callable(where, program=program)
    latents = dict(latents or {})

    def run(*args, **kwargs) -> Evaluation:
        inner = _Substitute(program, latents, where) if latents else program
        if seed is not None:
            inner = handlers.seed(inner, rng_seed=seed)
        else:
            parent = _keys.enclosing_seed()
            if parent is not None:
                inner = _keys.lazy_seed(inner, parent)
        recorder = _Recorder(inner, where)
        with handlers.block():
            out = recorder(*args, **kwargs)
        trace, substituted = _normalise(recorder.records, where)
        return Evaluation(
            out, trace, combine_metrics(recorder.metrics, trace), substituted
        )

    return run


def combine_metrics(records: list[Metrics], trace: Trace) -> Metrics | None:
    """Metrics of a program that runs several weighted programs in sequence.

    Weights multiply (log weights add): if ``(x, w1)`` is properly weighted
    for ``gamma1(x)`` and, given ``x``, ``(y, w2)`` is properly weighted for
    ``gamma2(y | x)``, then ``(x, y, w1 w2)`` is properly weighted for
    ``gamma1(x) gamma2(y | x)`` (nested importance sampling; Naesseth,
    Lindsten & Schön 2015, https://arxiv.org/abs/1502.02536). This is how
    ``compose(propose(p_t, k_t), resample(q))`` adds one SMC step at O(N)
    cost. Losses and log densities add; ``resampled`` is True if any part
    resampled.

    Args:
      records: the metrics emitted during one evaluation, in order.
      trace: the evaluation's trace (its plates give the weights' layout).

    Returns:
      ``None`` for no records, the record itself for one, else the product.
    """
    if not records:
        return None
    if len(records) == 1:
        return records[0]
    layout = weights.layout_of(trace)
    log_weight = sum(weights.reduce_to_layout(m.log_weight, layout) for m in records)
    extras: dict = {}
    for m in records:
        extras.update(m.extras)
    return metrics_from_log_weight(
        log_weight,
        loss=sum(m.loss for m in records),
        log_density=sum(m.log_density for m in records),
        extras=extras,
        resampled=jnp.any(jnp.stack([jnp.asarray(m.resampled) for m in records])),
    )


def default_metrics(trace: Trace) -> Metrics:
    """Metrics of an unweighted program: weights from its observed sites."""
    sites = [site for _, _, site in trace.generations()]
    layout = weights.layout_of(sites)
    log_weight = weights.trace_log_prob([s for s in sites if s.observed], layout)
    return metrics_from_log_weight(
        log_weight,
        loss=jnp.zeros(()),
        log_density=_mean_log_density(sites, layout),
    )


def _mean_log_density(sites, layout):
    total = weights.trace_log_prob(sites, layout)
    if total.ndim == 0:
        return total
    return jnp.sum(jnp.mean(total, axis=0))


def metrics_from_log_weight(
    log_weight, *, loss, log_density, extras=None, resampled=False
) -> Metrics:
    """The fixed metrics record for the given log weights."""
    return Metrics(
        log_weight=log_weight,
        ess=weights.effective_sample_size(log_weight),
        log_Z=weights.log_normalizer(log_weight),
        loss=jnp.asarray(loss, dtype=jnp.result_type(float)),
        log_density=jnp.asarray(log_density),
        extras=dict(extras or {}),
        resampled=jnp.asarray(resampled, dtype=bool),
    )


def traced_evaluate(program: Callable, latents: Mapping | None = None, seed=None):
    """Runs a program and records its return value, trace and metrics.

    Args:
      program: a program (a function using numpyro primitives).
      latents: optional ``{name: value}`` to substitute for latent sites.
      seed: a PRNG key (``jax.random.key(0)``) for the sample statements. If
        omitted, a key is drawn from an enclosing ``numpyro.handlers.seed``;
        with neither, sample statements without ``rng_key`` raise a
        ``ValueError`` that says how to pass one.

    Returns:
      A function of the program's arguments returning ``(out, trace,
      metrics)``: a :class:`~combinators.trace.Trace` and a
      :class:`~combinators.metrics.Metrics` record. An unweighted program's
      log weight is the log density of its observed sites.

    Example:
      >>> out, trace, metrics = traced_evaluate(program, seed=jax.random.key(0))(x)
    """
    latents = {(name, 0): value for name, value in (latents or {}).items()}
    run = evaluate(program, latents, seed, where="traced_evaluate")

    def wrapped(*args, **kwargs):
        result = run(*args, **kwargs)
        metrics = result.metrics
        if metrics is None:
            metrics = default_metrics(result.trace)
        return result.out, result.trace, metrics

    return wrapped


def emit_metrics(metrics: Metrics) -> None:
    """Hands a metrics record to the enclosing tracer, if any."""
    msg = {
        "type": _METRICS,
        "name": _METRICS,
        "fn": lambda: metrics,
        "args": (),
        "kwargs": {},
        "value": metrics,
        "infer": {},
        "cond_indep_stack": [],
    }
    apply_stack(msg)


def empirical(out, trace: Trace, metrics: Metrics | None):
    """A program that replays ``out``, ``trace`` and ``metrics``.

    Under :func:`traced_evaluate` it yields the same sites (values, log
    densities, roles and generations) and metrics; called directly it just
    returns ``out``. Combinators return such programs, which is why they
    nest.

    Args:
      out: the return value to reproduce.
      trace: the sites to replay.
      metrics: the metrics to emit (``None`` for an unweighted program).

    Returns:
      A program that ignores its arguments.
    """
    if not isinstance(trace, Trace):
        trace = _coerce_trace(trace)

    def replay(*args, **kwargs):
        del args, kwargs
        for name, generation, site in trace.generations():
            numpyro.sample(
                name,
                dist.Delta(
                    site.value,
                    site.log_prob,
                    event_dim=site.event_dim,
                    validate_args=False,
                ),
                obs=site.value if site.observed else None,
                # A point mass needs no randomness: a fixed key spares the
                # seed handler a key split per replayed site.
                rng_key=np.zeros(2, np.uint32),
                infer={_REPLAY: site, _DEPTH: generation},
            )
        if metrics is not None:
            emit_metrics(metrics)
        return out

    return replay


def _coerce_trace(trace) -> Trace:
    """Accepts Coix-style ``{name: {"value", "log_prob"}}`` dicts."""
    if isinstance(trace, Mapping):
        sites = {}
        for name, site in trace.items():
            if isinstance(site, Site):
                sites[name] = site
            else:
                value = site["value"]
                sites[name] = Site(
                    value=value,
                    log_prob=site["log_prob"],
                    observed="is_observed" in site,
                    event_dim=int(jnp.ndim(site.get("_event_dim_holder", 0.0))),
                )
        return Trace.from_sites(sites)
    raise TypeError(f"empirical: expected a Trace, got {type(trace).__name__}.")
