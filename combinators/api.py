"""The combinators: functions from programs to programs.

``compose``, ``extend``, ``propose`` and ``resample`` follow the grammar of
inference combinators (Stites, Zimmermann, Wu, Sennesh & van de Meent, 2021,
"Learning Proposals for Probabilistic Programs with Inference Combinators",
https://arxiv.org/abs/2103.00668) and Coix's signatures. Each returns a
program, so they nest: ``propose(p, compose(k, resample(propose(p0, q))))``.

Semantics of the weights (with ``p`` the target, ``q`` the proposal):

* ``propose(p, q)`` runs ``q``, scores its latent values under ``p`` and
  returns ``p``'s sites with log weight
  ``w = w_in + log p(sites of p that q gave, observed) - log q(all q sites)``
  where ``w_in`` is ``q``'s own weight. Latents only in ``p`` are drawn from
  ``p`` and cancel.
* ``resample(q)`` draws ancestors proportional to the weights; every new
  particle carries ``log Z-hat`` of the incoming weights, so the log Z
  estimate is unchanged, also when the number of particles changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from combinators import checks, handlers, weights
from combinators import keys as _keys
from combinators.metrics import History, Metrics
from combinators.resampling import resample_indices
from combinators.trace import Plate, Site, Trace

__all__ = [
    "compose",
    "extend",
    "fori_loop",
    "memoize",
    "newest",
    "propose",
    "resample",
    "scan",
]


# ---------------------------------------------------------------------------
# compose and extend
# ---------------------------------------------------------------------------


def _as_args(out, where: str, role: str) -> tuple:
    if isinstance(out, tuple):
        return out
    raise TypeError(
        f"{where}: {role} must return a tuple of arguments for the next program, "
        f"got {type(out).__name__}; return `(value,)` for a single value."
    )


def compose(q2: Callable, q1: Callable, suffix: bool = True) -> Callable:
    """Runs ``q2(*q1(...))``: a kernel ``q2`` after a program ``q1``.

    Args:
      q2: the program run second; receives ``q1``'s outputs as arguments.
      q1: the program run first; must return a tuple.
      suffix: if True, sites of ``q1`` that ``q2`` samples again become an
        older generation of that name (the trace keeps both); if False, a name
        in both is an error.

    Returns:
      The composed program. If both ``q1`` and ``q2`` are weighted, their
      weights multiply (nested importance sampling).

    Example:
      >>> q = compose(kernel, resample(propose(p0, q0)))
    """
    handlers.check_callable("compose", q2=q2, q1=q1)

    def composed(*args, **kwargs):
        first = handlers.suffix(q1) if suffix else q1
        return q2(*_as_args(first(*args, **kwargs), "compose", "q1"))

    return composed


def extend(p: Callable, f: Callable) -> Callable:
    """Target ``p`` extended by an auxiliary kernel ``f``: ``p(x) f(y | x)``.

    The sites of ``f`` are marked auxiliary and one generation older, so in
    ``propose(extend(p, f), compose(k, q))`` the reverse kernel ``f`` scores
    the values that the forward kernel ``k`` replaced. ``f`` integrates to
    one, so the marginal of ``p`` (and its normaliser) are unchanged.

    Args:
      p: the target program; must return a tuple of arguments for ``f``.
      f: the auxiliary (reverse) kernel.

    Returns:
      A program that returns ``p``'s outputs.
    """
    handlers.check_callable("extend", p=p, f=f)

    def extended(*args, **kwargs):
        out = p(*args, **kwargs)
        handlers.auxiliary(handlers.suffix(f))(*_as_args(out, "extend", "p"))
        return out

    return extended


# ---------------------------------------------------------------------------
# propose
# ---------------------------------------------------------------------------


_INCREMENTAL_HINT = (
    "If the target only adds new sites to the previous target (one SMC step "
    "of a state-space model), write the step as "
    "compose(propose(p_t, k_t), resample(q)): the step's weight multiplies "
    "the previous weight and only the new sites are scored."
)


def _check_unmatched_latents(q_trace: Trace, matched: set, p_trace: Trace) -> None:
    for name, generation, site in q_trace.generations():
        if site.observed or (name, generation) in matched:
            continue
        if generation == 0 and name in p_trace:
            raise ValueError(
                f"propose: the target has a site {name!r}, but as an older "
                f"generation (depth) than the proposal's, so it does not score "
                f"the proposal's value. This happens when the target is built "
                f"with compose(q2, q1) and the default suffix=True, which makes "
                f"q1's sites older generations; build the target with "
                f"compose(q2, q1, suffix=False) (or q1 >> q2)."
            )
        if generation == 0:
            raise ValueError(
                f"propose: the proposal samples latent site {name!r} that the "
                f"target does not score; its density would enter the weight "
                f"without a counterpart in the target, which biases the weights. "
                f"Add {name!r} to the target, or extend the target with a kernel "
                f"that scores it: propose(extend(p, f), q). {_INCREMENTAL_HINT}"
            )
        successor = q_trace.history(name)[generation - 1]
        if not successor.deterministic:
            raise ValueError(
                f"propose: the proposal re-samples site {name!r} with a stochastic "
                f"kernel, but the target has no reverse kernel scoring its "
                f"previous value; use propose(extend(p, reverse_kernel), q) "
                f"(a deterministic Delta kernel needs none). {_INCREMENTAL_HINT}"
            )


def _check_plates(p_eval, q_trace: Trace) -> None:
    for (name, generation), (_, depth) in p_eval.substituted.items():
        p_site = p_eval.trace.history(name)[generation]
        q_site = q_trace.history(name)[depth]
        for frame in p_site.plates:
            other = q_site.plate(frame.name)
            if other is not None and other.size != frame.size:
                raise ValueError(
                    f"propose: plate {frame.name!r} has size {frame.size} in the "
                    f"target but {other.size} in the proposal at site {name!r}; "
                    f"the particle sizes of target and proposal must agree."
                )


def _check_pathwise(loss_fn, q_trace: Trace) -> None:
    if not getattr(loss_fn, "pathwise", False):
        return
    for name, _, site in q_trace.generations():
        if not site.observed and not site.reparameterized:
            loss_name = getattr(loss_fn, "__name__", repr(loss_fn))
            raise ValueError(
                f"propose: loss_fn={loss_name} differentiates through the samples "
                f"(a pathwise gradient), but the proposal's latent site {name!r} "
                f"is not reparameterisable (e.g. discrete); its gradient would be "
                f"silently biased. Use a score-function loss such as rws_loss, or "
                f"a reparameterisable relaxation of {name!r}."
            )


def _marginal(trace: Trace) -> Trace:
    return Trace(
        {
            name: (history[0],)
            for name, history in trace.histories().items()
            if not history[0].auxiliary
        }
    )


def _split_for_target_and_proposal(args) -> tuple[tuple, tuple]:
    """Arguments for the target and the proposal: a key argument is split."""
    if _keys.can_extract_key(args):
        key_p, key_q = _keys.split_key(args[0])
        return (key_p, *args[1:]), (key_q, *args[1:])
    return args, args


def propose(
    p: Callable,
    q: Callable,
    *,
    loss_fn: Callable | None = None,
    detach: bool = False,
    chain: bool = False,
) -> Callable:
    """Importance sampling: target ``p`` with proposal ``q``.

    Args:
      p: the target program (unweighted; scores the proposal's latents).
      q: the proposal program (may itself be weighted, e.g. a resampled
        ``propose``).
      loss_fn: ``loss_fn(q_trace, p_trace, incoming_log_weight,
        incremental_log_weight)``; its value is added to the ``loss`` metric.
      detach: re-evaluate the target on latent values without gradient; the
        loss and the returned program (its trace and outputs) see only those
        detached values, so later combinators cannot train the kernels that
        produced them. The log weight keeps its gradient.
      chain: call ``p`` with ``q``'s outputs instead of the arguments.

    Returns:
      A weighted program whose trace is ``p``'s marginal (auxiliary sites
      dropped) and whose metrics carry the new log weights, ESS, log Z and
      loss.

    Raises:
      ValueError: at trace time, naming the site, when the proposal samples a
        site the target observes or does not score, when particle sizes
        disagree, or when a pathwise loss meets a non-reparameterisable latent.

    Example:
      >>> program = propose(target, proposal, loss_fn=elbo_loss)
      >>> _, _, metrics = traced_evaluate(program, seed=key)(x)

    References:
      Stites et al. (2021), https://arxiv.org/abs/2103.00668.
    """
    handlers.check_callable("propose", p=p, q=q)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"propose: loss_fn must be callable, got {loss_fn!r}.")

    def proposed(*args, **kwargs):
        p_args, q_args = (args, args) if chain else _split_for_target_and_proposal(args)
        q_eval = handlers.evaluate(q, where="propose")(*q_args, **kwargs)
        q_trace = q_eval.trace
        if chain:
            p_args = q_eval.out if isinstance(q_eval.out, tuple) else (q_eval.out,)
        latents = {
            (name, generation): site.value
            for name, generation, site in q_trace.generations()
            if not site.observed
        }
        p_eval = handlers.evaluate(p, latents, where="propose")(*p_args, **kwargs)
        if p_eval.metrics is not None:
            raise ValueError(
                "propose: the target is a weighted program (the output of a "
                "combinator); pass the unweighted target program instead."
            )
        p_trace = p_eval.trace
        _check_unmatched_latents(
            q_trace, set(p_eval.substituted.values()), p_eval.trace
        )
        _check_plates(p_eval, q_trace)
        if loss_fn is not None:
            _check_pathwise(loss_fn, q_trace)

        layout = weights.layout_of(q_trace, p_trace)
        if q_eval.metrics is not None:
            incoming = weights.reduce_to_layout(q_eval.metrics.log_weight, layout)
            q_loss = q_eval.metrics.loss
            extras = q_eval.metrics.extras
        else:
            incoming = weights.trace_log_prob(
                [s for _, _, s in q_trace.generations() if s.observed], layout
            )
            q_loss, extras = jnp.zeros(()), {}
        p_named = [
            (name, site)
            for name, g, site in p_trace.generations()
            if site.observed or (name, g) in p_eval.substituted
        ]
        q_named = [(name, site) for name, _, site in q_trace.generations()]
        checks.check_sites("propose", "target", p_named)
        checks.check_sites("propose", "proposal", q_named)
        incremental = weights.trace_log_prob(
            [s for _, s in p_named], layout
        ) - weights.trace_log_prob([s for _, s in q_named], layout)
        log_weight = incoming + incremental
        checks.check_log_weight("propose", log_weight)

        if detach:
            # Re-evaluate the target on values without gradient: the loss and
            # the returned program (trace and outputs) see detached latents;
            # the log weight above keeps its gradient.
            own = {
                (name, g): jax.lax.stop_gradient(site.value)
                for name, g, site in p_trace.generations()
                if not site.observed
            }
            p_eval = handlers.evaluate(p, own, where="propose")(*p_args, **kwargs)
            p_trace = p_eval.trace

        loss = q_loss
        if loss_fn is not None:
            loss = loss + loss_fn(q_trace, p_trace, incoming, incremental)
            checks.check_loss(
                "propose", getattr(loss_fn, "__name__", repr(loss_fn)), loss
            )

        marginal = _marginal(p_trace)
        metrics = handlers.metrics_from_log_weight(
            log_weight,
            loss=loss,
            log_density=handlers._mean_log_density(
                [marginal[n] for n in marginal], layout
            ),
            extras=extras,
            resampled=q_eval.metrics.resampled if q_eval.metrics is not None else False,
        )
        return handlers.empirical(p_eval.out, marginal, metrics)(*args, **kwargs)

    return proposed


# ---------------------------------------------------------------------------
# resample
# ---------------------------------------------------------------------------


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


def _check_threshold(ess_threshold, num_samples) -> None:
    if ess_threshold is None:
        return
    if not isinstance(ess_threshold, (int, float)) or not 0.0 < ess_threshold <= 1.0:
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


def _split_static(tree):
    """Array leaves of ``tree`` (which may pass through ``lax.cond``) and a
    function that puts them back among the static leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = [isinstance(x, (jax.Array, jnp.ndarray)) for x in leaves]
    arrays = [x for x, a in zip(leaves, is_array) if a]

    def rebuild(new_arrays):
        it = iter(new_arrays)
        return jax.tree_util.tree_unflatten(
            treedef, [next(it) if a else x for x, a in zip(leaves, is_array)]
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
    handlers.check_callable("resample", q=q)
    if num_samples not in (None, ()) and (
        not isinstance(num_samples, int) or num_samples < 1
    ):
        raise ValueError(
            f"resample: num_samples must be a positive int, None or (), got "
            f"{num_samples!r}."
        )
    _check_threshold(ess_threshold, num_samples)

    def resampled(*args, **kwargs):
        if _keys.can_extract_key(args):
            key_r, key_q = _keys.split_key(args[0])
            key_r = _keys.first_key(key_r)
            args = (key_q, *args[1:])
        else:
            key_r = _keys.key_from_handlers()
        q_eval = handlers.evaluate(q, where="resample")(*args, **kwargs)
        trace = q_eval.trace
        weighted = q_eval.metrics is not None or any(
            s.observed for _, _, s in trace.generations()
        )
        metrics = q_eval.metrics or handlers.default_metrics(trace)
        log_weight = metrics.log_weight
        if not weighted or jnp.ndim(log_weight) == 0:
            return handlers.empirical(q_eval.out, trace, q_eval.metrics)(
                *args, **kwargs
            )
        if key_r is None:
            raise ValueError(
                f"resample: no PRNG key was given; {_keys.HOW_TO_PASS_A_KEY}."
            )
        checks.check_log_weight("resample", log_weight)
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
            identity = jnp.reshape(
                jnp.arange(n), (n,) + (1,) * (ndim - 1)
            ) * jnp.ones(indices.shape, indices.dtype)
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
            ess=weights.effective_sample_size(new_log_weight),
            log_Z=jnp.sum(log_z_columns),
            loss=metrics.loss,
            log_density=metrics.log_density,
            extras=metrics.extras,
            resampled=resampled_flag,
        )
        return handlers.empirical(out, new_trace, new_metrics)(*args, **kwargs)

    return resampled


# ---------------------------------------------------------------------------
# fori_loop
# ---------------------------------------------------------------------------


def _describe(tree) -> str:
    return str(
        jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
        )
    )


def _loop_runner(args, kwargs, where: str):
    """The loop's key and a function evaluating a program with a given key."""
    if _keys.can_extract_key(args):
        key = args[0]

        def run(program, k):
            return handlers.evaluate(program, where=where)(k, *args[1:], **kwargs)

    else:
        key = _keys.require_key(where)

        def run(program, k):
            return handlers.evaluate(program, seed=k, where=where)(*args, **kwargs)

    return key, run


def _check_carry(where: str, init, got) -> None:
    if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(
        init
    ) or _describe(got) != _describe(init):
        raise ValueError(
            f"{where}: the body's program changes the structure or shapes of "
            "the trace and metrics; every iteration must return the same "
            f"sites.\n  initial: {_describe(init)}\n  body:    {_describe(got)}"
        )


def fori_loop(lower: int, upper: int, body_fun: Callable, init_program: Callable):
    """Runs ``body_fun`` from ``lower`` to ``upper``, compiled once.

    Args:
      lower: first loop index.
      upper: loop index upper bound (exclusive).
      body_fun: ``body_fun(i, program) -> program``; the new program's trace
        and metrics must have the same structure and shapes as the initial
        program's.
      init_program: the program to start from.

    Returns:
      A program that runs the loop with ``jax.lax.fori_loop``.

    Raises:
      ValueError: if the body changes the structure of the trace.
    """
    handlers.check_callable("fori_loop", body_fun=body_fun, init_program=init_program)

    def looped(*args, **kwargs):
        key, run = _loop_runner(args, kwargs, "fori_loop")
        key_body, key_init = _keys.split_key(key)

        def as_carry(result):
            metrics = result.metrics or handlers.default_metrics(result.trace)
            return result.out, result.trace, metrics

        def body(i, carry):
            program = body_fun(i, handlers.empirical(*carry))
            return as_carry(run(program, _keys.fold_in_key(key_body, i)))

        init = as_carry(run(init_program, key_init))
        _check_carry("fori_loop", init, jax.eval_shape(lambda c: body(lower, c), init))
        out, trace, metrics = jax.lax.fori_loop(lower, upper, body, init)
        return handlers.empirical(out, trace, metrics)(*args, **kwargs)

    return looped


def _newest(trace: Trace) -> Trace:
    """The newest generation of every site (older ones marginalised out)."""
    return Trace({name: (history[0],) for name, history in trace.histories().items()})


def newest(q: Callable) -> Callable:
    """Keeps only the newest generation of each site of ``q``.

    The older generations are marginalised out: ``q``'s weights already
    account for them, so the particles stay properly weighted for the newest
    values. Sequential Monte Carlo written as ``compose(propose(p_t, k_t),
    resample(q))`` uses it to keep one generation per step (:func:`scan`
    does it for every carried program).

    Args:
      q: a program.

    Returns:
      A program with the same outputs and metrics and a one-generation
      trace.
    """
    handlers.check_callable("newest", q=q)

    def marginalised(*args, **kwargs):
        result = handlers.evaluate(q, where="newest")(*args, **kwargs)
        return handlers.empirical(result.out, _newest(result.trace), result.metrics)(
            *args, **kwargs
        )

    return marginalised


def scan(
    lower: int,
    upper: int,
    body_fun: Callable,
    init_program: Callable,
    *,
    record: Callable | None = None,
    unroll: bool = False,
):
    """A loop over programs that keeps a per-step history, compiled once.

    Like :func:`fori_loop`, but run with ``jax.lax.scan``, and the program
    carried from one step to the next keeps only the newest generation of
    each site. Older generations are marginalised out: their contribution
    is already in the weights, so particles and weights stay properly
    weighted for the newest values. This keeps the carry's shape fixed for
    sequential Monte Carlo written as ``compose(propose(p_t, k_t),
    resample(q))``, where each step scores only its new sites (O(N) per
    step). To keep a whole path, write it into a pre-allocated buffer that
    the programs return (resampling moves every output array whose leading
    axis is the particle axis) and index it with the step number.

    Args:
      lower: the first step index given to ``body_fun``.
      upper: the step index bound (exclusive).
      body_fun: ``body_fun(t, program) -> program``.
      init_program: the program of step ``lower - 1``.
      record: optional ``record(out, trace, metrics) -> pytree`` of per-step
        arrays to keep (e.g. filtering means).
      unroll: run the steps as a Python loop (``t`` is then a Python int, so
        ``body_fun`` may pick a different program per step, e.g. from a
        list); each step is traced separately, so compile time grows with
        the number of steps.

    Returns:
      A program whose ``metrics["history"]`` is a :class:`History` whose
      fields are stacked over ``upper - lower + 1`` entries: the initial
      program, then every step.

    Raises:
      ValueError: if a step changes the structure or shapes of the carry.
    """
    handlers.check_callable("scan", body_fun=body_fun, init_program=init_program)
    if record is not None and not callable(record):
        raise TypeError(f"scan: record must be callable, got {record!r}.")

    def scanned(*args, **kwargs):
        key, run = _loop_runner(args, kwargs, "scan")
        key_body, key_init = _keys.split_key(key)

        def as_carry(result):
            metrics = result.metrics or handlers.default_metrics(result.trace)
            extras = {k: v for k, v in metrics.extras.items() if k != "history"}
            return result.out, _newest(result.trace), metrics.replace(extras=extras)

        def summarise(carry, previous_log_Z):
            out, trace, metrics = carry
            return History(
                ess=metrics.ess,
                log_Z=metrics.log_Z,
                log_Z_increment=metrics.log_Z - previous_log_Z,
                resampled=jnp.asarray(metrics.resampled, dtype=bool),
                records=record(out, trace, metrics) if record is not None else {},
            )

        # One key per step, split before the loop (not derived inside it).
        num_steps = max(upper - lower, 0)
        step_keys = _keys.split_key_n(key_body, max(num_steps, 1))

        def body(carry, step):
            t, key_t = step
            out, trace, metrics = carry
            previous = handlers.empirical(
                out, trace, metrics.replace(resampled=jnp.asarray(False))
            )
            new = as_carry(run(body_fun(t, previous), key_t))
            return new, summarise(new, metrics.log_Z)

        init = as_carry(run(init_program, key_init))
        init = (init[0], init[1], init[2].replace(resampled=jnp.asarray(init[2].resampled)))
        first = summarise(init, jnp.zeros_like(init[2].log_Z))
        if unroll:
            final, summaries = init, [first]
            for t in range(lower, upper):
                final, summary = body(final, (t, step_keys[t - lower]))
                summaries.append(summary)
            history = jax.tree_util.tree_map(
                lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *summaries
            )
        else:
            got = jax.eval_shape(
                lambda c: body(c, (jnp.asarray(lower), step_keys[0]))[0], init
            )
            _check_carry("scan", init, got)
            final, steps = jax.lax.scan(
                body, init, (jnp.arange(lower, upper), step_keys[:num_steps])
            )
            history = jax.tree_util.tree_map(
                lambda a, b: jnp.concatenate([jnp.asarray(a)[None], b]), first, steps
            )
        out, trace, metrics = final
        metrics = metrics.replace(history=history)
        return handlers.empirical(out, trace, metrics)(*args, **kwargs)

    return scanned


# ---------------------------------------------------------------------------
# memoize
# ---------------------------------------------------------------------------


def memoize(p: Callable, q: Callable, memory: Mapping | None = None, memory_size=None):
    """Proposes from ``q`` and from a memory of the best samples seen so far.

    The memory's samples are stacked along axis 0 of each latent. The target
    scores the memory's samples together with fresh ones from ``q``; the
    ``memory_size`` best distinct samples (by target log density) are kept,
    returned as the program's particles and stored in ``metrics["memory"]``.
    Distinctness is checked with array comparisons, so the program compiles
    under ``jit``. The target's particle plate must have room for both sets:
    ``len(memory) + N`` where N is the proposal's particle count.

    Args:
      p: the target program.
      q: the proposal program.
      memory: ``{name: array of shape (memory_size, ...)}`` or ``None``.
      memory_size: the number of samples kept (default: memory's length).

    Returns:
      A program whose log weights are the target log densities of the kept
      samples.

    References:
      Hewitt, Le & Tenenbaum (2020), "Learning to learn generative programs
      with Memoised Wake-Sleep", https://arxiv.org/abs/2007.03132.
    """
    handlers.check_callable("memoize", p=p, q=q)
    if memory is None and memory_size is None:
        raise ValueError("memoize: give `memory` or `memory_size`.")
    memory = dict(memory or {})
    sizes = {int(jnp.shape(v)[0]) for v in memory.values()}
    if len(sizes) > 1:
        raise ValueError(
            f"memoize: every memory entry must hold the same number of samples, "
            f"got {sorted(sizes)}."
        )
    size = memory_size if memory_size is not None else sizes.pop()

    def memoized(*args, **kwargs):
        p_args, q_args = _split_for_target_and_proposal(args)
        q_eval = handlers.evaluate(q, where="memoize")(*q_args, **kwargs)
        latents = {}
        for name, site in q_eval.trace.items():
            if site.observed:
                continue
            value = site.value
            if name in memory:
                value = jnp.concatenate([jnp.asarray(memory[name]), value], axis=0)
            latents[(name, 0)] = value
        p_eval = handlers.evaluate(p, latents, where="memoize")(*p_args, **kwargs)
        layout = weights.layout_of(p_eval.trace)
        log_density = weights.trace_log_prob(
            [p_eval.trace[n] for n in p_eval.trace], layout
        )
        k = log_density.shape[0]
        latent_names = [n for n in p_eval.trace if not p_eval.trace[n].observed]
        flat = jnp.concatenate(
            [
                jnp.reshape(p_eval.trace[n].value, (k, -1)).astype(jnp.float32)
                for n in latent_names
            ],
            axis=1,
        )
        order = jnp.argsort(-log_density)
        ranked = flat[order]
        same = jnp.all(ranked[:, None, :] == ranked[None, :, :], axis=-1)
        earlier = jnp.tril(jnp.ones((k, k), dtype=bool), k=-1)
        duplicate = jnp.any(same & earlier, axis=1)
        score = jnp.where(duplicate, -jnp.inf, log_density[order])
        keep = order[jax.lax.top_k(score, size)[1]]
        marginal = Trace(
            {
                name: (
                    history[0].replace(
                        value=jnp.take(history[0].value, keep, axis=0),
                        log_prob=jnp.take(history[0].log_prob, keep, axis=0),
                        plates=tuple(
                            Plate(f.name, size, f.dim) if f.size == k else f
                            for f in history[0].plates
                        ),
                    ),
                )
                for name, history in p_eval.trace.histories().items()
                if not history[0].observed
            }
        )
        new_memory = {n: marginal[n].value for n in marginal}
        log_weight = jnp.take(log_density, keep, axis=0)
        metrics = handlers.metrics_from_log_weight(
            log_weight,
            loss=q_eval.metrics.loss if q_eval.metrics is not None else 0.0,
            log_density=jnp.mean(log_weight),
            extras={"memory": new_memory},
        )
        out = jax.tree_util.tree_map(
            lambda x: jnp.take(x, keep, axis=0)
            if isinstance(x, jax.Array) and x.ndim and x.shape[0] == k
            else x,
            p_eval.out,
        )
        return handlers.empirical(out, marginal, metrics)(*args, **kwargs)

    return memoized

