"""The GPU run: every GPU figure of the benchmarks in one short command.

Usage (from the repository root, on a machine with an NVIDIA GPU)::

    benchmarks/gpu.sh                      # installs .[cuda], then runs this
    python -m benchmarks.gpu               # the run itself (under 8 minutes)
    python -m benchmarks.gpu --dry-run     # the same code at tiny sizes, any device

It stops within seconds, with exit status 2 and a message saying what JAX
sees, when no GPU is visible (unless ``--dry-run``). Otherwise it runs,
side by side with the hand-written floor as in ``python -m benchmarks.run``:

* the bootstrap filter (``benchmarks.smc``, T = 50) at N = 1e4 .. 1e7, with
  run time, memory, and the **fraction of the memory bandwidth achieved**:
  a filter step must at least read each particle, write it and write its
  log weight (:data:`MIN_BYTES_PER_PARTICLE_STEP` = 12 bytes in float32),
  so ``12 N T / step time`` is the smallest traffic the run sustained,
  compared with the device's peak bandwidth (:data:`PEAK_BANDWIDTH_GB_S`,
  vendor figures). This is the physical limit of the workload: a fraction
  near 1 means no implementation could be much faster;
* the VAE and APG training steps (``benchmarks.vae``, ``benchmarks.apg``);
* the filter with its particle plate sharded over all visible devices
  (``combinators.sharding.shard_plates``) against the same filter on one
  device, at the largest N.

It writes ``gpu.md`` and ``gpu.json`` (the tables of ``benchmarks.run``)
to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
from jax.sharding import AxisType

import combinators as coix
from benchmarks import apg, smc, vae
from benchmarks.harness import Case, Schedule, describe_machine, load_average, measure
from benchmarks.run import RESULTS, group_table
from combinators.sharding import shard_plates
from programs import lgssm
from programs.lgssm_exact import default_params, kalman_filter, simulate

__all__ = [
    "MIN_BYTES_PER_PARTICLE_STEP",
    "PEAK_BANDWIDTH_GB_S",
    "bandwidth_rows",
    "main",
    "peak_bandwidth",
    "require_gpu",
]

#: Bytes a bootstrap-filter step must move per particle in float32: read
#: x_{t-1} (4), write x_t (4), write its log weight (4).
MIN_BYTES_PER_PARTICLE_STEP = 12

#: Peak memory bandwidth in GB/s by device kind (substring, first match),
#: from the vendors' data sheets.
PEAK_BANDWIDTH_GB_S = {
    "H200": 4800.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,  # SXM, HBM3
    "A100-SXM4-80GB": 2039.0,
    "A100-PCIE-80GB": 1935.0,
    "A100": 1555.0,  # 40 GB
    "L40S": 864.0,
    "L4": 300.0,
    "A10G": 600.0,
    "T4": 320.0,
    "V100": 900.0,
}

#: Particle counts of the filter: the GPU run and the dry run.
GPU_PARTICLES = (10_000, 100_000, 1_000_000, 10_000_000)
DRY_PARTICLES = (1_000, 10_000)

NO_GPU = (
    "benchmarks.gpu: no GPU is visible to JAX (backend {backend!r}, devices "
    "{devices}). Install the CUDA build with `pip install -e '.[cuda]'` (or run "
    "benchmarks/gpu.sh), check `nvidia-smi`, or pass --dry-run to exercise "
    "this script on the current device."
)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def require_gpu(dry_run: bool) -> None:
    """Exits with status 2 and a clear message unless JAX sees a GPU."""
    if dry_run:
        return
    try:
        backend = jax.default_backend()
        devices = [str(d) for d in jax.devices()]
    except RuntimeError as error:  # no backend could start at all
        backend, devices = "none", [str(error)]
    if backend != "gpu":
        print(NO_GPU.format(backend=backend, devices=devices), file=sys.stderr)
        raise SystemExit(2)


def peak_bandwidth(device_kind: str) -> float | None:
    """The peak bandwidth (GB/s) of a device kind, or ``None`` if unknown."""
    for name, value in PEAK_BANDWIDTH_GB_S.items():
        if name.lower() in device_kind.lower():
            return value
    return None


def bandwidth_rows(section: dict, num_steps: int, peak: float | None) -> list[dict]:
    """Minimal traffic and the fraction of peak bandwidth, per N and implementation."""
    rows = []
    for group in section["groups"]:
        n = group["num_particles"]
        moved = MIN_BYTES_PER_PARTICLE_STEP * n * num_steps
        for r in group["results"]:
            rate = moved / r["step_median_s"] / 1e9
            rows.append(
                {
                    "N": n,
                    "implementation": r["name"],
                    "step_ms": 1e3 * r["step_median_s"],
                    "ns_per_particle_step": 1e9 * r["step_median_s"] / (n * num_steps),
                    "min_traffic_GB_s": rate,
                    "fraction_of_peak": None if peak is None else rate / peak,
                    "peak_MB": (r.get("memory") or {}).get("peak_bytes", 0) / 2**20,
                }
            )
    return rows


def _bandwidth_table(rows: list[dict], peak: float | None) -> str:
    header = (
        "| N | implementation | step ms | ns / particle-step | min. traffic GB/s "
        f"| fraction of peak ({peak or 'unknown'} GB/s) | peak MB |\n"
        "|---:|---|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['N']:,} | {r['implementation']} | {r['step_ms']:.3g} | "
        f"{r['ns_per_particle_step']:.3g} | {r['min_traffic_GB_s']:.3g} | "
        + ("" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.3f}")
        + f" | {r['peak_MB']:.1f} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def _sharded_filter_step(num_particles: int, mesh):
    """The bootstrap filter with its particle plate sharded over ``mesh``."""
    axes = {lgssm.PARTICLES: "particles"}

    def step(state, key, params, ys):
        def targets(t):
            if isinstance(t, int) and t == 0:
                program = lgssm.initial_target(params, ys, num_particles)
            else:
                program = lgssm.transition_target(params, ys, num_particles, t)
            return shard_plates(program, mesh, axes)

        def proposals(t):
            program = lgssm.bootstrap_proposal(params, ys, num_particles, t)
            return shard_plates(program, mesh, axes)

        program = coix.algo.smc(
            targets, proposals, num_targets=ys.shape[0], record=lgssm.filtering_mean
        )
        return state, lgssm.evaluate_filter(program, key)

    return step


def sharded_section(num_particles: int, dry_run: bool, log=_log) -> dict:
    """The filter on one device against the filter sharded over all devices."""
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("particles",), axis_types=(AxisType.Auto,))
    params = default_params(1)
    _, ys = simulate(jax.random.key(3), params, smc.NUM_STEPS)
    log_z_exact = float(kalman_filter(params, ys).log_likelihood)
    n = num_particles - num_particles % devices
    inputs = lambda i: (params, ys)  # noqa: E731

    def quality(state, auxes):
        errors = [float(a.log_Z) - log_z_exact for a in auxes]
        return {"log Z error (mean)": sum(errors) / len(errors)}

    cases = [
        Case("ours (1 device)", smc.ours_step(n), (), inputs, quality=quality),
        Case(
            f"ours (sharded over {devices} devices)",
            _sharded_filter_step(n, mesh),
            (),
            inputs,
            quality=quality,
        ),
    ]
    schedule = Schedule(warmup=1, rounds=3 if dry_run else 5, steps_per_round=1)
    results = measure(cases, schedule, jax.random.key(11), log)
    return {
        "title": f"Sharded SMC over {devices} devices (T = {smc.NUM_STEPS})",
        "description": (
            f"the bootstrap filter with N = {n:,}, its particle plate sharded by "
            "shard_plates over all visible devices, against one device"
        ),
        "groups": [{"label": f"N = {n:,}", "num_particles": n, "results": results}],
    }


def run(dry_run: bool, log=_log) -> dict:
    """Runs every GPU workload; returns the report."""
    require_gpu(dry_run)
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device))
    peak = peak_bandwidth(kind)
    particles = DRY_PARTICLES if dry_run else GPU_PARTICLES
    tic = time.perf_counter()
    report: dict = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "machine": describe_machine(),
        "device_kind": kind,
        "peak_bandwidth_GB_s": peak,
        "workloads": {},
    }

    def section(name, fn):
        log(f"{name}: starting (load average {load_average()})")
        started = time.perf_counter()
        result = fn()
        result["elapsed_s"] = time.perf_counter() - started
        report["workloads"][name] = result
        log(f"{name}: done in {result['elapsed_s']:.0f} s")
        jax.clear_caches()

    section(
        "smc",
        lambda: smc.run(dry_run, log=log, particles=particles, compile_steps=()),
    )
    report["bandwidth"] = bandwidth_rows(
        report["workloads"]["smc"], smc.NUM_STEPS, peak
    )
    section("vae", lambda: vae.run(dry_run, log=log))
    section("apg", lambda: apg.run(dry_run, log=log))
    section("sharded", lambda: sharded_section(particles[-1], dry_run, log))
    report["elapsed_s"] = time.perf_counter() - tic
    return report


def markdown(report: dict) -> str:
    """The report as markdown: the bandwidth table, then every workload's tables."""
    machine = report["machine"]
    out = [
        "# GPU benchmarks" + (" (dry run)" if report["dry_run"] else "") + "\n",
        f"Run {report['started']}, {report['elapsed_s']:.0f} s. Device: "
        f"{report['device_kind']} ({machine['backend']}, {machine['devices']}); "
        f"peak bandwidth {report['peak_bandwidth_GB_s'] or 'unknown'} GB/s.\n",
        "## Bootstrap filter: the fraction of the memory bandwidth achieved\n",
        f"Minimal traffic = {MIN_BYTES_PER_PARTICLE_STEP} bytes x N x T per filter "
        "run (read and write each particle, write its log weight) over the "
        "median run time: what the run must at least have moved.\n",
        _bandwidth_table(report["bandwidth"], report["peak_bandwidth_GB_s"]),
    ]
    for name, section in report["workloads"].items():
        out.append(f"## {section['title']} (`{name}`)\n")
        out.append(section["description"] + ".\n")
        for group in section.get("groups", []):
            if group["label"]:
                out.append(f"### {group['label']}\n")
            out.append(group_table(group["results"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    """Parses the options, runs, prints and writes ``gpu.md`` and ``gpu.json``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description="every GPU benchmark figure in one short run",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny sizes on whatever device JAX has (no GPU check)",
    )
    parser.add_argument("--out", default=RESULTS, help="directory for gpu.md/.json")
    args = parser.parse_args(argv)
    report = run(args.dry_run)
    text = markdown(report)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = "gpu_dry_run" if args.dry_run else "gpu"
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    _log(f"wrote {os.path.join(args.out, stem)}.md and .json")
    return report


if __name__ == "__main__":
    main()
