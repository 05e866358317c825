"""SMC on a linear-Gaussian state-space model: compile and run, N = 1e2 .. 1e6.

The model is :mod:`programs.lgssm_exact`'s reference LGSSM with ``d = 1``
(``x_0 ~ N(0, 1)``, ``x_t ~ N(0.9 x_{t-1}, 1)``, ``y_t ~ N(x_t, 0.5^2)``),
``T = 50`` simulated observations, and the bootstrap particle filter with
systematic resampling at every step. Every implementation takes ``(key,
params, ys)`` as jit arguments (nothing folded in as constants) and
computes the log-likelihood estimate; the hand filter and ours also keep
the per-step ESS, log Z increments and filtering means.

* ``hand``: :func:`benchmarks.hand_filters.bootstrap_filter`, one
  ``lax.scan`` over time on an ``(N, d)`` array;
* ``ours``: :func:`programs.lgssm.bootstrap_filter`, i.e.
  ``combinators.algo.smc`` with ``targets(t)`` and ``num_targets = T``
  (each step ``compose(propose(p_t, k_t), resample(q))`` scores only the
  new sites: O(N) per step), evaluated by
  :func:`programs.lgssm.evaluate_filter`;
* ``blackjax`` and ``cuthbert`` (the ``bench`` extra), the peers a user
  would pick: :func:`benchmarks.state_space.blackjax_filter` (BlackJAX's
  generic ``smc.base.step`` in a ``lax.scan``) and
  :func:`benchmarks.state_space.cuthbert_filter` (``cuthbert.filter``),
  each shown unbiased against the Kalman filter in
  ``tests/test_benchmarks.py``; they return log Z-hat only;
* ``coix``: Coix 0.1.0 in its correct formulation (up to N = 1e5: its
  path buffer makes N = 1e6 cost minutes per run). Coix's ``propose``
  subtracts the proposal's log density of *every* site it carries,
  including the resampled previous step's, so a per-step target gives a
  wrong log Z; a correct Coix filter makes target ``t`` score the whole
  path ``x_{0:t}, y_{0:t}`` so that the carried terms cancel. The path is a
  fixed ``(N, T)`` buffer (``coix.fori_loop`` needs a fixed trace), the
  target scores its first ``t + 1`` entries (masked), and the kernel writes
  slot ``t``: O(N T) per step.

Quality: ``log Z-hat - log Z`` against the Kalman filter, its mean and root
mean square over all calls (each call has its own key).

The second table compiles every filter for ``T = 10, 50, 200``
(``N = 1,000``): with the callable form of ``algo.smc`` (a compiled loop)
compile time should not grow with ``T``. The third gives the step time
per particle and time step and the peak memory against N: flat where the
per-particle cost dominates, rising at small N with the fixed per-step cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from benchmarks import hand_filters, state_space
from benchmarks.harness import Case, Schedule, _Runner, installed, measure
from programs import lgssm
from programs.lgssm_exact import default_params, kalman_filter, simulate

__all__ = ["coix_bootstrap_filter", "run"]

NUM_STEPS = 50


# ---------------------------------------------------------------------------
# Coix: the path formulation
# ---------------------------------------------------------------------------


class PathStep(dist.Distribution):
    """A path buffer whose entry ``t`` is drawn from ``N(loc, scale^2)``.

    ``sample`` returns ``path`` with entry ``t`` (last axis) replaced by a
    draw; ``log_prob`` scores only that entry. The other entries are
    copies, so this is the kernel ``k_t(x_t | x_{t-1})`` acting on a
    fixed-size path.
    """

    arg_constraints = {}
    support = constraints.real_vector
    pytree_data_fields = ("path", "t", "loc", "scale")

    def __init__(self, path, t, loc, scale, *, validate_args=None):
        self.path, self.t, self.loc, self.scale = path, t, loc, scale
        super().__init__(
            batch_shape=jnp.shape(path)[:-1],
            event_shape=jnp.shape(path)[-1:],
            validate_args=validate_args,
        )

    def sample(self, key, sample_shape=()):
        """The path with entry ``t`` drawn."""
        shape = tuple(sample_shape) + self.batch_shape
        x_t = self.loc + self.scale * jax.random.normal(key, shape)
        path = jnp.broadcast_to(self.path, shape + self.event_shape)
        return path.at[..., self.t].set(x_t)

    def log_prob(self, value):
        """``log N(value[..., t]; loc, scale^2)``."""
        x_t = jnp.take(value, self.t, axis=-1)
        return dist.Normal(self.loc, self.scale).log_prob(x_t)


def coix_bootstrap_filter(params, ys, num_particles: int):
    """The bootstrap filter written with Coix 0.1.0 (path formulation, ``d = 1``).

    Returns:
      A Coix program of no arguments; its ``metrics["log_Z"]`` estimates
      ``log p(y_{0:T-1})``.
    """
    import coix

    num_steps = ys.shape[0]
    if num_particles == num_steps:
        # Coix's resample gathers every array whose leading axis has the
        # particle count, which would include the (T,) observations.
        raise ValueError("coix_bootstrap_filter: use num_particles != T.")
    a, c = params.A[0, 0], params.C[0, 0]
    q, r = jnp.sqrt(params.Q[0, 0]), jnp.sqrt(params.R[0, 0])
    m0, p0 = params.m0[0], jnp.sqrt(params.P0[0, 0])
    y = ys[:, 0]
    steps = jnp.arange(num_steps)

    def plate():
        return numpyro.plate("particles", num_particles, dim=-1)

    def target(t):
        def program():
            with plate():
                path = numpyro.sample(
                    "x",
                    dist.Normal(0.0, 1.0).expand([num_steps]).mask(False).to_event(1),
                )
                seen = steps <= t
                loc = jnp.concatenate(
                    [jnp.full(path.shape[:-1] + (1,), m0), a * path[..., :-1]], axis=-1
                )
                scale = jnp.where(steps == 0, p0, q)
                log_dynamics = dist.Normal(loc, scale).log_prob(path)
                numpyro.factor(
                    "dynamics", jnp.sum(jnp.where(seen, log_dynamics, 0.0), axis=-1)
                )
                numpyro.sample(
                    "y", dist.Normal(c * path, r).mask(seen).to_event(1), obs=y
                )
            return (path,)

        return program

    def initial_kernel():
        with plate():
            path = jnp.zeros((num_particles, num_steps))
            loc = jnp.full((num_particles,), m0)
            return (numpyro.sample("x", PathStep(path, 0, loc, p0)),)

    def kernel(t):
        def program(path):
            with plate():
                loc = a * jnp.take(path, t - 1, axis=-1)
                return (numpyro.sample("x", PathStep(path, t, loc, q)),)

        return program

    def body(t, q_program):
        return coix.propose(
            target(t), coix.compose(kernel(t), coix.resample(q_program))
        )

    first = coix.propose(target(0), initial_kernel)
    return coix.fori_loop(1, num_steps, body, first)


# ---------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------


def hand_step(num_particles: int):
    """``((), key, params, ys) -> ((), FilterResult)``."""

    def step(state, key, params, ys):
        return state, hand_filters.bootstrap_filter(key, params, ys, num_particles)

    return step


def ours_step(num_particles: int):
    """``((), key, params, ys) -> ((), FilterEstimates)`` via ``algo.smc``."""

    def step(state, key, params, ys):
        program = lgssm.bootstrap_filter(params, ys, num_particles)
        return state, lgssm.evaluate_filter(program, key)

    return step


def coix_step(num_particles: int):
    """``((), key, params, ys) -> ((), metrics)`` of the Coix filter."""

    def step(state, key, params, ys):
        import coix

        program = coix_bootstrap_filter(params, ys, num_particles)
        _, _, metrics = coix.traced_evaluate(program, seed=key)()
        return state, metrics

    return step


def _quality(log_z_exact: float, log_z_of):
    def quality(state, auxes):
        del state
        errors = np.asarray([float(log_z_of(a)) for a in auxes]) - log_z_exact
        return {
            "log_Z_error_mean": float(np.mean(errors)),
            "log_Z_error_rmse": float(np.sqrt(np.mean(errors**2))),
        }

    return quality


SOURCES = {
    "hand": ("/benchmarks/hand_filters.py",),
    "ours": ("/combinators/", "/programs/lgssm.py"),
    "coix": ("/coix/", "/benchmarks/smc.py"),
}


def cases(num_particles: int, log_z_exact: float | None, params, ys) -> list[Case]:
    """The filters for ``N`` particles, as benchmark cases."""
    inputs = lambda i: (params, ys)  # noqa: E731
    quality = (
        (lambda f: _quality(log_z_exact, f))
        if log_z_exact is not None
        else lambda f: None
    )
    result = [
        Case(
            "hand",
            hand_step(num_particles),
            (),
            inputs,
            quality=quality(lambda a: a.log_Z),
            sources=SOURCES["hand"],
            loop=True,
        ),
        Case(
            "ours",
            ours_step(num_particles),
            (),
            inputs,
            quality=quality(lambda a: a.log_Z),
            sources=SOURCES["ours"],
            loop=True,
        ),
    ]
    for peer, make, note in (
        ("blackjax", state_space.blackjax_filter, "blackjax.smc.base.step in a scan"),
        ("cuthbert", state_space.cuthbert_filter, "cuthbert.filter (x_0 by a step)"),
    ):
        if installed(peer):
            result.append(
                Case(
                    peer,
                    make(num_particles),
                    (),
                    inputs,
                    quality=quality(lambda a: a),
                    loop=True,
                    note=note,
                )
            )
    if installed("coix") and num_particles <= 100_000:
        result.append(
            Case(
                "coix",
                coix_step(num_particles),
                (),
                inputs,
                quality=quality(lambda a: a["log_Z"]),
                sources=SOURCES["coix"],
                loop=True,
                note="path formulation (O(N T) per step)",
            )
        )
    return result


def _schedule(num_particles: int, quick: bool) -> Schedule:
    if quick:
        return Schedule(
            warmup=1, rounds=3, steps_per_round=3 if num_particles < 1e4 else 1
        )
    if num_particles <= 1_000:
        return Schedule(warmup=2, rounds=5, steps_per_round=20)
    if num_particles <= 10_000:
        return Schedule(warmup=1, rounds=5, steps_per_round=4)
    return Schedule(warmup=1, rounds=5, steps_per_round=1)


def compile_scaling(
    steps=(10, 50, 200), num_particles: int = 1_000, repeats: int = 1, log=print
) -> list[dict]:
    """Compile times of the three filters for several ``T`` (compile only).

    The fastest of ``repeats`` compilations is kept.
    """
    params = default_params(1)
    rows = []
    for num_steps in steps:
        _, ys = simulate(jax.random.key(0), params, num_steps)
        row = {"T": num_steps, "N": num_particles}
        for case in cases(num_particles, None, params, ys):
            runner = _Runner(case, [jax.random.key(1)])
            runner.compile(repeats)
            row[case.name] = {
                k: runner.result[k]
                for k in ("lower_s", "xla_s", "compile_s", "compile_cpu_s")
            }
            row[case.name]["hlo_instructions"] = runner.result["hlo"]["instructions"]
        log(
            f"    T={num_steps}: "
            + ", ".join(
                f"{name} {row[name]['compile_s']:.2f} s"
                for name in row
                if isinstance(row[name], dict)
            )
        )
        rows.append(row)
    return rows


DESCRIPTION = (
    f"bootstrap filter, LGSSM d = 1, T = {NUM_STEPS}, systematic resampling at "
    "every step; one call = one filter run (compile and run); quality: "
    "log Z-hat - log Z (Kalman), mean and RMSE over all calls"
)


def run(
    quick: bool,
    log=print,
    key=None,
    particles=None,
    compile_steps=(10, 50, 200),
    num_steps: int = NUM_STEPS,
) -> dict:
    """Times every filter for every N, and compile time against T."""
    if particles is None:
        particles = (100, 1_000) if quick else (100, 1_000, 10_000, 100_000, 1_000_000)
    key = jax.random.key(5) if key is None else key
    key_data, key_run = jax.random.split(key)
    params = default_params(1)
    _, ys = simulate(key_data, params, num_steps)
    log_z_exact = float(kalman_filter(params, ys).log_likelihood)
    groups = []
    for n in particles:
        log(f"  N = {n:,}")
        schedule = _schedule(n, quick)
        results = measure(
            cases(n, log_z_exact, params, ys),
            schedule,
            jax.random.fold_in(key_run, n),
            log,
        )
        groups.append(
            {
                "label": f"N = {n:,}",
                "num_particles": n,
                "results": results,
                "schedule": schedule.__dict__,
            }
        )
    log("  compile time against T")
    scaling = (
        compile_scaling(compile_steps, repeats=1 if quick else 2, log=log)
        if compile_steps
        else []
    )
    return {
        "title": f"SMC on a linear-Gaussian SSM (T = {num_steps})",
        "description": DESCRIPTION,
        "groups": groups,
        "compile_scaling": scaling,
        "log_Z_exact": log_z_exact,
        "num_steps": num_steps,
    }
