r"""Adaptive tempered SMC: ``algo.tempered_smc`` against BlackJAX, side by side.

The model is a d-dimensional Gaussian with a conjugate answer: ``theta ~
N(0, I_d)`` and M observations ``y_j ~ N(theta, sigma^2 I_d)``, so
``log Z`` is a sum of d multivariate-normal log densities. Both samplers
temper from the prior with an ESS-driven bisection (target 0.5 N), resample
systematically at every level and move with ``num_mcmc_steps`` MALA steps:

* ours: ``algo.tempered_smc(model, mcmc.mala(), ...)`` (the default step,
  ``1.65 d^(-1/3)`` in units of the particles' spread, recomputed at every
  level);
* BlackJAX: ``blackjax.adaptive_tempered_smc`` with ``blackjax.mala`` at a
  fixed step size (BlackJAX's MALA has no preconditioner; its step is
  chosen here for the posterior's scale), in a ``lax.while_loop`` until the
  tempering parameter reaches 1.

Each timed step is one whole sampler run with a fresh key, so the quality
line (log Z error: mean and sd over all runs) and the timings come from the
same runs; the cases are interleaved (``benchmarks.harness``). Needs the
``bench`` extra (``pip install -e ".[bench]"``).

Usage::

    python -m benchmarks.tempered --particles 1000 --dim 10
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import scipy.stats

import combinators as coix
from benchmarks.harness import Case, Schedule, describe_machine, floats, measure
from combinators import algo, mcmc


def data(dim: int, num_obs: int, sigma: float, seed: int = 0) -> np.ndarray:
    """Observations drawn from the model at a prior draw of theta."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=dim)
    return (theta + sigma * rng.normal(size=(num_obs, dim))).astype(np.float32)


def exact_log_z(y: np.ndarray, sigma: float) -> float:
    """Each coordinate's observations are jointly N(0, sigma^2 I + 1 1^T)."""
    num_obs, dim = y.shape
    cov = sigma**2 * np.eye(num_obs) + np.ones((num_obs, num_obs))
    law = scipy.stats.multivariate_normal(np.zeros(num_obs), cov)
    return float(sum(law.logpdf(y[:, k].astype(np.float64)) for k in range(dim)))


def ours(y, sigma, num_particles, num_mcmc_steps):
    """The library's sampler: one run per key."""
    num_obs, dim = y.shape

    def model():
        with numpyro.plate("particles", num_particles, dim=-2):
            theta = numpyro.sample(
                "theta", dist.Normal(0.0, 1.0).expand([dim]).to_event(1)
            )
            with numpyro.plate("data", num_obs, dim=-1):
                numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)

    program = algo.tempered_smc(model, mcmc.mala(), num_mcmc_steps=num_mcmc_steps)

    def step(state, key):
        _, _, metrics = coix.traced_evaluate(program, seed=key)()
        return state, (metrics.log_Z, metrics["num_levels"])

    return step


def blackjax_sampler(y, sigma, num_particles, num_mcmc_steps, step_size):
    """BlackJAX's adaptive tempered SMC with MALA moves: one run per key."""
    import blackjax  # noqa: PLC0415 (optional dependency)
    from blackjax.smc import resampling  # noqa: PLC0415

    num_obs, dim = y.shape
    y = jnp.asarray(y)

    def logprior(theta):
        return jnp.sum(jax.scipy.stats.norm.logpdf(theta))

    def loglikelihood(theta):
        return jnp.sum(jax.scipy.stats.norm.logpdf(y, theta, sigma))

    sampler = blackjax.adaptive_tempered_smc(
        logprior,
        loglikelihood,
        blackjax.mala.build_kernel(),
        blackjax.mala.init,
        {"step_size": jnp.full((1,), step_size)},
        resampling.systematic,
        target_ess=0.5,
        num_mcmc_steps=num_mcmc_steps,
    )

    def step(state, key):
        key_init, key = jax.random.split(key)
        particles = jax.random.normal(key_init, (num_particles, dim))

        def more(carry):
            return carry[0].tempering_param < 1.0

        def level(carry):
            smc_state, log_z, k, count = carry
            k, sub = jax.random.split(k)
            smc_state, info = sampler.step(sub, smc_state)
            return smc_state, log_z + info.log_likelihood_increment, k, count + 1

        init = (sampler.init(particles), jnp.zeros(()), key, jnp.zeros((), jnp.int32))
        _, log_z, _, count = jax.lax.while_loop(more, level, init)
        return state, (log_z, count)

    return step


def main() -> None:
    """Runs both samplers side by side and prints and saves the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--observations", type=int, default=20)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--mcmc-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/tempered.json")
    args = parser.parse_args()

    y = data(args.dim, args.observations, args.sigma)
    log_z = exact_log_z(y, args.sigma)
    # BlackJAX's MALA step: x + eps grad + sqrt(2 eps) xi; a proposal scale
    # sqrt(2 eps) = 1.65 d^(-1/3) times the posterior sd.
    posterior_sd = 1.0 / np.sqrt(1.0 + args.observations / args.sigma**2)
    eps = 0.5 * (1.65 * args.dim ** (-1 / 3) * posterior_sd) ** 2

    def quality(_, auxes):
        estimates = np.array([float(a[0]) for a in auxes])
        levels = np.array(floats([a[1] for a in auxes]))
        return {
            "log_Z_error_mean": float(np.mean(estimates - log_z)),
            "log_Z_error_sd": float(np.std(estimates - log_z)),
            "log_Z_rmse": float(np.sqrt(np.mean((estimates - log_z) ** 2))),
            "levels_mean": float(np.mean(levels)),
            "runs": float(estimates.size),
        }

    cases = [
        Case(
            "ours",
            ours(y, args.sigma, args.particles, args.mcmc_steps),
            (),
            lambda i: (),
            quality=quality,
            donate=False,
        ),
        Case(
            "blackjax",
            blackjax_sampler(y, args.sigma, args.particles, args.mcmc_steps, eps),
            (),
            lambda i: (),
            quality=quality,
            donate=False,
        ),
    ]
    schedule = Schedule(
        warmup=2, rounds=args.rounds, steps_per_round=args.steps_per_round
    )
    results = measure(cases, schedule, jax.random.key(0))
    by_name = {r["name"]: r for r in results}
    print(
        f"\nexact log Z = {log_z:.3f}; N = {args.particles}, d = {args.dim}, "
        f"M = {args.observations}, {args.mcmc_steps} MALA steps per level"
    )
    print(
        f"{'case':10s} {'run ms':>9s} {'ratio':>6s} {'compile s':>10s} {'ratio':>6s} "
        f"{'err mean':>9s} {'err sd':>7s} {'levels':>7s}"
    )
    base = by_name["blackjax"]
    for r in results:
        q = r["quality"]
        print(
            f"{r['name']:10s} {1e3 * r['step_median_s']:9.2f} "
            f"{r['step_median_s'] / base['step_median_s']:6.2f} {r['compile_s']:10.2f} "
            f"{r['compile_s'] / base['compile_s']:6.2f} {q['log_Z_error_mean']:9.3f} "
            f"{q['log_Z_error_sd']:7.3f} {q['levels_mean']:7.1f}"
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": describe_machine(),
        "args": vars(args),
        "exact_log_Z": log_z,
        "results": results,
    }
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
