"""Evaluating programs: program <-> (out, Trace, Metrics).

:func:`traced_evaluate` runs a program under numpyro effect handlers and
records its return value, its :class:`~combinators.core.trace.Trace` and its
:class:`~combinators.core.metrics.Metrics`; :func:`empirical` turns such a
triple back into a program. Every combinator is built on these two arrows.
Site metadata travels in the sample messages (see
:mod:`combinators.core.messages`); site names are never rewritten.
"""

from __future__ import annotations

import inspect as pyinspect
import traceback as pytraceback
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.primitives import Messenger

from combinators import weights
from combinators.core import keys as _keys
from combinators.core import messages
from combinators.core.metrics import Metrics
from combinators.core.sites import site_from_message
from combinators.core.trace import Site, Trace
from combinators.core.transforms import base_distribution

__all__ = [
    "DistributionNotes",
    "Evaluation",
    "check_callable",
    "coerce_trace",
    "combine_metrics",
    "default_metrics",
    "empirical",
    "evaluate",
    "mean_log_density",
    "metrics_from_log_weight",
    "traced_evaluate",
]


def check_callable(where: str, **programs: Any) -> None:
    """Raises a ``TypeError`` naming the combinator for non-callable programs."""
    for name, program in programs.items():
        if hasattr(program, "lower") and hasattr(program, "eval_shape"):
            raise TypeError(
                f"{where}: argument {name!r} is a jax.jit-compiled function; "
                f"numpyro's effects cannot reach inside it. Pass the plain "
                f"program and jit the evaluation instead, e.g. "
                f"jax.jit(traced_evaluate(program, seed=key))."
            )
        if not callable(program):
            raise TypeError(
                f"{where}: argument {name!r} must be a program (a callable), "
                f"got {type(program).__name__}: {program!r}."
            )


class Evaluation(NamedTuple):
    """Everything one traced evaluation of a program produced.

    Attributes:
      out: the program's return value.
      trace: its sites.
      metrics: metrics emitted by a combinator inside the program, or ``None``
        for a plain (unweighted) program.
      substituted: maps ``(name, generation)`` of each site whose value was
        given through ``latents`` to the latents key it took (the proposal's
        ``(name, generation)``).
    """

    out: Any
    trace: Trace
    metrics: Metrics | None
    substituted: Mapping


class _Substitute(Messenger):
    """Replaces values of latent sites, matched by name and generation."""

    def __init__(self, fn, latents, where, auxiliary_latents=None):
        self.latents = latents
        self.auxiliary_latents = auxiliary_latents or {}
        self.where = where
        super().__init__(fn)

    def _source(self, msg):
        """The latents key that gives this site its value, or ``None``."""
        key = (msg["name"], messages.depth(msg))
        if key in self.latents:
            return key
        if messages.is_auxiliary(msg) and key in self.auxiliary_latents:
            # A reverse kernel scores the value the proposal held at that
            # depth, also when no later kernel re-sampled it (then it is the
            # newest generation of its name).
            return self.auxiliary_latents[key]
        return None

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        key = self._source(msg)
        if key is None:
            return
        name = msg["name"]
        if msg.get("is_observed", False):
            raise ValueError(
                f"{self.where}: the proposal samples a latent site {name!r} that "
                f"the target observes; a site is either observed or latent. "
                f"Rename the proposal's site or drop `obs=` in the target."
            )
        if messages.replayed_site(msg) is not None:
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
        messages.with_infer(msg, **{messages.SUBSTITUTED: key})


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
        if msg.get("is_observed", False) or messages.replayed_site(msg) is not None:
            return
        if msg["kwargs"].get("rng_key") is None:
            raise ValueError(
                f"{self.where}: site {msg['name']!r} needs a PRNG key to draw a "
                f"sample and none was given; {_keys.HOW_TO_PASS_A_KEY}."
            )

    def postprocess_message(self, msg):
        if msg["type"] == messages.METRICS:
            self.metrics.append(msg["value"])
            return
        if msg["type"] != "sample":
            return
        replay = messages.replayed_site(msg)
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
        site = replay if replay is not None else site_from_message(msg, self.where)
        if messages.is_auxiliary(msg) and not site.auxiliary:
            site = site.replace(auxiliary=True)
        self.records.append(
            (msg["name"], messages.depth(msg), site, messages.substituted_from(msg))
        )


def _normalize(records, where) -> tuple[Trace, dict]:
    """Orders each name's sites by depth into generations, newest first."""
    by_name: dict[str, list[tuple[int, Site, Any]]] = {}
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
        histories[name] = tuple(
            site if site.depth == depth else site.replace(depth=depth)
            for depth, site, _ in entries
        )
        substituted.update(
            {(name, g): e[2] for g, e in enumerate(entries) if e[2] is not None}
        )
    return Trace(histories), substituted


def _check_arguments(where: str, program: Callable, args, kwargs) -> None:
    """A plain function called with arguments it cannot take raises here."""
    if not isinstance(program, types.FunctionType):
        return
    try:
        pyinspect.signature(program).bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(
            f"{where}: program {program.__name__!r} cannot be called with "
            f"{len(args)} positional argument(s) and keywords {sorted(kwargs)}: "
            f"{err}."
        ) from None


def _through_numpyro(err: BaseException) -> bool:
    """Whether ``err`` was raised inside numpyro's code (or code it called)."""
    frames = pytraceback.extract_tb(err.__traceback__)
    return any("/numpyro/" in frame.filename for frame in frames)


def _run_program(where: str, recorder, args, kwargs):
    """Runs the program; numpyro's bare plate errors get context."""
    try:
        return recorder(*args, **kwargs)
    except AssertionError as err:
        if not _through_numpyro(err):
            raise
        detail = str(err) or "two plates were given the same dim"
        raise ValueError(
            f"{where}: numpyro rejected a plate of the program ({detail}); every "
            f"plate needs a positive size (at least one particle) and nested "
            f"plates need distinct dims."
        ) from None
    except ValueError as err:
        message = str(err)
        if (
            "Incompatible shapes" not in message
            or "does not fit its plates" in message
            or not _through_numpyro(err)
        ):
            raise
        raise ValueError(
            f"{where}: a sample site's batch shape does not fit its plates ({err}); "
            f"a plate of size n at dim d needs the distribution's batch shape to "
            f"be n or 1 at d."
        ) from None


def evaluate(
    program: Callable,
    latents: Mapping | None = None,
    seed=None,
    where: str = "traced_evaluate",
    auxiliary_latents: Mapping | None = None,
) -> Callable[..., Evaluation]:
    """Internal traced evaluation; see :func:`traced_evaluate`.

    Args:
      program: the program.
      latents: values to substitute, keyed by ``(name, generation)``.
      seed: a PRNG key for the program's sample statements; if ``None``, a key
        is drawn from an enclosing seed handler when there is one.
      where: the combinator name used in error messages.
      auxiliary_latents: for auxiliary (``extend``) sites not matched by
        ``latents``: ``{(name, depth): latents key}``, the proposal's site
        at the same depth.

    Returns:
      A function of the program's arguments returning an :class:`Evaluation`.
    """
    check_callable(where, program=program)
    _keys.check_seed(where, seed)
    latents = dict(latents or {})

    def run(*args, **kwargs) -> Evaluation:
        inner = (
            _Substitute(program, latents, where, auxiliary_latents)
            if latents
            else program
        )
        if seed is not None:
            inner = _keys.key_stream(inner, seed)
        else:
            parent = _keys.enclosing_seed()
            if parent is not None:
                inner = _keys.lazy_seed(inner, parent)
        recorder = _Recorder(inner, where)
        _check_arguments(where, program, args, kwargs)
        with handlers.block():
            out = _run_program(where, recorder, args, kwargs)
        trace, substituted = _normalize(recorder.records, where)
        return Evaluation(
            out, trace, combine_metrics(recorder.metrics, trace, where), substituted
        )

    return run


def combine_metrics(
    records: list[Metrics], trace: Trace, where: str = "compose"
) -> Metrics | None:
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
      where: the combinator named in errors.

    Returns:
      ``None`` for no records, the record itself for one, else the product.
    """
    if not records:
        return None
    layout = weights.layout_of(trace, where=where)  # checks the plates agree
    if len(records) == 1:
        return records[0]
    log_weight = sum(
        weights.reduce_to_layout(m.log_weight, layout, where=where) for m in records
    )
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


def default_metrics(trace: Trace, where: str = "traced_evaluate") -> Metrics:
    """Metrics of an unweighted program: weights from its observed sites.

    ``where`` names the caller in a layout error, which also names the site.
    """
    sites = [site for _, _, site in trace.generations()]
    layout = weights.layout_of(trace, where=where)
    log_weight = weights.trace_log_prob([s for s in sites if s.observed], layout)
    return metrics_from_log_weight(
        log_weight,
        loss=jnp.zeros(()),
        log_density=mean_log_density(sites, layout),
    )


def mean_log_density(sites, layout):
    """Mean over particles of the sites' summed log densities."""
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
        ess=weights.mean_effective_sample_size(log_weight),
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
      seed: a PRNG key (``jax.random.key(0)``) for the sample statements,
        which take their keys from it eight per split
        (:class:`~combinators.core.keys.key_stream`: the same distribution
        as ``numpyro.handlers.seed``, different values). If omitted, a key
        is drawn from an enclosing seed handler; with neither, sample
        statements without ``rng_key`` raise a ``ValueError`` that says how
        to pass one.

    Returns:
      A function of the program's arguments returning ``(out, trace,
      metrics)``: a :class:`~combinators.trace.Trace` and a
      :class:`~combinators.metrics.Metrics` record. An unweighted program's
      log weight is the log density of its observed sites.

    Example:
      >>> def model(x):
      ...     with numpyro.plate("particles", 3):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
      ...     return (z,)
      >>> out, trace, metrics = traced_evaluate(model, seed=jax.random.key(0))(0.5)
      >>> out[0].shape, sorted(trace), metrics.log_weight.shape
      ((3,), ['x', 'z'], (3,))
      >>> bool(jnp.allclose(metrics.log_weight, trace["x"].log_prob))  # log p(x | z)
      True
    """
    given = dict(latents or {})
    latents = {(name, 0): value for name, value in given.items()}
    run = evaluate(program, latents, seed, where="traced_evaluate")

    def wrapped(*args, **kwargs):
        result = run(*args, **kwargs)
        unknown = set(given) - {name for name, _ in result.substituted}
        if unknown:
            latent_names = sorted(n for n, s in result.trace.items() if not s.observed)
            raise ValueError(
                f"traced_evaluate: latents={sorted(unknown)} name no latent site "
                f"of the program (its latent sites: {latent_names})."
            )
        metrics = result.metrics
        if metrics is None:
            metrics = default_metrics(result.trace)
        return result.out, result.trace, metrics

    return wrapped


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
        trace = coerce_trace(trace)

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
                infer={messages.REPLAY: site, messages.DEPTH: generation},
            )
        if metrics is not None:
            messages.emit_metrics(metrics)
        return out

    return replay


def coerce_trace(trace) -> Trace:
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


class DistributionNotes(Messenger):
    """Notes each sample site's distribution and whether it was substituted.

    Wraps a program (so it sits inside the combinators' own handlers and
    sees their metadata). Replayed sites (a combinator's output) are noted
    without a distribution: only a ``Delta`` of the original is visible.
    Used by :mod:`combinators.inspect` to print trace tables.
    """

    def __init__(self, fn):
        self.notes: dict[str, dict[int, tuple[str | None, bool]]] = {}
        super().__init__(fn)

    def postprocess_message(self, msg):
        """Notes the site's distribution, depth and substitution."""
        if msg["type"] != "sample":
            return
        replay = messages.replayed_site(msg)
        if replay is not None:
            name = getattr(replay, "distribution", None)
        else:
            name = type(base_distribution(msg["fn"])).__name__
        # The first evaluation wins: propose(detach=True) evaluates the target
        # a second time with every latent given.
        self.notes.setdefault(msg["name"], {}).setdefault(
            messages.depth(msg), (name, messages.is_substituted(msg))
        )

    def by_generation(self) -> dict[tuple[str, int], tuple[str | None, bool]]:
        """``{(name, generation): (distribution, substituted)}``.

        Generations rank a name's depths, newest (smallest depth) first, as
        the trace does.
        """
        out = {}
        for name, by_depth in self.notes.items():
            for generation, depth in enumerate(sorted(by_depth)):
                out[(name, generation)] = by_depth[depth]
        return out


class _SupportNotes(Messenger):
    """Notes the support of each freshly drawn or substituted latent site."""

    def __init__(self, fn):
        self.supports: dict[str, Any] = {}
        super().__init__(fn)

    def postprocess_message(self, msg):
        """Keeps the first support seen for each latent name."""
        if msg["type"] != "sample" or msg.get("is_observed", False):
            return
        if messages.replayed_site(msg) is not None:
            return
        self.supports.setdefault(msg["name"], msg["fn"].support)


def evaluate_with_supports(
    program: Callable, latents: Mapping | None = None, where: str = "traced_evaluate"
) -> Callable[..., tuple[Evaluation, dict]]:
    """:func:`evaluate`, also returning ``{name: support}`` of the latents.

    Used by MCMC moves to map latent values to an unconstrained space.
    """
    check_callable(where, program=program)

    def run(*args, **kwargs):
        notes = _SupportNotes(program)
        result = evaluate(notes, latents, where=where)(*args, **kwargs)
        return result, dict(notes.supports)

    return run
