"""Inference algorithms assembled from the combinators.

Every function takes programs and returns a program, with Coix's names and
signatures. Algorithms over a sequence of targets accept either lists (an
unrolled program, one trace per step) or callables ``targets(i)`` together
with ``num_targets`` (one step traced once and run in a compiled loop, so
compile time does not grow with the number of steps).

Three families differ in what a target is:

* Annealing and nested VI (``aft``, ``dais``, ``nvi_avo``, ``nvi_fkl``,
  ``nvi_rkl``): every target is a density over the same variables; a
  forward kernel moves the particles and, where it is stochastic, a
  reverse kernel (``extend``) scores the values it replaced.
* Sequential Monte Carlo (``vsmc``, ``nasmc``, ``smc``) in two forms,
  chosen by ``form=`` (never guessed): ``"incremental"`` (the default of
  ``smc``), where ``targets(i)`` scores only what step ``i`` adds given the
  previous step's outputs and a step is ``compose(propose(targets(i),
  proposals(i)), resample(q))`` (O(N) per step); and ``"path"`` (Coix's
  form, the default of ``vsmc`` and ``nasmc``), where ``targets(i)``
  scores the whole path so far.
* SMC samplers (``tempered_smc``, ``waste_free_smc``): one model tempered
  from its prior to its posterior, with MCMC moves
  (:func:`combinators.move`) between levels and a fixed or adaptive (ESS
  or CESS) schedule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from combinators import mcmc, tempering, weights
from combinators.api import compose, extend, fori_loop, move, propose, resample, scan
from combinators.core import evaluate
from combinators.core import keys as _keys
from combinators.core.metrics import History
from combinators.core.paths import temper
from combinators.core.trace import Trace
from combinators.core.transforms import detach, stick_the_landing
from combinators.loss import (
    apg_loss,
    avo_loss,
    elbo_loss,
    fkl_loss,
    iwae_dreg_loss,
    iwae_loss,
    rkl_loss,
    rws_dreg_loss,
    rws_loss,
    vimco_loss,
)
from combinators.loss.roles import finish

__all__ = [
    "SleepPhase",
    "aft",
    "apgs",
    "dais",
    "dreg_iwae",
    "dreg_rws",
    "nasmc",
    "nvi_avo",
    "nvi_fkl",
    "nvi_rkl",
    "rws",
    "sleep_phi",
    "smc",
    "svi",
    "svi_iwae",
    "svi_stl",
    "tempered_smc",
    "vimco",
    "vsmc",
    "waste_free_smc",
]


def _use_loop(
    where: str, targets, num_targets, *, per_target=False, **programs
) -> bool:
    """Whether the algorithm runs as a compiled loop (callables) or unrolled."""
    if callable(targets):
        if num_targets is None or int(num_targets) < 2:
            raise ValueError(
                f"{where}: with a callable `targets(i)`, give num_targets >= 2 "
                f"(the number of targets), got {num_targets!r}."
            )
        for name, program in programs.items():
            if not callable(program):
                raise TypeError(
                    f"{where}: with a callable `targets`, {name!r} must be a "
                    f"callable `{name}(i)` too, got {type(program).__name__}."
                )
        return True
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
        raise TypeError(
            f"{where}: targets must be a list of programs or a callable "
            f"`targets(i)` with num_targets, got {type(targets).__name__}."
        )
    if len(targets) < 2:
        raise ValueError(f"{where}: needs at least two targets, got {len(targets)}.")
    for name, program in programs.items():
        if callable(program) or not isinstance(program, Sequence):
            raise TypeError(
                f"{where}: with a list of targets, {name!r} must be a list too, "
                f"got {type(program).__name__}."
            )
        needed = len(targets) if per_target else len(targets) - 1
        if len(program) < needed:
            raise ValueError(
                f"{where}: {len(targets)} targets need at least "
                f"{needed} {name}, got {len(program)}."
            )
    return False


def _levels(num_targets, body, init, record):
    """``num_targets - 1`` levels: a ``fori_loop``, or a ``scan`` to record."""
    if record is None:
        return fori_loop(0, num_targets - 1, body, init)
    return scan(0, num_targets - 1, body, init, record=record)


def _no_record(where: str, record) -> None:
    if record is not None:
        raise ValueError(
            f"{where}: record= needs callable targets(i) with num_targets (a "
            f"compiled loop); with lists of programs, evaluate each level instead."
        )


# ---------------------------------------------------------------------------
# One target, one proposal.
# ---------------------------------------------------------------------------


def svi(target: Callable, proposal: Callable) -> Callable:
    """Stochastic variational inference: the negative ELBO, pathwise gradients.

    References:
      Kingma & Welling (2014), "Auto-Encoding Variational Bayes",
      https://arxiv.org/abs/1312.6114; Rezende, Mohamed & Wierstra (2014),
      "Stochastic Backpropagation and Approximate Inference in Deep
      Generative Models", https://arxiv.org/abs/1401.4082.
    """
    return propose(target, proposal, loss_fn=elbo_loss)


def svi_iwae(target: Callable, proposal: Callable) -> Callable:
    """SVI with the importance-weighted bound ``log (1/N sum_i w_i)``.

    References:
      Burda, Grosse & Salakhutdinov (2016), "Importance Weighted
      Autoencoders", https://arxiv.org/abs/1509.00519.
    """
    return propose(target, proposal, loss_fn=iwae_loss)


def svi_stl(target: Callable, proposal: Callable) -> Callable:
    """SVI with the sticking-the-landing gradient (zero variance at the optimum).

    References:
      Roeder, Wu & Duvenaud (2017), "Sticking the Landing: Simple,
      Lower-Variance Gradient Estimators for Variational Inference",
      https://arxiv.org/abs/1703.09194.
    """
    return propose(target, stick_the_landing(proposal), loss_fn=elbo_loss)


def rws(target: Callable, proposal: Callable) -> Callable:
    """Reweighted wake-sleep: self-normalised score-function gradients.

    References:
      Bornschein & Bengio (2015), "Reweighted Wake-Sleep",
      https://arxiv.org/abs/1406.2751; Le, Kosiorek, Siddharth, Teh & Wood
      (2019), "Revisiting Reweighted Wake-Sleep for Models with Stochastic
      Control Flow", https://arxiv.org/abs/1805.10469.
    """
    return propose(target, detach(proposal), loss_fn=rws_loss)


# ---------------------------------------------------------------------------
# Annealing and nested variational inference.
# ---------------------------------------------------------------------------


def aft(targets, flows, *, num_targets=None) -> Callable:
    """Annealed flow transport: resample, move by a flow, reweight.

    Each flow is a deterministic kernel (a ``Delta`` site whose log density
    is ``-log |det J|``), so it needs no reverse kernel.

    Args:
      targets: list of target programs, or ``targets(i)`` with num_targets.
      flows: list of ``len(targets) - 1`` flows, or ``flows(i)``.
      num_targets: the number of targets when they are given as a callable.

    Returns:
      The inference program; its loss is the sum of per-step ELBO terms.

    References:
      Arbel, Matthews & Doucet (2021), "Annealed Flow Transport Monte
      Carlo", https://arxiv.org/abs/2102.07501.
    """
    if _use_loop("aft", targets, num_targets, flows=flows):

        def body(i, q):
            return propose(
                targets(i + 1),
                compose(flows(i), resample(q)),
                loss_fn=elbo_loss,
                detach=True,
            )

        return fori_loop(0, num_targets - 1, body, targets(0))
    q = targets[0]
    for p, flow in zip(targets[1:], flows, strict=False):
        q = propose(p, compose(flow, resample(q)), loss_fn=elbo_loss, detach=True)
    return q


def nvi_avo(targets, forwards, reverses, *, num_targets=None, record=None) -> Callable:
    """Annealed importance sampling trained with the annealed variational objective.

    Args:
      targets: list of targets (the first is sampled directly), or a callable.
      forwards: forward kernels, ``len(targets) - 1`` of them.
      reverses: reverse kernels scoring the values the forwards replaced.
      num_targets: the number of targets when they are given as a callable.
      record: with callable targets, per-level values to keep: the levels
        then run under :func:`~combinators.scan` and ``metrics["history"]``
        holds every level's ESS, log Z and ``record(out, trace, metrics)``.

    Returns:
      The inference program (no resampling, as in AIS).

    References:
      Neal (2001), "Annealed Importance Sampling", Statistics and Computing
      11; Huang, Tan, Lacoste & Courville (2018), "Improving Explorability in
      Variational Inference with Annealed Variational Objectives",
      https://arxiv.org/abs/1809.01818.
    """
    if _use_loop("nvi_avo", targets, num_targets, forwards=forwards, reverses=reverses):

        def body(i, q):
            p = extend(targets(i + 1), reverses(i))
            return propose(p, compose(forwards(i), q), loss_fn=avo_loss, detach=True)

        return _levels(num_targets, body, targets(0), record)
    _no_record("nvi_avo", record)
    q = targets[0]
    for p, fwd, rev in zip(targets[1:], forwards, reverses, strict=False):
        q = propose(extend(p, rev), compose(fwd, q), loss_fn=avo_loss, detach=True)
    return q


def nvi_rkl(targets, forwards, reverses, *, num_targets=None, record=None) -> Callable:
    """Nested variational inference with the reverse-KL objective.

    Each step resamples, moves the particles by a forward kernel (with the
    sticking-the-landing gradient) and reweights by ``p_{k+1}(x') r(x | x') /
    (p_k(x) f(x' | x))``.

    Args:
      targets: list of targets (the first is sampled directly), or a callable.
      forwards: forward kernels, ``len(targets) - 1`` of them.
      reverses: reverse kernels.
      num_targets: the number of targets when they are given as a callable.
      record: with callable targets, per-level values to keep: the levels
        then run under :func:`~combinators.scan` and ``metrics["history"]``
        holds every level's ESS, log Z and ``record(out, trace, metrics)``.

    Returns:
      The inference program.

    References:
      Zimmermann, Wu, Esmaeili & van de Meent (2021), "Nested Variational
      Inference", https://arxiv.org/abs/2106.11302.
    """
    if _use_loop("nvi_rkl", targets, num_targets, forwards=forwards, reverses=reverses):

        def body(i, q):
            p = extend(targets(i + 1), reverses(i))
            q = compose(stick_the_landing(forwards(i)), resample(q))
            return propose(p, q, loss_fn=rkl_loss, detach=True)

        return _levels(num_targets, body, targets(0), record)
    _no_record("nvi_rkl", record)
    q = targets[0]
    for p, fwd, rev in zip(targets[1:], forwards, reverses, strict=False):
        q = compose(stick_the_landing(fwd), resample(q))
        q = propose(extend(p, rev), q, loss_fn=rkl_loss, detach=True)
    return q


def nvi_fkl(targets, proposals, *, num_targets=None) -> Callable:
    """Nested variational inference with the forward-KL objective.

    The proposals extend the previous target's variables (smoothing
    targets: target ``i`` scores every site of target ``i - 1`` and the
    sites ``proposals(i)`` adds), so no reverse kernel is needed.

    Args:
      targets: list of targets, or a callable with num_targets.
      proposals: one proposal per target (the first proposes for
        ``targets[0]``), or a callable.
      num_targets: the number of targets when they are given as a callable.

    Returns:
      The inference program.

    References:
      Zimmermann, Wu, Esmaeili & van de Meent (2021), "Nested Variational
      Inference", https://arxiv.org/abs/2106.11302.
    """
    if _use_loop("nvi_fkl", targets, num_targets, per_target=True, proposals=proposals):

        def body(i, q):
            q = compose(detach(proposals(i)), resample(q))
            return propose(targets(i), q, loss_fn=fkl_loss)

        q = propose(targets(0), detach(proposals(0)), loss_fn=fkl_loss)
        return fori_loop(1, num_targets, body, q)
    q = propose(targets[0], detach(proposals[0]), loss_fn=fkl_loss)
    for p, fwd in zip(targets[1:], proposals[1:], strict=False):
        q = propose(p, compose(detach(fwd), resample(q)), loss_fn=fkl_loss)
    return q


def dais(targets, momentum, leapfrog, refreshment, *, num_targets=None) -> Callable:
    """Differentiable annealed importance sampling (uncorrected Hamiltonian AIS).

    Each target is extended by a momentum; every step is a leapfrog move
    followed by a partial momentum refreshment, weighted against the
    refreshment as reverse kernel. The last step carries the IWAE loss.

    Args:
      targets: list of targets over the position, or a callable.
      momentum: the momentum program, ``momentum(*target_outputs)``.
      leapfrog: the deterministic leapfrog kernel.
      refreshment: the momentum refreshment kernel (also the reverse kernel).
      num_targets: the number of targets when they are given as a callable.

    Returns:
      The inference program.

    References:
      Geffner & Domke (2021), "MCMC Variational Inference via Uncorrected
      Hamiltonian Annealing", https://arxiv.org/abs/2107.04150; Zhang, Hsu,
      Li, Finn & Grosse (2021), "Differentiable Annealed Importance Sampling
      and the Perils of Gradient Noise", https://arxiv.org/abs/2107.10211.
    """

    def with_momentum(p):
        return compose(momentum, p, suffix=False)

    def move(q):
        return compose(refreshment, compose(leapfrog, q))

    if _use_loop("dais", targets, num_targets):

        def body(i, q):
            return propose(extend(with_momentum(targets(i)), refreshment), move(q))

        q = fori_loop(1, num_targets - 1, body, with_momentum(targets(0)))
        last = extend(with_momentum(targets(num_targets - 1)), refreshment)
        return propose(last, move(q), loss_fn=iwae_loss)
    extended = [with_momentum(p) for p in targets]
    q = extended[0]
    for index, p in enumerate(extended[1:], start=1):
        loss_fn = iwae_loss if index == len(extended) - 1 else None
        q = propose(extend(p, refreshment), move(q), loss_fn=loss_fn)
    return q


def apgs(target: Callable, kernels: Sequence[Callable], *, num_sweeps: int = 1):
    """Amortised population Gibbs: learned block-Gibbs kernels with resampling.

    The kernels, composed, are the initial proposal (trained with RWS); each
    sweep resamples and re-draws one block per kernel, weighted against the
    same kernel as reverse kernel (a Gibbs kernel is its own reverse).

    Args:
      target: the target program.
      kernels: one Gibbs kernel per block of latent variables.
      num_sweeps: the number of sweeps (compiled once).

    Returns:
      The inference program.

    References:
      Wu, Zimmermann, Sennesh, Le & van de Meent (2020), "Amortized
      Population Gibbs Samplers with Neural Sufficient Statistics",
      https://arxiv.org/abs/1911.01382.
    """
    if not kernels:
        raise ValueError("apgs: needs at least one kernel.")
    kernels = [detach(k) for k in kernels]
    q = functools.reduce(lambda a, b: compose(b, a), kernels[1:], kernels[0])
    q = propose(target, q, loss_fn=rws_loss)

    def sweep(_, q):
        for k in kernels:
            q = propose(extend(target, k), compose(k, resample(q)), loss_fn=apg_loss)
        return q

    return fori_loop(0, num_sweeps, sweep, q)


# ---------------------------------------------------------------------------
# Sequential Monte Carlo.
# ---------------------------------------------------------------------------


def smc(
    targets,
    proposals,
    *,
    num_targets=None,
    loss_fn: Callable | None = None,
    ess_threshold: float | None = None,
    method: str = "systematic",
    record: Callable | None = None,
    form: str = "incremental",
    score_gradient: bool = False,
) -> Callable:
    """Sequential Monte Carlo, by default scoring only each step's new sites.

    Step 0 is ``propose(targets(0), proposals(0))``. Two forms of the later
    steps, chosen by ``form`` (never guessed from the programs):

    * ``"incremental"`` (the default here): step ``i`` is
      ``compose(propose(targets(i), proposals(i)), resample(q))`` where
      ``targets(i)`` and ``proposals(i)`` take the previous step's outputs
      (e.g. the previous state) and ``targets(i)`` scores the transition and
      observation of step ``i`` only. Each step costs O(N).
    * ``"path"`` (Coix's form): step ``i`` is ``propose(targets(i),
      compose(proposals(i), resample(q)))``: ``targets(i)`` takes the
      program's arguments and scores the whole path so far (every state and
      observation up to ``i``), ``proposals(i)`` takes the previous step's
      outputs and draws the new state. The weight is ``gamma_i(path) /
      (gamma_{i-1}(path) k_i(new | path))``; each step re-scores the path,
      O(N i).

    Either way the log Z estimate is the product of the steps' average
    incremental weights. Every resampling step reports its ancestor
    indices to ``record`` (``metrics["ancestors"]``; nothing is kept unless
    ``record`` keeps it), so :func:`combinators.smoothing.record_particles`
    can keep the genealogy for particle smoothing.

    Args:
      targets: list of step targets, or a callable ``targets(i)``.
      proposals: list of step proposals (``proposals(i)`` proposes the sites
        of ``targets(i)``), or a callable.
      num_targets: the number of steps when they are given as callables; the
        loop then compiles once and keeps a per-step history in
        ``metrics["history"]``.
      loss_fn: a loss for every step (e.g. ``iwae_loss``: with resampling at
        every step their sum is ``-log Z-hat``).
      ess_threshold: adaptive resampling (see :func:`~combinators.api.resample`).
      method: the resampling scheme.
      record: per-step values to keep (see :func:`~combinators.api.scan`).
      form: ``"incremental"`` or ``"path"`` (see above).
      score_gradient: resample with the stop-gradient score estimator
        (Ścibior & Wood 2021; see :func:`~combinators.api.resample`): forward values are
        unchanged and ``grad Z-hat`` becomes an unbiased estimate of
        ``grad Z``. Default False: the ancestor draws are held fixed (a
        biased gradient).

    Returns:
      The inference program.

    Example:
      >>> ys = jnp.array([0.3, -0.1, 0.4, 0.8])
      >>> def step(t, observe=True):  # x_t ~ N(0.9 x_{t-1}, 1), y_t ~ N(x_t, 0.5)
      ...     def program(*x_prev):  # no argument at t = 0
      ...         loc = 0.9 * x_prev[0] if x_prev else 0.0
      ...         with numpyro.plate("particles", 64):
      ...             x = numpyro.sample("x", dist.Normal(loc, 1.0))
      ...             if observe:
      ...                 numpyro.sample("y", dist.Normal(x, 0.5), obs=ys[t])
      ...         return (x,)
      ...     return program
      >>> targets, proposals = step, lambda t: step(t, observe=False)  # bootstrap
      >>> program = smc(targets, proposals, num_targets=4)
      >>> run = jax.jit(lambda key: coix.traced_evaluate(program, seed=key)())
      >>> _, _, metrics = run(jax.random.key(0))
      >>> metrics["log_Z"].shape, metrics["history"].ess.shape  # ESS by step
      ((), (4,))

    References:
      Gordon, Salmond & Smith (1993), "Novel approach to nonlinear/
      non-Gaussian Bayesian state estimation", IEE Proceedings F; Doucet &
      Johansen (2009), "A Tutorial on Particle Filtering and Smoothing:
      Fifteen years later"; Naesseth, Lindsten & Schön (2019), "Elements of
      Sequential Monte Carlo", https://arxiv.org/abs/1903.04797.
    """
    return _smc(
        "smc",
        targets,
        proposals,
        num_targets=num_targets,
        loss_fn=loss_fn,
        ess_threshold=ess_threshold,
        method=method,
        record=record,
        form=form,
        score_gradient=score_gradient,
    )


#: The two ways of writing an SMC step (see :func:`smc`).
SMC_FORMS = ("incremental", "path")


def _smc(
    where: str,
    targets,
    proposals,
    *,
    num_targets,
    loss_fn,
    record,
    ess_threshold=None,
    method="systematic",
    form="incremental",
    score_gradient=False,
) -> Callable:
    """:func:`smc`, naming ``where`` (smc, vsmc or nasmc) in errors."""
    if form not in SMC_FORMS:
        raise ValueError(
            f"{where}: form must be one of {SMC_FORMS} (see algo.smc), got {form!r}."
        )

    def step(i, q):
        p, k = (
            (targets(i), proposals(i))
            if callable(targets)
            else (targets[i], proposals[i])
        )
        resampled = resample(
            q,
            method=method,
            ess_threshold=ess_threshold,
            record_ancestors=True,
            score_gradient=score_gradient,
        )
        if form == "path":
            return propose(p, compose(k, resampled), loss_fn=loss_fn)
        return compose(propose(p, k, loss_fn=loss_fn), resampled)

    if _use_loop(where, targets, num_targets, per_target=True, proposals=proposals):
        first = propose(targets(0), proposals(0), loss_fn=loss_fn)
        return scan(1, num_targets, step, first, record=record)
    first = propose(targets[0], proposals[0], loss_fn=loss_fn)
    return scan(1, len(targets), step, first, record=record, unroll=True)


def vsmc(
    targets,
    proposals,
    *,
    num_targets=None,
    record=None,
    form="path",
    score_gradient=False,
) -> Callable:
    """Variational SMC: SMC whose loss is ``-log Z-hat`` (FIVO / AESMC).

    Resamples at every step, so the per-step IWAE losses sum to
    ``-log Z-hat``. As in Coix, by default (``form="path"``) each target
    scores the whole path and each proposal takes the previous step's
    outputs; ``form="incremental"`` runs the O(N)-per-step form whose
    targets score only each step's new sites (see :func:`smc`).

    Gradients. By default (``score_gradient=False``) the gradient with
    respect to proposal and model parameters flows through reparameterised
    samples with the resampling held fixed: the VSMC/FIVO gradient, which
    is biased (it drops the score of the ancestor draws). With
    ``score_gradient=True`` every resampling adds the stop-gradient score
    term of Ścibior & Wood (2021): the forward values (weights, log Z,
    losses) are unchanged and the gradient of ``Z-hat``, the final
    ``metrics["log_Z"]`` exponentiated, is an unbiased estimate of
    ``grad Z``, at the price of more variance. The loss then keeps its
    value and takes the gradient of ``-metrics["log_Z"]`` (the per-step
    losses see only incremental weights, not the score terms carried by
    the resampled weights). The program is then evaluated one level deeper,
    so a given seed draws other particles than with the default (the same
    law; :func:`smc` with ``score_gradient=True`` keeps the default's draws).

    References:
      Maddison et al. (2017), "Filtering Variational Objectives",
      https://arxiv.org/abs/1705.09279; Le, Igl, Rainforth, Jin & Wood
      (2018), "Auto-Encoding Sequential Monte Carlo",
      https://arxiv.org/abs/1705.10306; Naesseth, Linderman, Ranganath &
      Blei (2018), "Variational Sequential Monte Carlo",
      https://arxiv.org/abs/1705.11140; Ścibior & Wood (2021),
      "Differentiable particle filtering without modifying the forward
      pass", https://arxiv.org/abs/2106.10314.

    ``record`` is passed to :func:`smc` (per-step values in the history).
    """
    program = _smc(
        "vsmc",
        targets,
        proposals,
        num_targets=num_targets,
        loss_fn=iwae_loss,
        record=record,
        form=form,
        score_gradient=score_gradient,
    )
    return _log_z_gradient_loss("vsmc", program) if score_gradient else program


def _log_z_gradient_loss(where: str, program: Callable) -> Callable:
    """``program`` whose loss keeps its value but has the gradient of ``-log_Z``.

    ``loss - (loss - sg(loss)) + (-log_Z - sg(-log_Z))``: the added terms are
    exactly 0 in the forward pass. The score terms of
    ``resample(..., score_gradient=True)`` reach the final log weights (so
    ``log_Z``), not the per-step losses, which see incremental weights only.
    """

    def with_loss(*args, **kwargs):
        result = evaluate.evaluate(program, where=where)(*args, **kwargs)
        metrics = result.metrics
        stop = jax.lax.stop_gradient
        loss = stop(metrics.loss) - (metrics.log_Z - stop(metrics.log_Z))
        return evaluate.empirical(result.out, result.trace, metrics.replace(loss=loss))(
            *args, **kwargs
        )

    return with_loss


def nasmc(
    targets, proposals, *, num_targets=None, record=None, form="path"
) -> Callable:
    """Neural adaptive SMC: proposals trained by the inclusive KL.

    Every step carries the reweighted wake-sleep loss of its (detached)
    proposal under the step's filtering weights, as in Gu et al.'s
    gradient ``sum_t sum_i W_t^i grad log q(x_t^i | x_{t-1}^i)``. ``form``
    is Coix's ``"path"`` by default, or ``"incremental"`` (see :func:`smc`).

    References:
      Gu, Ghahramani & Turner (2015), "Neural Adaptive Sequential Monte
      Carlo", https://arxiv.org/abs/1506.03338.
    """
    detached: Callable[[int], Any] | list[Any]
    if callable(proposals):
        detached = lambda i: detach(proposals(i))  # noqa: E731
    elif isinstance(proposals, Sequence):
        detached = [detach(k) for k in proposals]
    else:
        detached = proposals  # _use_loop reports the type error
    return _smc(
        "nasmc",
        targets,
        detached,
        num_targets=num_targets,
        loss_fn=rws_loss,
        record=record,
        form=form,
    )


# ---------------------------------------------------------------------------
# SMC samplers: tempering from the prior to the posterior with MCMC moves.
# ---------------------------------------------------------------------------


def _check_schedule(where: str, schedule) -> np.ndarray:
    schedule = np.asarray(schedule, dtype=float)
    if (
        schedule.ndim != 1
        or schedule.size < 2
        or schedule[0] != 0.0
        or schedule[-1] != 1.0
        or np.any(np.diff(schedule) <= 0)
    ):
        raise ValueError(
            f"{where}: schedule must be a strictly increasing 1-D sequence from "
            f"0 to 1 (at least two entries), got {schedule.tolist()}."
        )
    return schedule


def tempered_smc(
    p: Callable,
    kernel: mcmc.MCMCKernel,
    *,
    num_mcmc_steps: int = 1,
    schedule=None,
    target_fraction: float = 0.5,
    criterion: str = "ess",
    max_levels: int = 100,
    method: str = "systematic",
    target_accept: float | None = None,
    adapt_scale: bool = True,
    reference: Callable | None = None,
) -> Callable:
    """Tempered SMC sampler from the prior (or a reference) to the posterior of ``p``.

    Level ``t`` targets ``p_t = prior * likelihood^beta_t`` (``temper(p,
    beta_t)``: observed sites' log densities times ``beta_t``). From level
    ``t`` to ``t+1`` one step is three combinators::

        move(resample(propose(temper(p, b), q)), temper(p, b), kernel)

    ``propose`` reweighs by ``likelihood^(b - beta_t)``, ``resample``
    equalises the weights and ``move`` rejuvenates the particles with MCMC
    steps that leave ``p_{t+1}`` invariant. With a fixed ``schedule`` the
    estimate of the evidence ``Z = p(observations)`` is unbiased; otherwise
    each ``b`` is chosen by bisection so that the ESS (or the conditional
    ESS) of the new weights is ``target_fraction`` of N (see
    :mod:`combinators.tempering`). The levels run in one ``lax.while_loop``
    (compiled once); the last allowed level jumps to ``beta = 1``, so the
    sampler always ends at the posterior.

    Args:
      p: the model: an unweighted program whose latents are drawn inside the
        particle plate and whose likelihood is its observed sites.
      kernel: the MCMC kernel of the moves (``mcmc.rwm()``, ``mcmc.mala()``,
        ``mcmc.hmc()``).
      num_mcmc_steps: kernel steps per particle at each level.
      schedule: a fixed increasing sequence of ``beta`` from 0 to 1, or
        ``None`` for the adaptive schedule.
      target_fraction: the adaptive schedule's ESS (or CESS) fraction.
      criterion: ``"ess"`` or ``"cess"``.
      max_levels: at most this many levels (the history's length); the last
        one goes to ``beta = 1``.
      method: the resampling scheme.
      target_accept: tune the kernel's step size between levels towards
        this mean acceptance rate (``h <- h * exp(accept - target_accept)``,
        from the kernel's step size or its default for the dimension);
        ``None`` keeps the kernel's step size. The step size used at each
        level is recorded as ``records["step_size"]``.
      adapt_scale: precondition the moves by the particles' spread (see
        :func:`~combinators.move`); turn off for multimodal targets, whose
        global spread is far wider than each mode.
      reference: a normalised program drawing exactly ``p``'s latents (e.g.
        a Gaussian fit of the posterior): the levels then follow the
        geometric path ``temper(p, beta, reference)`` = ``reference^(1 -
        beta) * p^beta``, starting from draws of ``reference``; ``log Z``
        is still ``p``'s evidence.

    Returns:
      A program whose trace holds the final particles (posterior draws, equal
      weights after the last resampling), whose ``metrics.log_Z`` estimates
      ``log Z``, and whose ``metrics["history"]`` records per level (entry
      0: the prior) the ESS before resampling, ``log_Z``, the mean
      acceptance rate and ``records["beta"]`` (NaN past
      ``metrics["num_levels"]``).

    References:
      Neal (2001), "Annealed importance sampling", Statistics and Computing;
      Chopin (2002), "A sequential particle filter method for static
      models", Biometrika; Del Moral, Doucet & Jasra (2006), "Sequential
      Monte Carlo samplers", JRSS B; Jasra, Stephens, Doucet & Tsagaris
      (2011), Scand. J. Stat.
    """
    return _tempered(
        "tempered_smc",
        p,
        kernel,
        None,
        num_mcmc_steps=num_mcmc_steps,
        schedule=schedule,
        target_fraction=target_fraction,
        criterion=criterion,
        max_levels=max_levels,
        method=method,
        target_accept=target_accept,
        adapt_scale=adapt_scale,
        reference=reference,
    )


def waste_free_smc(
    model: Callable[[int], Callable],
    kernel: mcmc.MCMCKernel,
    *,
    num_particles: int,
    num_chains: int,
    num_mcmc_steps: int = 1,
    schedule=None,
    target_fraction: float = 0.5,
    criterion: str = "ess",
    max_levels: int = 100,
    method: str = "systematic",
    target_accept: float | None = None,
    adapt_scale: bool = True,
) -> Callable:
    """Waste-free tempered SMC (Dau & Chopin 2022).

    Each level reweighs the N particles, resamples only ``M = num_chains``
    ancestors and runs from each a Markov chain of ``P = N / M`` states
    (``P - 1`` moves of ``num_mcmc_steps`` kernel steps each) that leaves
    the level's target invariant; all ``N`` states, ancestors included,
    are the next level's particles. The evidence estimate averages the
    incremental weights over all N states. Same options and outputs as
    :func:`tempered_smc`.

    Args:
      model: ``model(num_particles)`` returns the model program with a
        particle plate of that size (the levels reweigh N particles and move
        M chains).
      kernel: the MCMC kernel.
      num_particles: N.
      num_chains: M; must divide N, and ``N / M >= 2``.
      num_mcmc_steps: kernel steps per move (one move per chain state).
      schedule: as :func:`tempered_smc`.
      target_fraction: as :func:`tempered_smc`.
      criterion: as :func:`tempered_smc`.
      max_levels: as :func:`tempered_smc`.
      method: the scheme that draws the M ancestors.
      target_accept: as :func:`tempered_smc`.
      adapt_scale: as :func:`tempered_smc`.

    Returns:
      The inference program (see :func:`tempered_smc`).

    References:
      Dau & Chopin (2022), "Waste-free sequential Monte Carlo", JRSS B,
      https://arxiv.org/abs/2011.02328.
    """
    where = "waste_free_smc"
    if not callable(model):
        raise TypeError(f"{where}: model must be a callable model(num_particles).")
    num_particles, num_chains = int(num_particles), int(num_chains)
    if num_chains < 1 or num_particles % num_chains or num_particles // num_chains < 2:
        raise ValueError(
            f"{where}: num_chains must divide num_particles with at least two "
            f"states per chain, got num_particles={num_particles}, "
            f"num_chains={num_chains}."
        )
    return _tempered(
        where,
        model(num_particles),
        kernel,
        (model(num_chains), num_chains),
        num_mcmc_steps=num_mcmc_steps,
        schedule=schedule,
        target_fraction=target_fraction,
        criterion=criterion,
        max_levels=max_levels,
        method=method,
        target_accept=target_accept,
        adapt_scale=adapt_scale,
    )


def _tempered(
    where: str,
    p: Callable,
    kernel: mcmc.MCMCKernel,
    chains,
    *,
    num_mcmc_steps: int = 1,
    schedule=None,
    target_fraction: float = 0.5,
    criterion: str = "ess",
    max_levels: int = 100,
    method: str = "systematic",
    target_accept: float | None = None,
    adapt_scale: bool = True,
    reference: Callable | None = None,
) -> Callable:
    """:func:`tempered_smc`; with ``chains=(p_M, M)`` waste-free levels."""
    evaluate.check_callable(where, p=p)
    if reference is not None:
        evaluate.check_callable(where, reference=reference)
    if schedule is not None:
        schedule = _check_schedule(where, schedule)
        max_levels = schedule.size - 1
    elif criterion not in tempering.CRITERIA:
        raise ValueError(
            f"{where}: criterion must be one of {tempering.CRITERIA}, "
            f"got {criterion!r}."
        )
    elif not 0.0 < target_fraction < 1.0:
        raise ValueError(
            f"{where}: target_fraction must be in (0, 1), got {target_fraction}."
        )
    if target_accept is not None and not 0.0 < target_accept < 1.0:
        raise ValueError(
            f"{where}: target_accept must be in (0, 1), got {target_accept}."
        )
    if int(max_levels) < 1:
        raise ValueError(f"{where}: max_levels must be >= 1, got {max_levels}.")
    max_levels = int(max_levels)

    def program(*args, **kwargs):
        key = _keys.require_key(where)
        key_init, key_levels = jax.random.split(key)

        def model_at(latents):
            given = {(n, 0): s.value for n, s in latents.items() if not s.observed}
            return evaluate.evaluate(p, given, where=where)(*args, **kwargs)

        if reference is None:
            init = evaluate.evaluate(temper(p, 0.0), seed=key_init, where=where)(
                *args, **kwargs
            )
        else:
            drawn = evaluate.evaluate(reference, seed=key_init, where=where)(
                *args, **kwargs
            ).trace.marginal()
            init = evaluate.evaluate(
                temper(p, 0.0, reference),
                {(n, 0): s.value for n, s in drawn.items() if not s.observed},
                where=where,
            )(*args, **kwargs)
        if init.metrics is not None:
            raise ValueError(
                f"{where}: p is a weighted program (the output of a combinator); "
                f"pass the unweighted model."
            )
        trace = init.trace.marginal()
        _, supports = evaluate.evaluate_with_supports(
            p,
            {(n, 0): s.value for n, s in trace.items() if not s.observed},
            where=where,
        )(*args, **kwargs)
        discrete = sorted(n for n, s in supports.items() if s.is_discrete)
        if discrete:
            raise ValueError(
                f"{where}: latent sites {discrete} are discrete; the MCMC moves "
                f"between levels move continuous latents only (marginalise "
                f"discrete latents out of p, e.g. with a mixture distribution)."
            )
        layout = weights.layout_of(trace, where=where)
        metrics = evaluate.metrics_from_log_weight(
            jnp.zeros(layout.shape),
            loss=0.0,
            log_density=evaluate.mean_log_density(
                [s for _, s in trace.items()], layout
            ),
            extras={mcmc.ACCEPT_RATE: jnp.ones(())},
            resampled=False,
        )
        n = layout.shape[0] if layout.ndim else 1
        dim = mcmc.coordinates_per_particle(
            [s.value for _, s in trace.items() if not s.observed], layout.shape
        )
        initial_step = jnp.asarray(mcmc.step_size(kernel, dim), float)

        def log_likelihood(latents):
            """``d/dbeta`` of the path's log density at the particles."""
            sites = [s for _, s in model_at(latents).trace.items()]
            if reference is None:
                return weights.trace_log_prob([s for s in sites if s.observed], layout)
            given = {(n, 0): s.value for n, s in latents.items() if not s.observed}
            ref = evaluate.evaluate(reference, given, where=where)(*args, **kwargs)
            return weights.trace_log_prob(sites, layout) - weights.trace_log_prob(
                [s for _, s in ref.trace.items()], layout
            )

        def waste_free_level(previous, b, moves, key):
            """Resample M ancestors, run M chains of N/M states, keep them all."""
            p_chains, num_chains = chains
            length = n // num_chains
            keys = jax.random.split(key, length)
            start = evaluate.evaluate(
                resample(
                    propose(temper(p, b), previous),
                    num_samples=num_chains,
                    method=method,
                ),
                seed=keys[0],
                where=where,
            )(*args, **kwargs)

            def chain_step(state, key_j):
                trace_j, metrics_j = state
                moved = move(
                    evaluate.empirical(None, trace_j, metrics_j),
                    temper(p_chains, b),
                    moves,
                    num_steps=num_mcmc_steps,
                    adapt_scale=adapt_scale,
                )
                ev = evaluate.evaluate(moved, seed=key_j, where=where)(*args, **kwargs)
                return ev, latent_values(ev.trace), ev.metrics[mcmc.ACCEPT_RATE]

            first, values, accept = chain_step((start.trace, start.metrics), keys[1])
            # The chains' states, stacked on a leading axis of length P.
            states = jax.tree_util.tree_map(
                lambda a, b: jnp.stack([a, b]), latent_values(start.trace), values
            )
            accepts = accept[None]
            if length > 2:

                def scan_body(state, key_j):
                    ev, values, accept = chain_step(state, key_j)
                    return (ev.trace, ev.metrics), (values, accept)

                _, (later, later_accepts) = jax.lax.scan(
                    scan_body, (first.trace, first.metrics), keys[2:]
                )
                states = jax.tree_util.tree_map(
                    lambda a, b: jnp.concatenate([a, b]), states, later
                )
                accepts = jnp.concatenate([accepts, later_accepts])
            latents = {name: merge_chains(x, name) for name, x in states.items()}
            final = evaluate.evaluate(
                temper(p, b), {(k, 0): v for k, v in latents.items()}, where=where
            )(*args, **kwargs)
            log_z_hat = weights.reduce_to_layout(start.metrics.log_weight[:1], layout)
            marginal = final.trace.marginal()
            new_metrics = evaluate.metrics_from_log_weight(
                jnp.broadcast_to(log_z_hat, layout.shape),
                loss=0.0,
                log_density=evaluate.mean_log_density(
                    [s for _, s in marginal.items()], layout
                ),
                extras={mcmc.ACCEPT_RATE: jnp.mean(accepts)},
                resampled=True,
            )
            return evaluate.Evaluation(final.out, marginal, new_metrics, {})

        def latent_values(trace):
            return {k: s.value for k, s in trace.items() if not s.observed}

        def merge_chains(states, name):
            """``(P, ...)`` chain states of M particles -> P * M particles."""
            site = trace[name]
            axis = jnp.ndim(site.value) - site.event_dim - layout.ndim
            merged = jnp.moveaxis(states, 0, axis)
            shape = merged.shape
            return jnp.reshape(
                merged,
                shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2 :],
            )

        def body(carry):
            trace, metrics, beta, level, history, step_size = carry
            log_weight = weights.reduce_to_layout(metrics.log_weight, layout)
            loglik = log_likelihood(trace)
            if schedule is None:
                b = tempering.next_beta(
                    log_weight, loglik, beta, target_fraction, criterion
                )
                b = jnp.where(level == max_levels - 1, 1.0, b)
            else:
                b = jnp.asarray(schedule)[level + 1]
            ess = n * tempering.ess_fraction(log_weight, (b - beta) * loglik)
            previous = evaluate.empirical(None, trace, metrics)
            moves = (
                kernel
                if target_accept is None
                else kernel._replace(step_size=step_size)
            )
            key_level = jax.random.fold_in(key_levels, level)
            if chains is None:
                step = move(
                    resample(propose(temper(p, b, reference), previous), method=method),
                    temper(p, b, reference),
                    moves,
                    num_steps=num_mcmc_steps,
                    adapt_scale=adapt_scale,
                )
                result = evaluate.evaluate(step, seed=key_level, where=where)(
                    *args, **kwargs
                )
            else:
                result = waste_free_level(previous, b, moves, key_level)
            new = result.metrics
            accept = new[mcmc.ACCEPT_RATE]
            row = dict(
                beta=b,
                ess=ess,
                log_Z=new.log_Z,
                accept_rate=accept,
                step_size=step_size,
            )
            history = {k: v.at[level + 1].set(row[k]) for k, v in history.items()}
            if target_accept is not None:
                step_size = step_size * jnp.exp(accept - target_accept)
            return result.trace.marginal(), new, b, level + 1, history, step_size

        def more(carry):
            _, _, beta, level, _, _ = carry
            return (beta < 1.0) & (level < max_levels)

        nan = jnp.full((max_levels + 1,), jnp.nan)
        history = dict(
            beta=nan.at[0].set(0.0),
            ess=nan.at[0].set(float(n)),
            log_Z=nan.at[0].set(0.0),
            accept_rate=nan,
            step_size=nan,
        )
        carry = (
            trace,
            metrics,
            jnp.asarray(0.0),
            jnp.asarray(0),
            history,
            initial_step,
        )
        trace, metrics, _, num_levels, history, _ = jax.lax.while_loop(
            more, body, carry
        )
        final = model_at(trace)
        log_z = history["log_Z"]
        summary = History(
            ess=history["ess"],
            log_Z=log_z,
            log_Z_increment=jnp.diff(log_z, prepend=0.0),
            resampled=jnp.arange(max_levels + 1) >= 1,
            records=dict(
                beta=history["beta"],
                accept_rate=history["accept_rate"],
                step_size=history["step_size"],
            ),
        )
        metrics = metrics.replace(history=summary, num_levels=num_levels)
        return evaluate.empirical(final.out, final.trace.marginal(), metrics)(
            *args, **kwargs
        )

    return program


# ---------------------------------------------------------------------------
# Builders for the estimators of combinators.loss.
# ---------------------------------------------------------------------------


def vimco(target: Callable, proposal: Callable) -> Callable:
    """VIMCO: ``propose(target, detach(proposal), loss_fn=vimco_loss)``.

    References:
      Mnih & Rezende (2016), https://arxiv.org/abs/1602.06725.
    """
    return propose(target, detach(proposal), loss_fn=vimco_loss)


def dreg_iwae(target: Callable, proposal: Callable) -> Callable:
    """IWAE trained with DReG gradients (:func:`~.loss.iwae_dreg_loss`'s transforms).

    Returns ``propose(target, stick_the_landing(proposal), detach=True,
    loss_fn=iwae_dreg_loss)``.

    References:
      Tucker, Lawson, Gu & Maddison (2019), https://arxiv.org/abs/1810.04152.
    """
    return propose(
        target,
        stick_the_landing(proposal),
        detach=True,
        loss_fn=iwae_dreg_loss,
    )


def dreg_rws(target: Callable, proposal: Callable) -> Callable:
    """RWS with the DReG wake-phi gradient (see :func:`~.loss.rws_dreg_loss`).

    Returns ``propose(target, stick_the_landing(proposal), detach=True,
    loss_fn=rws_dreg_loss)``.

    References:
      Tucker, Lawson, Gu & Maddison (2019), https://arxiv.org/abs/1810.04152.
    """
    return propose(
        target,
        stick_the_landing(proposal),
        detach=True,
        loss_fn=rws_dreg_loss,
    )


class SleepPhase(NamedTuple):
    """The result of :func:`sleep_phi`.

    Attributes:
      loss: ``-mean_k log q(z_k | x_k)`` over the dreamed particles, summed
        over data columns (per-particle terms with ``aggregate=False``).
      model_trace: the dream: the model's trace, values without gradient.
      proposal_trace: the proposal's trace at the dreamed latents.
    """

    loss: Any
    model_trace: Trace
    proposal_trace: Trace


def sleep_phi(
    model: Callable,
    proposal: Callable,
    *,
    seed=None,
    observed: Sequence[str] = (),
    aggregate: bool = True,
) -> Callable[..., SleepPhase]:
    """The sleep phase: fit the proposal to dreams ``(z, x) ~ p_theta``.

    Runs ``model(*args)`` *generatively*, with its observations sampled
    rather than given (e.g. the target called with ``obs=None``), inside the
    particle plate: each particle is a dream ``(z_k, x_k)``. The model must
    return, as a tuple, the arguments of ``proposal`` (the dreamed data);
    ``proposal(*dream)`` is then evaluated with every latent it samples set
    to the dreamed value of the same name, and the loss is
    ``-mean_k log q(z_k | x_k)``. Dreams carry no gradient, so the loss
    trains only the proposal (``grad_phi KL(p(z, x) || q(z | x) p(x))``).

    Args:
      model: the generative program (samples latents and data).
      proposal: the inference program, called with the model's outputs.
      seed: a PRNG key for the dream.
      observed: names of the model's sites that the proposal observes
        itself (its inputs), not to be substituted.
      aggregate: sum to a scalar (else per-particle terms).

    Returns:
      A function of the model's arguments returning a :class:`SleepPhase`.

    Raises:
      ValueError: without a key, or when the proposal samples a latent the
        model does not dream.

    Example:
      >>> def model(x=None):  # the target, here with its observation unfixed
      ...     with numpyro.plate("particles", 4):
      ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
      ...         x = numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
      ...     return (x,)  # the dreamed data: the proposal's arguments
      >>> def proposal(a, x):
      ...     with numpyro.plate("particles", 4):
      ...         numpyro.sample("z", dist.Normal(a * x, 1.0))
      >>> def sleep_loss(a, key):
      ...     return sleep_phi(model, lambda x: proposal(a, x), seed=key)().loss
      >>> jax.jit(jax.grad(sleep_loss))(0.0, jax.random.key(0)).shape  # trains q
      ()

    References:
      Hinton, Dayan, Frey & Neal (1995), "The 'Wake-Sleep' Algorithm for
      Unsupervised Neural Networks", Science 268(5214); Bornschein & Bengio
      (2015), https://arxiv.org/abs/1406.2751, Section 2.2 (sleep-phase
      update of the proposal).
    """
    evaluate.check_callable("sleep_phi", model=model, proposal=proposal)
    observed = tuple(observed)

    def run(*args, **kwargs) -> SleepPhase:
        if seed is None:
            raise ValueError(
                "sleep_phi: no PRNG key was given; pass seed=jax.random.key(0)."
            )
        key_model, key_proposal = _keys.split_key(seed)
        dream = evaluate.evaluate(model, seed=key_model, where="sleep_phi")(
            *args, **kwargs
        )
        if dream.metrics is not None:
            raise ValueError(
                "sleep_phi: the model is a weighted program (the output of a "
                "combinator); pass the generative program itself."
            )
        model_trace = jax.lax.stop_gradient(dream.trace)
        out = jax.lax.stop_gradient(dream.out)
        if not isinstance(out, tuple):
            raise TypeError(
                f"sleep_phi: the model must return a tuple of arguments for the "
                f"proposal (the dreamed data), got {type(out).__name__}."
            )
        latents = {
            (name, 0): site.value
            for name, site in model_trace.items()
            if not site.observed and name not in observed
        }
        q_eval = evaluate.evaluate(
            proposal, latents, seed=key_proposal, where="sleep_phi"
        )(*out)
        q_trace = q_eval.trace
        given = set(q_eval.substituted)
        for name, generation, site in q_trace.generations():
            if not site.observed and (name, generation) not in given:
                raise ValueError(
                    f"sleep_phi: the proposal samples latent site {name!r}, which "
                    f"the model does not dream (model sites: "
                    f"{sorted(model_trace)}); the sleep phase scores the "
                    f"proposal at the model's values only."
                )
        layout = weights.layout_of(q_trace)
        log_q = weights.trace_log_prob(
            [s for _, _, s in q_trace.generations() if not s.observed], layout
        )
        if log_q.ndim == 0:
            terms = -log_q
        else:
            terms = -log_q / log_q.shape[0]
        return SleepPhase(finish(terms, aggregate), model_trace, q_trace)

    return run
