"""Speed of the library's bootstrap filter against a hand-written lax.scan filter.

Both filters run the LGSSM of :mod:`programs.lgssm_exact` (``d = 1``,
``T = 50``) with systematic resampling at every step and compute the same
things: the log-likelihood estimate, its per-step increments, the per-step
ESS and the filtering means. Ours is the public API
(:func:`programs.lgssm.bootstrap_filter`, i.e. ``combinators.algo.smc``
with ``targets(t)`` and ``num_targets = T``) under ``jax.jit``; the hand
filter is :func:`benchmarks.hand_filters.bootstrap_filter`. Both take
``(key, params, ys)`` as jit arguments, so neither has the model's
factorisations folded in as constants.

For every N the script reports, in one process:

* compile time: tracing and lowering (``jax.jit(f).lower``, Python time
  spent in the library) and XLA compilation (``.compile()``), caches
  cleared before each;
* run time: the median of ``--repeats`` steady-state calls (after a warm-up
  call, with ``block_until_ready``), ours and the hand filter interleaved so
  that load on a shared machine affects both alike;
* a profile of the per-step work: primitive counts in the body of the
  time loop (from the jaxpr, nested calls inlined) and op counts in the
  optimised HLO.

Run ``python -m benchmarks.smc_lgssm`` from the repository root; the table
is printed and written to ``benchmarks/results/smc_lgssm.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from benchmarks import hand_filters
from programs import lgssm
from programs.lgssm_exact import default_params, kalman_filter, simulate

__all__ = ["main"]

RESULTS = os.path.join(os.path.dirname(__file__), "results")

# Primitives whose cost grows with N (counted in the loop body).
_PARTICLE_OPS = (
    "gather",
    "scatter",
    "sort",
    "cumsum",
    "exp",
    "log",
    "reduce_max",
    "reduce_sum",
    "dot_general",
    "erf_inv",
    "triangular_solve",
    "random_bits",
    "random_split",
    "random_fold_in",
    "threefry2x32",
    "while",
    "scan",
    "cond",
)
_HLO_OPS = (
    "gather",
    "sort",
    "exponential",
    "log",
    "reduce",
    "dot",
    "fusion",
    "while",
    "conditional",
    "custom-call",
    "triangular-solve",
    "rng-bit-generator",
)


# Where each filter's code lives (for attributing HLO ops to Python sources).
_SOURCES = {
    "ours": ("/combinators/", "/programs/lgssm.py"),
    "hand": ("/benchmarks/hand_filters.py",),
}


def ours(num_particles: int) -> Callable:
    """The library's bootstrap filter, as ``(key, params, ys) -> FilterEstimates``."""

    def run(key, params, ys):
        program = lgssm.bootstrap_filter(params, ys, num_particles)
        return lgssm.evaluate_filter(program, key)

    return run


def hand(num_particles: int) -> Callable:
    """The hand-written filter, as ``(key, params, ys) -> FilterResult``."""

    def run(key, params, ys):
        return hand_filters.bootstrap_filter(key, params, ys, num_particles)

    return run


def describe_machine() -> dict:
    """Devices, CPU model and count, load and versions, for the results file."""
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    return {
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average_1_5_15min": [round(x, 2) for x in load],
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def _compile(fn: Callable, args) -> tuple[Callable, dict]:
    """Jits ``fn`` afresh; returns the executable and the seconds spent.

    Returns wall-clock and process CPU seconds of tracing and lowering
    (``lower_*``) and of XLA compilation (``compile_*``).
    """
    jax.clear_caches()
    wall, cpu = time.perf_counter(), time.process_time()
    lowered = jax.jit(fn).lower(*args)
    lowered_wall, lowered_cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    seconds = {
        "lower_s": lowered_wall - wall,
        "lower_cpu_s": lowered_cpu - cpu,
        "compile_s": time.perf_counter() - lowered_wall,
        "compile_cpu_s": time.process_time() - lowered_cpu,
    }
    return compiled, seconds


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def _count_primitives(jaxpr, counts: collections.Counter) -> None:
    """Counts primitives, inlining nested calls but not loop or cond bodies."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("scan", "while", "cond"):
            counts[name] += 1
            continue
        subs = list(_subjaxprs(eqn))
        if subs:
            for sub in subs:
                _count_primitives(sub, counts)
        else:
            counts[name] += 1


def _time_loop_body(jaxpr):
    """The body of the outermost ``scan`` over time (the longest one)."""
    best = None
    stack = [jaxpr]
    while stack:
        current = stack.pop()
        for eqn in current.eqns:
            if eqn.primitive.name == "scan":
                length = eqn.params["length"]
                if best is None or length > best[0]:
                    best = (length, eqn.params["jaxpr"].jaxpr)
            elif eqn.primitive.name not in ("while", "cond"):
                stack.extend(_subjaxprs(eqn))
    return best[1]


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(")
_CALLEES = re.compile(
    r"(?:calls|to_apply|body|condition)=%([\w.\-]+)|branch_computations=\{([^}]*)\}"
)


def _hlo_computations(hlo: str) -> dict[str, list[str]]:
    """Instruction lines of each computation of an HLO module, by name."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = computations.setdefault(match.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            current.append(line)
    return computations


def _opcode(line: str) -> str:
    """The opcode of an HLO instruction line (``%x = type opcode(...)``)."""
    rest = line.split(" = ", 1)[1]
    if rest.startswith("("):  # tuple type: skip the balanced parentheses
        depth = 0
        for index, char in enumerate(rest):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                rest = rest[index + 1 :]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else rest
    return rest.strip().split("(", 1)[0]


def _trip_count(line: str) -> int:
    match = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
    return int(match.group(1)) if match else 0


def _hlo_time_loop(computations: dict[str, list[str]]) -> str:
    """The body computation of the ``while`` with the largest trip count."""
    best = None
    for lines in computations.values():
        for line in lines:
            if _opcode(line) == "while":
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                if best is None or _trip_count(line) > best[0]:
                    best = (_trip_count(line), body)
    return best[1]


def _hlo_source_tables(hlo: str):
    """The module's stack-frame tables: frame id -> (file, function, parent)."""
    section, files, functions, locations, frames = None, {}, {}, {}, {}
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section is None or not line.strip():
            section = None
            continue
        index = int(line.split(" ", 1)[0])
        fields = dict(re.findall(r"(\w+)=(\d+)", line))
        if section == "FileNames":
            files[index] = line.split(" ", 1)[1].strip('"')
        elif section == "FunctionNames":
            functions[index] = line.split(" ", 1)[1].strip('"')
        elif section == "FileLocations":
            locations[index] = (
                int(fields["file_name_id"]),
                int(fields["function_name_id"]),
            )
        else:
            frames[index] = (
                int(fields["file_location_id"]),
                int(fields["parent_frame_id"]),
            )
    return {
        frame: (files[locations[loc][0]], functions[locations[loc][1]], parent)
        for frame, (loc, parent) in frames.items()
    }


_FREE_OPS = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")


def _hlo_kernels_by_source(hlo: str, sources: tuple[str, ...]) -> dict[str, int]:
    """Kernels launched per step (top-level ops of the time-loop body) by source.

    Each op is attributed to the innermost Python frame in a file whose path
    contains one of ``sources`` (``file.py:function``); ops without source
    information (mostly copies of loop-carried buffers) count as ``"(copies
    and other unattributed ops)"``, key splits inside numpyro's ``seed``
    handler as ``"numpyro seed handler: key split"``. XLA keeps one source
    per jit-cached function (e.g. threefry split), that of its first trace,
    so all of a filter's threefry splits share one label.
    """
    computations = _hlo_computations(hlo)
    frames = _hlo_source_tables(hlo)

    def label(frame: int) -> str:
        seen = set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            path, function, parent = frames[frame]
            if "numpyro/handlers.py" in path and function == "seed.process_message":
                return "numpyro seed handler: key split"
            if any(source in path for source in sources):
                return f"{os.path.basename(path)}:{function}"
            frame = parent
        return "(other)"

    counts: collections.Counter = collections.Counter()
    for line in computations[_hlo_time_loop(computations)]:
        if _opcode(line) in _FREE_OPS:
            continue
        match = re.search(r"stack_frame_id=(\d+)", line)
        if match is None:
            counts["(copies and other unattributed ops)"] += 1
        else:
            counts[label(int(match.group(1)))] += 1
    return dict(counts.most_common())


def _hlo_step_profile(hlo: str) -> dict:
    """Op counts in the body of the time loop (the longest ``while``).

    Fused computations, nested loops and conditionals are counted inside
    (an op in a nested loop once, not per iteration); ``nested_loop_iterations``
    sums the trip counts of the loops nested in one step (small loops such
    as the rolled threefry rounds cost a fixed time per iteration on CPU).
    """
    computations = _hlo_computations(hlo)
    counts: collections.Counter = collections.Counter()
    iterations = 0

    def visit(name: str, multiplier: int) -> None:
        nonlocal iterations
        for line in computations.get(name, ()):
            op = _opcode(line)
            counts[op] += 1
            if op == "while":
                trips = _trip_count(line)
                iterations += multiplier * trips
                for callee in re.findall(r"(?:body|condition)=%([\w.\-]+)", line):
                    visit(callee, multiplier * max(trips, 1))
                continue
            for single, several in _CALLEES.findall(line):
                for callee in (
                    [single] if single else re.findall(r"%([\w.\-]+)", several)
                ):
                    visit(callee, multiplier)

    visit(_hlo_time_loop(computations), 1)
    profile = {op: counts.get(op, 0) for op in _HLO_OPS}
    profile["instructions"] = sum(counts.values())
    profile["nested_loop_iterations"] = iterations
    return profile


def profile(fn: Callable, args, compiled, sources: tuple[str, ...]) -> dict:
    """Per-step primitive counts (jaxpr), op counts and kernels by source (HLO)."""
    body = _time_loop_body(jax.make_jaxpr(fn)(*args).jaxpr)
    counts: collections.Counter = collections.Counter()
    _count_primitives(body, counts)
    step = {op: counts.get(op, 0) for op in _PARTICLE_OPS}
    step["total_equations"] = sum(counts.values())
    hlo = compiled.as_text()
    return {
        "step_jaxpr": step,
        "step_hlo": _hlo_step_profile(hlo),
        "step_kernels_by_source": _hlo_kernels_by_source(hlo, sources),
    }


def benchmark(
    num_particles: int,
    params,
    ys,
    key,
    repeats: int,
    compile_repeats: int,
    log_z_exact: float,
) -> dict:
    """Compile and steady-state times of both filters for one N."""
    args = (key, params, ys)
    result: dict = {"num_particles": num_particles}
    makers = {"ours": ours, "hand": hand}
    executables = {}
    for name, make in makers.items():
        compiles = []
        for _ in range(compile_repeats):
            executable, seconds = _compile(make(num_particles), args)
            compiles.append(seconds)
        executables[name] = executable
        first = time.perf_counter()
        estimates = jax.block_until_ready(executable(*args))
        result[name] = {
            field: statistics.median(c[field] for c in compiles)
            for field in compiles[0]
        }
        result[name].update(
            first_run_s=time.perf_counter() - first,
            log_Z=float(estimates.log_Z),
            log_Z_error=float(estimates.log_Z) - log_z_exact,
            mean_ess=float(np.mean(estimates.ess)),
        )
    wall: dict = {name: [] for name in makers}
    cpu: dict = {name: [] for name in makers}
    for index in range(repeats):
        order = ("ours", "hand") if index % 2 == 0 else ("hand", "ours")
        for name in order:
            tic, cpu_tic = time.perf_counter(), time.process_time()
            jax.block_until_ready(executables[name](*args))
            wall[name].append(time.perf_counter() - tic)
            cpu[name].append(time.process_time() - cpu_tic)
    for name in makers:
        quartiles = statistics.quantiles(wall[name], n=4)
        result[name].update(
            run_median_s=statistics.median(wall[name]),
            run_q1_s=quartiles[0],
            run_q3_s=quartiles[2],
            run_min_s=min(wall[name]),
            run_cpu_median_s=statistics.median(cpu[name]),
        )
        result[name]["profile"] = profile(
            makers[name](num_particles), args, executables[name], _SOURCES[name]
        )
    o, h = result["ours"], result["hand"]
    result["run_ratio"] = o["run_median_s"] / h["run_median_s"]
    result["run_cpu_ratio"] = o["run_cpu_median_s"] / h["run_cpu_median_s"]
    result["compile_ratio"] = (o["lower_s"] + o["compile_s"]) / (
        h["lower_s"] + h["compile_s"]
    )
    result["compile_cpu_ratio"] = (o["lower_cpu_s"] + o["compile_cpu_s"]) / (
        h["lower_cpu_s"] + h["compile_cpu_s"]
    )
    return result


def _table(results: list[dict]) -> str:
    header = (
        "| N | ours run (ms) | hand run (ms) | run ratio (wall) | run ratio (CPU) "
        "| ours trace+lower (s) | ours XLA compile (s) | hand trace+lower (s) "
        "| hand XLA compile (s) | compile ratio (wall) | compile ratio (CPU) |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in results:
        o, h = r["ours"], r["hand"]
        rows.append(
            f"| {r['num_particles']:,} | {1e3 * o['run_median_s']:.2f} "
            f"| {1e3 * h['run_median_s']:.2f} | {r['run_ratio']:.2f} "
            f"| {r['run_cpu_ratio']:.2f} "
            f"| {o['lower_s']:.2f} | {o['compile_s']:.2f} | {h['lower_s']:.2f} "
            f"| {h['compile_s']:.2f} | {r['compile_ratio']:.2f} "
            f"| {r['compile_cpu_ratio']:.2f} |"
        )
    return header + "\n".join(rows) + "\n"


def _profile_table(result: dict) -> str:
    o = result["ours"]["profile"]["step_jaxpr"]
    h = result["hand"]["profile"]["step_jaxpr"]
    lines = [
        "| primitive (per time step, jaxpr) | ours | hand |",
        "|---|---:|---:|",
    ]
    for op in (*_PARTICLE_OPS, "total_equations"):
        if o.get(op, 0) or h.get(op, 0):
            lines.append(f"| {op} | {o.get(op, 0)} | {h.get(op, 0)} |")
    oh = result["ours"]["profile"]["step_hlo"]
    hh = result["hand"]["profile"]["step_hlo"]
    lines += [
        "",
        "| op (time-loop body, optimised HLO) | ours | hand |",
        "|---|---:|---:|",
    ]
    for op in (*_HLO_OPS, "instructions", "nested_loop_iterations"):
        lines.append(f"| {op} | {oh.get(op, 0)} | {hh.get(op, 0)} |")
    for name in ("ours", "hand"):
        kernels = result[name]["profile"]["step_kernels_by_source"]
        lines += [
            "",
            f"| {name}: kernels per time step by source (optimised HLO) | count |",
            "|---|---:|",
        ]
        lines += [f"| {source} | {count} |" for source, count in kernels.items()]
        lines.append(f"| total | {sum(kernels.values())} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the benchmark, prints the table and writes the results files."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.smc_lgssm",
        description="Library bootstrap filter vs hand-written lax.scan filter.",
    )
    parser.add_argument("--steps", type=int, default=50, help="time steps T")
    parser.add_argument(
        "--particles",
        type=int,
        nargs="+",
        default=[1_000, 10_000, 100_000],
        help="particle numbers N",
    )
    parser.add_argument("--repeats", type=int, default=21, help="timed runs per N")
    parser.add_argument(
        "--compile-repeats", type=int, default=3, help="compilations per filter and N"
    )
    parser.add_argument("--seed", type=int, default=0, help="data and filter seed")
    parser.add_argument("--out", default=RESULTS, help="directory for the results")
    args = parser.parse_args(argv)

    machine = describe_machine()
    key_data, key_filter = jax.random.split(jax.random.key(args.seed))
    params = default_params(1)
    _, ys = simulate(key_data, params, args.steps)
    log_z_exact = float(kalman_filter(params, ys).log_likelihood)
    results = [
        benchmark(
            n, params, ys, key_filter, args.repeats, args.compile_repeats, log_z_exact
        )
        for n in args.particles
    ]
    machine["load_average_after"] = describe_machine()["load_average_1_5_15min"]

    title = (
        f"# Bootstrap filter: library (algo.smc) vs hand-written lax.scan\n\n"
        f"LGSSM d=1, T={args.steps}, systematic resampling at every step; "
        f"run time = median of {args.repeats} calls (interleaved; wall clock, "
        f"and process CPU time, which a loaded machine disturbs less); compile = "
        f"`jax.jit(f).lower(...)` (trace + lower) and `.compile()` (XLA), "
        f"caches cleared, median of {args.compile_repeats}; compile ratio = "
        f"total (trace + lower + XLA) ours / hand. Targets: run ratio <= 1.25, "
        f"compile ratio <= 2.\n\n"
        f"Machine: {machine['backend']} {machine['devices']}, "
        f"{machine['cpu_model']}, {machine['cpu_count']} CPUs "
        f"({machine['cpus_usable']} usable), load average "
        f"{machine['load_average_1_5_15min']} before and "
        f"{machine['load_average_after']} after; jax {machine['jax']}.\n\n"
    )
    accuracy = "\n".join(
        f"- N={r['num_particles']:,}: log Z-hat - log Z: ours "
        f"{r['ours']['log_Z_error']:+.3f}, hand {r['hand']['log_Z_error']:+.3f}; "
        f"mean ESS ours {r['ours']['mean_ess']:.0f}, hand {r['hand']['mean_ess']:.0f}"
        for r in results
    )
    markdown = (
        title
        + _table(results)
        + "\nSanity check (one run each):\n\n"
        + accuracy
        + f"\n\n## Profile (N={results[-1]['num_particles']:,})\n\n"
        + _profile_table(results[-1])
    )
    print(markdown)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "smc_lgssm.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.out, "smc_lgssm.json"), "w") as f:
        json.dump(
            {"machine": machine, "steps": args.steps, "results": results}, f, indent=2
        )
    return results


if __name__ == "__main__":
    main()
