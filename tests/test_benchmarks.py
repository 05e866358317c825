"""Smoke tests of the benchmark runner (tiny sizes; about 15 s on 2 cores).

The full benchmark is ``python -m benchmarks.run``; these tests check that
the harness measures what it says (a step time per case, compile time,
memory, HLO counts, the quality metric after the same number of steps),
that the report and its target table are written, and that the SMC
workload runs end to end with a few particles.
"""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import hlo, run, smc
from benchmarks.harness import Case, Schedule, measure


def _toy_cases(jit=True):
    """A 'training step' x <- x - 0.1 * grad(sum x^2): the same for every case."""

    def step(state, key, scale):
        del key
        return state - 0.1 * jax.grad(lambda x: jnp.sum(x**2))(state), jnp.sum(
            state**2
        ) * scale

    def quality(state, auxes):
        return {"final": float(jnp.sum(state**2)), "steps_seen": len(auxes)}

    return [
        Case(name, step, jnp.ones(4), lambda i: (1.0,), jit=jit, quality=quality)
        for name in ("hand", "ours", "coix")
    ]


def test_measure_reports_time_compile_memory_profile_and_quality():
    schedule = Schedule(warmup=1, rounds=2, steps_per_round=3)
    results = measure(_toy_cases(), schedule, jax.random.key(0), log=lambda _: None)
    assert [r["name"] for r in results] == ["hand", "ours", "coix"]
    for r in results:
        assert r["steps"] == schedule.total_steps == 7
        assert r["timed_steps"] == 6
        assert 0 < r["step_min_s"] <= r["step_median_s"]
        assert r["compile_s"] == pytest.approx(r["lower_s"] + r["xla_s"])
        assert r["memory"]["peak_bytes"] > 0
        assert r["hlo"]["kernels"] >= 1
        # Every case ran the same steps from the same state: same quality.
        assert r["quality"]["steps_seen"] == 7
        assert r["quality"]["final"] == pytest.approx(4 * 0.8**14, rel=1e-5)


def test_measure_eager_cases_have_no_compile_time():
    schedule = Schedule(warmup=1, rounds=1, steps_per_round=2)
    results = measure(
        _toy_cases(jit=False), schedule, jax.random.key(0), log=lambda _: None
    )
    for r in results:
        assert "compile_s" not in r and r["first_step_s"] > 0


def test_hlo_summary_counts_loop_launches():
    def f(x):
        return jax.lax.fori_loop(0, 7, lambda i, y: jnp.sin(y) * 2.0, x)

    text = jax.jit(f).lower(jnp.ones(3)).compile().as_text()
    summary = hlo.module_summary(text)
    assert summary["while"] == 1
    assert summary["kernels_per_call"] > summary["kernels"]
    assert hlo.loop_body_profile(text)["kernels"] >= 1
    by_source = hlo.kernels_by_source(text, ("test_benchmarks.py",), loop=False)
    assert sum(by_source.values()) == summary["kernels_per_call"]


def _toy_workload(quick, log=print):
    del quick
    schedule = Schedule(warmup=0, rounds=1, steps_per_round=2)
    results = measure(_toy_cases(), schedule, jax.random.key(1), log=log)
    return {
        "title": "toy",
        "description": "a toy",
        "groups": [{"label": "", "results": results}],
    }


def test_runner_writes_markdown_and_json_with_targets(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "WORKLOADS", {"toy": _toy_workload})
    report = run.main(["--quick", "--workloads", "toy", "--out", str(tmp_path)])
    text = (tmp_path / "latest.md").read_text()
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert "## Targets" in text and "| hand |" in text and "load average" in text
    assert saved["workloads"]["toy"]["groups"][0]["results"][0]["name"] == "hand"
    checks = {c["target"] for c in report["targets"]}
    assert checks == {
        "ours step / hand step <= 1.1",
        "ours step / coix step <= 1",
        "ours compile / coix compile <= 1",
    }
    assert all(math.isfinite(c["value"]) for c in report["targets"])


def test_smc_workload_runs_with_few_particles():
    section = smc.run(
        quick=True, log=lambda _: None, particles=(64,), compile_steps=(), num_steps=5
    )
    (group,) = section["groups"]
    named = {r["name"]: r for r in group["results"]}
    for name in ("hand", "ours"):
        quality = named[name]["quality"]
        # log Z-hat of 5 steps with 64 particles: within a few nats of Kalman.
        assert abs(quality["log_Z_error_mean"]) < 3.0
        assert named[name]["hlo_loop_body"]["kernels"] > 0


def _smoothed_mean_z_scores(step, num_runs=64):
    """|mean over runs - RTS| / SE of each implementation's smoothed means."""
    import numpy as np

    from programs.lgssm_exact import default_params, kalman_filter, rts_smoother
    from programs.lgssm_exact import simulate as simulate_lgssm

    params = default_params(1)
    _, ys = simulate_lgssm(jax.random.key(0), params, 5)
    exact = rts_smoother(params, kalman_filter(params, ys)).smoothed_means[:, 0]
    keys = jax.random.split(jax.random.key(4), num_runs)
    run_one = jax.jit(jax.vmap(lambda k: step((), k, params, ys)[1][1]))
    means = np.asarray(run_one(keys), np.float64)
    se = means.std(axis=0, ddof=1) / np.sqrt(num_runs)
    return np.abs(means.mean(axis=0) - np.asarray(exact)) / se


@pytest.mark.parametrize("name", ["hand", "ours", "cuthbert"])
def test_state_space_smoothers_match_rts(name):
    """Every benchmarked smoother is right before it is timed (5 SE, any seed).

    The data and sizes of tests/test_smoothing.py (T = 5, N = M = 256, 64
    runs), where the O(1/N) bias of the self-normalised estimates is below
    half a standard error.
    """
    from benchmarks import state_space

    if name == "cuthbert":
        pytest.importorskip("cuthbert")
    make = {
        "hand": state_space.hand_smoother,
        "ours": state_space.ours_smoother,
        "cuthbert": state_space.cuthbert_smoother,
    }[name]
    assert (_smoothed_mean_z_scores(make(256)) < 5.0).all()


def test_gpu_run_fails_fast_and_clearly_without_a_gpu(capsys):
    from benchmarks import gpu

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as exit_info:
        gpu.require_gpu(dry_run=False)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "no GPU is visible to JAX" in message and "'cpu'" in message
    assert ".[cuda]" in message and "--dry-run" in message
    gpu.require_gpu(dry_run=True)  # the dry run goes on


def test_gpu_bandwidth_fraction_is_minimal_traffic_over_time_and_peak():
    from benchmarks import gpu

    assert gpu.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350.0
    assert gpu.peak_bandwidth("NVIDIA H100 PCIe") == 2000.0
    assert gpu.peak_bandwidth("NVIDIA H200") == 4800.0
    assert gpu.peak_bandwidth("cpu") is None
    section = {
        "groups": [
            {
                "num_particles": 1_000_000,
                "results": [{"name": "ours", "step_median_s": 0.012}],
            }
        ]
    }
    (row,) = gpu.bandwidth_rows(section, num_steps=50, peak=1000.0)
    # 12 bytes x 1e6 particles x 50 steps in 12 ms: 50 GB/s, 5% of 1000 GB/s.
    assert row["min_traffic_GB_s"] == pytest.approx(50.0)
    assert row["fraction_of_peak"] == pytest.approx(0.05)
    assert row["ns_per_particle_step"] == pytest.approx(0.24)


def test_gpu_sharded_filter_matches_one_device_and_kalman():
    from benchmarks import gpu

    section = gpu.sharded_section(512, dry_run=True, log=lambda _: None)
    (group,) = section["groups"]
    one, sharded = group["results"]
    assert sharded["name"].startswith("ours (sharded over")
    # Same keys: the sharded filter is the one-device filter (float rounding).
    for r in (one, sharded):
        assert abs(r["quality"]["log Z error (mean)"]) < 1.0
    assert sharded["quality"]["log Z error (mean)"] == pytest.approx(
        one["quality"]["log Z error (mean)"], abs=1e-3
    )


@pytest.mark.parametrize("name", ["hand", "ours", "blackjax", "cuthbert"])
def test_state_space_filters_give_unbiased_likelihoods(name):
    """Every benchmarked filter is right before it is timed: ``E[Z-hat] = Z``.

    T = 5 steps, N = 64 particles, 400 runs: the mean of ``Z-hat / Z``
    (Kalman) is 1 within 5 standard errors, for any seed.
    """
    import numpy as np

    from benchmarks import state_space
    from programs.lgssm_exact import default_params, kalman_filter
    from programs.lgssm_exact import simulate as simulate_lgssm

    if name in ("blackjax", "cuthbert"):
        pytest.importorskip(name)
    make = {
        "hand": state_space.hand_filter,
        "ours": state_space.ours_filter,
        "blackjax": state_space.blackjax_filter,
        "cuthbert": state_space.cuthbert_filter,
    }[name]
    params = default_params(1)
    _, ys = simulate_lgssm(jax.random.key(1), params, 5)
    log_z = float(kalman_filter(params, ys).log_likelihood)
    step = make(64)
    run_all = jax.jit(jax.vmap(lambda k: step((), k, params, ys)[1]))
    ratio = np.exp(
        np.asarray(run_all(jax.random.split(jax.random.key(2), 400)), np.float64)
        - log_z
    )
    se = ratio.std(ddof=1) / np.sqrt(ratio.size)
    assert abs(ratio.mean() - 1.0) < 5 * se, (ratio.mean(), se)


def test_particle_scaling_table_divides_step_time_by_particles_and_steps():
    def group(n, seconds, peak):
        return {
            "num_particles": n,
            "results": [
                {
                    "name": "hand",
                    "step_median_s": seconds,
                    "memory": {"peak_bytes": peak},
                }
            ],
        }

    section = {
        "num_steps": 10,
        "groups": [group(100, 1e-3, 2**20), group(1_000, 5e-3, 3 * 2**20)],
    }
    rows = run.particle_scaling_table(section).splitlines()[2:]
    # 1 ms / (100 particles x 10 steps) = 1000 ns; 5 ms / 10^4 = 500 ns.
    assert rows == ["| 100 | 1000.0 | 1.00 |", "| 1,000 | 500.0 | 3.00 |"]
    assert (
        run.particle_scaling_table({"num_steps": 10, "groups": [group(1, 1, 1)]}) == ""
    )


def test_the_time_loop_is_the_outer_loop_not_a_longer_inner_one():
    """A 5-step scan whose body runs a 100-trip loop: the profile is the
    scan's body (with the inner loop nested in it), not the inner loop."""

    def program(x):
        def step(carry, _):
            inner = jax.lax.fori_loop(0, 100, lambda i, c: c * 0.99 + i, carry)
            return inner, inner

        return jax.lax.scan(step, x, None, length=5)[1]

    text = jax.jit(program).lower(jnp.ones(3)).compile().as_text()
    profile = hlo.loop_body_profile(text)
    assert profile["while"] >= 1  # the inner loop is inside the profiled body
    assert profile["nested_loop_iterations"] >= 100
