r"""Bootstrap filter and exact backward sampler: ours, cuthbert and the floor.

The model is :mod:`programs.lgssm_exact`'s reference LGSSM with ``d = 1``
(``x_0 ~ N(0, 1)``, ``x_t ~ N(0.9 x_{t-1}, 1)``, ``y_t ~ N(x_t, 0.5^2)``)
and ``T`` simulated observations. Two workloads, each one call = one
complete run with a fresh key:

* **filter**: the bootstrap particle filter with systematic resampling at
  every step, returning the estimate of ``log p(y_{0:T-1})``;
* **smoother**: the same filter keeping its particle history, then ``M =
  N`` trajectories drawn by exact backward simulation (Godsill, Doucet &
  West 2004; O(N^2) per step), returning log Z-hat and the smoothed means.

Implementations (the same algorithm, sizes and resampling scheme):

* ``hand``: plain JAX, one ``lax.scan`` forward (and one backward) on an
  ``(N, d)`` array (:func:`benchmarks.hand_filters.bootstrap_filter` and
  :func:`~benchmarks.hand_filters.bootstrap_smoother`): the floor;
* ``ours``: ``combinators.algo.smc`` through :mod:`programs.lgssm` (the
  model written once as numpyro programs), with
  ``smoothing.record_particles("x")`` and ``smoothing.ffbs`` for the
  smoother (the backward kernel's transition density is read from the step
  targets);
* ``cuthbert`` (0.1.1): ``cuthbert.smc.particle_filter.build_filter`` with
  ``cuthbertlib.resampling.systematic`` run by ``cuthbert.filter``, and
  ``cuthbert.smc.backward_sampler.build_smoother`` with
  ``cuthbertlib.smc.smoothing.exact_sampling.simulate`` run by
  ``cuthbert.smoother``. cuthbert's filter starts from an unweighted
  initial state, so ``x_0`` is drawn by its first step from a transition
  with coefficient 0 (a time-varying model input): the same model; its
  smoother then also samples that dummy initial state (one extra backward
  step out of ``T``, noted in the table).
* ``blackjax`` (filter only): ``blackjax.smc.base.step`` (resample, then a
  batched update with one key per particle, then weight) in a
  ``lax.scan``, with ``blackjax.smc.resampling.systematic``; it starts like
  cuthbert's filter, from dummy particles and a first transition with
  coefficient 0.

Quality, over all timed calls: ``log Z-hat - log Z`` against the Kalman
filter (mean and sd) and, for the smoother, the root mean square over
``t`` of the smoothed-mean error against the RTS smoother. Run time and
compile time are reported as ratios to the floor, measured interleaved in
one process (:mod:`benchmarks.harness`).

Needs the ``bench`` extra (``pip install -e ".[bench]"``); a peer that is
not installed is left out. ``tests/test_benchmarks.py`` checks that every
filter's ``Z-hat`` is unbiased against the Kalman filter and every
smoother's means match the RTS smoother.

Usage::

    python -m benchmarks.state_space                 # full schedule
    python -m benchmarks.state_space --quick         # small, for development

References:
  Gordon, Salmond & Smith (1993), the bootstrap filter; Godsill, Doucet &
  West (2004), "Monte Carlo smoothing for nonlinear time series", JASA
  99(465); cuthbert, https://github.com/state-space-models/cuthbert.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import combinators as coix
from benchmarks import hand_filters
from benchmarks.harness import Case, Schedule, describe_machine, installed, measure
from combinators import smoothing
from programs import lgssm
from programs.lgssm_exact import default_params, kalman_filter, rts_smoother, simulate

__all__ = ["blackjax_filter", "cuthbert_filter", "cuthbert_smoother", "main", "run"]

NUM_STEPS = 50


# ---------------------------------------------------------------------------
# The three implementations. Each is step(state, key, params, ys).
# ---------------------------------------------------------------------------


def hand_filter(num_particles: int):
    """The floor: ``((), key, params, ys) -> ((), log Z-hat)``."""

    def step(state, key, params, ys):
        result = hand_filters.bootstrap_filter(key, params, ys, num_particles)
        return state, result.log_Z

    return step


def hand_smoother(num_particles: int):
    """The floor: ``-> ((), (log Z-hat, smoothed means (T,)))``."""

    def step(state, key, params, ys):
        result = hand_filters.bootstrap_smoother(
            key, params, ys, num_particles, num_particles
        )
        return state, (result.log_Z, jnp.mean(result.paths[..., 0], axis=1))

    return step


def ours_filter(num_particles: int):
    """``algo.smc`` through :func:`programs.lgssm.bootstrap_filter`."""

    def step(state, key, params, ys):
        program = lgssm.bootstrap_filter(params, ys, num_particles, record=None)
        _, _, metrics = coix.traced_evaluate(program, seed=key)()
        return state, metrics["log_Z"]

    return step


def ours_smoother(num_particles: int, backward: str = "exact"):
    """The filter with ``record_particles("x")``, then ``smoothing.ffbs``."""

    def step(state, key, params, ys):
        key_filter, key_backward = jax.random.split(key)
        program = lgssm.bootstrap_filter(
            params, ys, num_particles, record=smoothing.record_particles("x")
        )
        _, _, metrics = coix.traced_evaluate(program, seed=key_filter)()
        particles = smoothing.particle_history(metrics)
        paths = smoothing.ffbs(
            key_backward,
            lambda t: lgssm.transition_target(params, ys, num_particles, t),
            particles,
            backward=backward,
        )
        return state, (metrics["log_Z"], jnp.mean(paths.values[..., 0], axis=1))

    return step


def _cuthbert_model(params, ys):
    """The Feynman-Kac form for cuthbert of the LGSSM (``d = 1``) and its inputs.

    Step ``t`` (``t = 0, ..., T-1``) propagates ``x_t = a_t x_{t-1} + b_t +
    s_t eps`` with ``(a_0, b_0, s_0) = (0, m0, sqrt(P0))`` and ``(a_t, b_t,
    s_t) = (A, 0, sqrt(Q))`` after, and weights by ``N(y_t; C x_t, R)``.
    """
    import jax.scipy.stats as stats  # noqa: PLC0415

    num_steps = ys.shape[0]
    first = jnp.arange(num_steps) == 0
    inputs = {
        "a": jnp.where(first, 0.0, params.A[0, 0]),
        "b": jnp.where(first, params.m0[0], 0.0),
        "s": jnp.where(first, jnp.sqrt(params.P0[0, 0]), jnp.sqrt(params.Q[0, 0])),
        "y": ys[:, 0],
    }
    c, r = params.C[0, 0], jnp.sqrt(params.R[0, 0])

    def init_sample(key):
        del key
        return jnp.zeros(())

    def propagate_sample(key, x, inp):
        return inp["a"] * x + inp["b"] + inp["s"] * jax.random.normal(key)

    def log_potential(x_prev, x, inp):
        del x_prev
        return stats.norm.logpdf(inp["y"], c * x, r)

    def joint_log_potential(x_prev, x, inp):
        transition = stats.norm.logpdf(x, inp["a"] * x_prev + inp["b"], inp["s"])
        return transition + log_potential(x_prev, x, inp)

    return init_sample, propagate_sample, log_potential, joint_log_potential, inputs


def cuthbert_filter(num_particles: int):
    """The particle filter of cuthbert: ``-> ((), log Z-hat)``."""
    import cuthbert  # noqa: PLC0415 (optional dependency)
    from cuthbert.smc import particle_filter  # noqa: PLC0415
    from cuthbertlib.resampling import systematic  # noqa: PLC0415

    def step(state, key, params, ys):
        init_sample, propagate, log_potential, _, inputs = _cuthbert_model(params, ys)
        filter_obj = particle_filter.build_filter(
            init_sample, propagate, log_potential, num_particles, systematic.resampling
        )
        key_init, key_filter = jax.random.split(key)
        states = cuthbert.filter(
            filter_obj, inputs, filter_obj.init_prepare(key=key_init), key=key_filter
        )
        return state, states.log_normalizing_constant[-1]

    return step


def cuthbert_smoother(num_particles: int):
    """The filter of cuthbert, then its exact backward sampler (``M = N``)."""
    import cuthbert  # noqa: PLC0415 (optional dependency)
    from cuthbert.smc import backward_sampler, particle_filter  # noqa: PLC0415
    from cuthbertlib.resampling import systematic  # noqa: PLC0415
    from cuthbertlib.smc.smoothing import exact_sampling  # noqa: PLC0415

    def step(state, key, params, ys):
        init_sample, propagate, log_potential, joint, inputs = _cuthbert_model(
            params, ys
        )
        filter_obj = particle_filter.build_filter(
            init_sample, propagate, log_potential, num_particles, systematic.resampling
        )
        smoother_obj = backward_sampler.build_smoother(
            joint, exact_sampling.simulate, systematic.resampling, num_particles
        )
        key_init, key_filter, key_smoother = jax.random.split(key, 3)
        states = cuthbert.filter(
            filter_obj, inputs, filter_obj.init_prepare(key=key_init), key=key_filter
        )
        smoothed = cuthbert.smoother(smoother_obj, states, key=key_smoother)
        # Drop the dummy initial state (index 0): x_0 .. x_{T-1} remain.
        means = jnp.mean(smoothed.particles[1:], axis=1)
        return state, (states.log_normalizing_constant[-1], means)

    return step


def blackjax_filter(num_particles: int):
    """BlackJAX's generic SMC step in a ``lax.scan``: ``-> ((), log Z-hat)``.

    ``blackjax.smc.base.step`` resamples the current particles
    systematically (``blackjax.smc.resampling.systematic``), moves them with
    a batched update function (one key per particle, as BlackJAX splits
    them) and weights them; the sum of its ``log_likelihood_increment`` is
    log Z-hat. The first step starts from uniformly weighted dummy
    particles and draws ``x_0`` from a transition with coefficient 0, as for
    cuthbert (the same model).
    """
    import jax.scipy.stats as stats  # noqa: PLC0415
    from blackjax.smc import base  # noqa: PLC0415 (optional dependency)
    from blackjax.smc import resampling as blackjax_resampling  # noqa: PLC0415

    def step(state, key, params, ys):
        _, propagate, _, _, inputs = _cuthbert_model(params, ys)
        c, r = params.C[0, 0], jnp.sqrt(params.R[0, 0])

        def one(carry, inp_and_key):
            smc_state, log_z = carry
            inp, step_key = inp_and_key

            def update(keys, x, update_parameters):
                del update_parameters
                return jax.vmap(lambda k, xi: propagate(k, xi, inp))(keys, x), None

            def weight(x):
                return stats.norm.logpdf(inp["y"], c * x, r)

            smc_state, info = base.step(
                step_key, smc_state, update, weight, blackjax_resampling.systematic
            )
            return (smc_state, log_z + info.log_likelihood_increment), None

        init = base.init(jnp.zeros(num_particles), {})
        keys = jax.random.split(key, ys.shape[0])
        (_, log_z), _ = jax.lax.scan(one, (init, jnp.zeros(())), (inputs, keys))
        return state, log_z

    return step


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def _quality(log_z_exact: float, smoothed_means=None):
    def quality(state, auxes):
        del state
        if smoothed_means is None:
            log_zs = np.asarray([float(a) for a in auxes])
            rmse = None
        else:
            log_zs = np.asarray([float(a[0]) for a in auxes])
            means = np.stack([np.asarray(a[1]) for a in auxes])
            rmse = np.sqrt(np.mean((means - smoothed_means[None]) ** 2))
        errors = log_zs - log_z_exact
        out = {
            "log_Z_error_mean": float(np.mean(errors)),
            "log_Z_error_sd": float(np.std(errors)),
            "runs": float(errors.size),
        }
        if rmse is not None:
            out["smoothed_mean_rmse"] = float(rmse)
        return out

    return quality


def _cases(workload: str, n: int, quality, inputs) -> list[Case]:
    makers = {
        "filter": [("hand", hand_filter), ("ours", ours_filter)],
        "smoother": [("hand", hand_smoother), ("ours", ours_smoother)],
    }[workload]
    if workload == "filter" and installed("blackjax"):
        makers.append(("blackjax", blackjax_filter))
    if installed("cuthbert"):
        makers.append(
            (
                "cuthbert",
                {"filter": cuthbert_filter, "smoother": cuthbert_smoother}[workload],
            )
        )
    return [
        Case(name, make(n), (), inputs, quality=quality, donate=False, loop=True)
        for name, make in makers
    ]


def _schedule(workload: str, n: int, quick: bool) -> Schedule:
    work = n * n if workload == "smoother" else n
    if quick:
        return Schedule(warmup=1, rounds=3, steps_per_round=2)
    if work <= 1e4:
        return Schedule(warmup=2, rounds=5, steps_per_round=20)
    if work <= 1e5:
        return Schedule(warmup=1, rounds=5, steps_per_round=6)
    return Schedule(warmup=1, rounds=5, steps_per_round=2)


def run(
    *,
    quick: bool = False,
    num_steps: int = NUM_STEPS,
    filter_particles=(100, 1_000, 10_000, 100_000),
    smoother_particles=(100, 300, 1_000),
    log=print,
) -> dict:
    """Measures both workloads at every N; returns every number."""
    params = default_params(1)
    _, ys = simulate(jax.random.key(5), params, num_steps)
    filtered = kalman_filter(params, ys)
    log_z_exact = float(filtered.log_likelihood)
    smoothed_means = np.asarray(rts_smoother(params, filtered).smoothed_means[:, 0])
    inputs = lambda i: (params, ys)  # noqa: E731
    groups = []
    for workload, sizes in (
        ("filter", filter_particles),
        ("smoother", smoother_particles),
    ):
        quality = _quality(
            log_z_exact, smoothed_means if workload == "smoother" else None
        )
        for n in sizes:
            log(f"  {workload}, N = {n:,}")
            results = measure(
                _cases(workload, n, quality, inputs),
                _schedule(workload, n, quick),
                jax.random.fold_in(jax.random.key(11), n),
                log,
            )
            groups.append(
                {"workload": workload, "num_particles": n, "results": results}
            )
    return {
        "title": (
            f"Bootstrap filter and exact backward sampler, LGSSM d = 1, T = {num_steps}"
        ),
        "log_Z_exact": log_z_exact,
        "num_steps": num_steps,
        "groups": groups,
    }


def table(record: dict) -> str:
    """The results as a markdown table, ratios to the hand-written floor."""
    lines = [
        f"### {record['title']}",
        "",
        "| workload | N | impl | run ms | run / floor | compile s | compile / floor "
        "| ns / particle-step | peak MB | log Z err (mean ± sd) "
        "| smoothed-mean RMSE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    num_steps = record.get("num_steps", NUM_STEPS)
    for group in record["groups"]:
        by_name = {r["name"]: r for r in group["results"]}
        floor = by_name["hand"]
        for r in group["results"]:
            q = r["quality"]
            rmse = q.get("smoothed_mean_rmse")
            # Fixed plus per-particle cost: flat at large N, rising at small N.
            per_particle_step = (
                f"{1e9 * r['step_median_s'] / (group['num_particles'] * num_steps):.1f}"
                if group["workload"] == "filter"
                else ""
            )
            peak = r.get("memory", {}).get("peak_bytes")
            lines.append(
                f"| {group['workload']} | {group['num_particles']:,} | {r['name']} "
                f"| {1e3 * r['step_median_s']:.2f} "
                f"| {r['step_median_s'] / floor['step_median_s']:.2f} "
                f"| {r['compile_s']:.2f} | {r['compile_s'] / floor['compile_s']:.2f} "
                f"| {per_particle_step} "
                f"| {'' if peak is None else f'{peak / 2**20:.2f}'} "
                f"| {q['log_Z_error_mean']:+.3f} ± {q['log_Z_error_sd']:.3f} "
                f"| {'' if rmse is None else f'{rmse:.4f}'} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    """Runs the benchmark, prints the table and writes JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=NUM_STEPS)
    parser.add_argument(
        "--filter-particles", type=int, nargs="*", default=[100, 1_000, 10_000, 100_000]
    )
    parser.add_argument(
        "--smoother-particles", type=int, nargs="*", default=[100, 300, 1_000]
    )
    parser.add_argument("--out", default="benchmarks/results/state_space")
    args = parser.parse_args(argv)
    record = run(
        quick=args.quick,
        num_steps=args.steps,
        filter_particles=args.filter_particles,
        smoother_particles=args.smoother_particles,
    )
    record["machine"] = describe_machine()
    text = table(record)
    print("\n" + text)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
