"""Runs the benchmark workloads and writes ``results/latest.md`` and ``latest.json``.

Usage (from the repository root)::

    python -m benchmarks.run                 # everything (about 10 minutes)
    python -m benchmarks.run --quick         # small schedules, for development
    python -m benchmarks.run --workloads vae smc --out /tmp/bench

Each workload runs its implementations side by side in this process
(:mod:`benchmarks.harness`): the hand-written plain-JAX floor (``hand``),
the library (``ours``, plus diagnostic variants), Coix 0.1.0 (``coix``,
the ``bench`` extra) and NumPyro SVI (``numpyro``) where it applies. The
markdown report gives, per workload, the median step time with its
interquartile range, the ratios to the floor and to Coix, compile time
(tracing + lowering, and XLA), peak memory, HLO kernel counts and the
quality metric, then a table of the targets met or missed and the
machine's load average before and after each workload (the machine may be
shared; the cases are interleaved so that load affects them alike).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import jax

from benchmarks import annealing, apg, smc, vae
from benchmarks.harness import describe_machine, load_average

__all__ = ["WORKLOADS", "main"]

RESULTS = os.path.join(os.path.dirname(__file__), "results")

WORKLOADS = {
    "vae": vae.run,
    "annealing": annealing.run,
    "smc": smc.run,
    "apg": apg.run,
    "vae_eager": vae.run_eager,
}

# Step-time targets for "ours" against the hand-written floor.
FLOOR_TARGET = {"smc": 1.25}
DEFAULT_FLOOR_TARGET = 1.1
EAGER_SPEEDUP_TARGET = 2.0
COMPILE_GROWTH_TARGET = 1.25  # compile(T = 200) / compile(T = 10)


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ratio(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.2f}"


def _mb(nbytes) -> str:
    return "" if nbytes is None else f"{nbytes / 2**20:.2f}"


def _by_name(results: list[dict]) -> dict:
    return {r["name"]: r for r in results}


def _quality_keys(results: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in results:
        for k in r.get("quality", {}):
            if k not in keys:
                keys.append(k)
    return keys


def _fmt_quality(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4g}"


def group_table(results: list[dict]) -> str:
    """The markdown table of one group of results (one workload or one N)."""
    named = _by_name(results)
    floor, coix = named.get("hand"), named.get("coix")
    quality = _quality_keys(results)
    jitted = any(r["jit"] for r in results)
    header = ["implementation", "step ms (median [q1, q3])", "/ hand", "/ coix"]
    header += ["CPU / hand"]
    if jitted:
        header += [
            "compile s (trace+lower / XLA)",
            "compile / coix",
            "peak MB",
            "kernels",
        ]
    else:
        header += ["first step s"]
    header += quality
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for r in results:
        step = r["step_median_s"]
        row = [
            r["name"],
            f"{_ms(step)} [{_ms(r['step_q1_s'])}, {_ms(r['step_q3_s'])}]",
            _ratio(step / floor["step_median_s"]) if floor else "",
            _ratio(step / coix["step_median_s"]) if coix else "",
            _ratio(r["step_cpu_median_s"] / floor["step_cpu_median_s"])
            if floor
            else "",
        ]
        if jitted:
            compile_s = r.get("compile_s")
            row += [
                f"{compile_s:.2f} ({r['lower_s']:.2f} / {r['xla_s']:.2f})"
                if compile_s is not None
                else "",
                _ratio(compile_s / coix["compile_s"])
                if coix and compile_s is not None
                else "",
                _mb(r.get("memory", {}).get("peak_bytes")),
                str(r.get("hlo", {}).get("kernels", "")),
            ]
        else:
            row += [f"{r.get('first_step_s', math.nan):.2f}"]
        row += [
            _fmt_quality(r["quality"][k]) if k in r.get("quality", {}) else ""
            for k in quality
        ]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"- {r['name']}: {r['note']}" for r in results if r.get("note")]
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def profile_table(results: list[dict]) -> str:
    """HLO and memory profile of the jitted cases of a group."""
    rows = [r for r in results if r["jit"] and "hlo" in r]
    if not rows:
        return ""
    names = [r["name"] for r in rows]
    lines = [
        "| compiled program | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]

    def add(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    add("kernels (entry + loop bodies, once)", [str(r["hlo"]["kernels"]) for r in rows])
    add(
        "kernels per call (loops x trip count)",
        [str(r["hlo"]["kernels_per_call"]) for r in rows],
    )
    add("fusions", [str(r["hlo"]["fusions"]) for r in rows])
    add("copies", [str(r["hlo"]["copy"]) for r in rows])
    add("while loops", [str(r["hlo"]["while"]) for r in rows])
    add(
        "HLO instructions (all computations)",
        [str(r["hlo"]["instructions"]) for r in rows],
    )
    add("XLA flops", [f"{r.get('cost', {}).get('flops', math.nan):.3g}" for r in rows])
    add(
        "XLA bytes accessed",
        [f"{r.get('cost', {}).get('bytes_accessed', math.nan):.3g}" for r in rows],
    )
    add("temp MB", [_mb(r.get("memory", {}).get("temp_bytes")) for r in rows])
    add(
        "argument + output MB",
        [
            _mb(
                r.get("memory", {}).get("argument_bytes", 0)
                + r.get("memory", {}).get("output_bytes", 0)
            )
            for r in rows
        ],
    )
    if any("hlo_loop_body" in r for r in rows):
        add(
            "kernels per loop iteration (body)",
            [str(r.get("hlo_loop_body", {}).get("kernels", "")) for r in rows],
        )
        add(
            "nested loop trips per iteration (threefry rounds, searches)",
            [
                str(r.get("hlo_loop_body", {}).get("nested_loop_iterations", ""))
                for r in rows
            ],
        )
        add(
            "instructions per loop iteration",
            [str(r.get("hlo_loop_body", {}).get("instructions", "")) for r in rows],
        )
    return "\n".join(lines) + "\n"


def sources_table(results: list[dict], top: int = 12) -> str:
    """Kernels by Python source, per implementation (the biggest sources)."""
    parts = []
    for r in results:
        kernels = r.get("kernels_by_source")
        if not kernels:
            continue
        where = "per loop iteration" if "hlo_loop_body" in r else "launched per call"
        lines = [
            f"| {r['name']}: kernels {where} by source | count |",
            "|---|---:|",
        ]
        items = list(kernels.items())
        for source, count in items[:top]:
            lines.append(f"| {source} | {count} |")
        if len(items) > top:
            rest = sum(c for _, c in items[top:])
            lines.append(f"| ({len(items) - top} other sources) | {rest} |")
        lines.append(f"| total | {sum(kernels.values())} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + ("\n" if parts else "")


def _compile_cell(r: dict) -> str:
    return f"{r['compile_s']:.2f} ({r['lower_s']:.2f} / {r['xla_s']:.2f})"


def particle_scaling_table(section: dict) -> str:
    """Step time per particle and time step, and peak memory, against N.

    Flat at large N (the per-particle cost), rising at small N where the
    fixed per-step cost (kernel launches, key derivation) dominates.
    """
    groups = [g for g in section.get("groups", []) if "num_particles" in g]
    num_steps = section.get("num_steps")
    if len(groups) < 2 or not num_steps:
        return ""
    names = [r["name"] for r in groups[0]["results"]]
    lines = [
        "| N | "
        + " | ".join(f"{n} ns / particle-step" for n in names)
        + " | "
        + " | ".join(f"{n} peak MB" for n in names)
        + " |",
        "|---:|" + "---:|" * (2 * len(names)),
    ]
    for group in groups:
        named = _by_name(group["results"])
        n = group["num_particles"]
        times = [
            f"{1e9 * named[k]['step_median_s'] / (n * num_steps):.1f}"
            if k in named
            else ""
            for k in names
        ]
        peaks = [
            _mb(named[k].get("memory", {}).get("peak_bytes")) if k in named else ""
            for k in names
        ]
        lines.append(f"| {n:,} | " + " | ".join(times + peaks) + " |")
    return "\n".join(lines) + "\n"


def compile_scaling_table(rows: list[dict]) -> str:
    """Compile time against the number of SMC steps T."""
    if not rows:
        return ""
    names = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    header = (
        "| T | N | "
        + " | ".join(f"{n} compile s (trace+lower / XLA)" for n in names)
        + " | "
        + " | ".join(f"{n} HLO instr." for n in names)
        + " |"
    )
    lines = [header, "|---:|---:|" + "---:|" * (2 * len(names))]
    for row in rows:
        cells = [_compile_cell(row[n]) for n in names]
        cells += [str(row[n]["hlo_instructions"]) for n in names]
        lines.append(f"| {row['T']} | {row['N']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def targets(report: dict) -> list[dict]:
    """Checks every target of the issue against the results.

    Each check has the wall-clock ratio (``value``, which decides ``met``)
    and the same ratio of process CPU time (``cpu_value``), which other
    load on a shared machine disturbs less.
    """
    checks = []

    def check(workload, label, what, pair, field, limit, higher_is_better=False):
        mine, theirs = pair
        cpu_field = field.replace("_median_s", "_cpu_median_s").replace(
            "compile_s", "compile_cpu_s"
        )
        value = mine[field] / theirs[field]
        cpu_value = (
            mine[cpu_field] / theirs[cpu_field]
            if cpu_field in mine and cpu_field in theirs
            else math.nan
        )
        if not math.isfinite(value):
            return

        def ok(v):
            return v >= limit if higher_is_better else v <= limit

        checks.append(
            {
                "workload": workload,
                "group": label,
                "target": f"{what} {'>=' if higher_is_better else '<='} {limit:g}",
                "value": value,
                "met": bool(ok(value)),
                "cpu_value": cpu_value,
                "cpu_met": bool(ok(cpu_value)) if math.isfinite(cpu_value) else None,
            }
        )

    for name, section in report["workloads"].items():
        for group in section.get("groups", []):
            named = _by_name(group["results"])
            ours, hand, coix = named.get("ours"), named.get("hand"), named.get("coix")
            if ours is None:
                continue
            label = group["label"]
            if name == "vae_eager":
                pairs = [
                    ("coix", "ours"),
                    ("coix (util.train step)", "ours (train step)"),
                ]
                for theirs, mine in pairs:
                    if theirs in named and mine in named:
                        check(
                            name,
                            label,
                            f"{theirs} step / {mine} step",
                            (named[theirs], named[mine]),
                            "step_median_s",
                            EAGER_SPEEDUP_TARGET,
                            higher_is_better=True,
                        )
                continue
            if hand:
                limit = FLOOR_TARGET.get(name, DEFAULT_FLOOR_TARGET)
                check(
                    name,
                    label,
                    "ours step / hand step",
                    (ours, hand),
                    "step_median_s",
                    limit,
                )
            if coix:
                check(
                    name,
                    label,
                    "ours step / coix step",
                    (ours, coix),
                    "step_median_s",
                    1.0,
                )
                if "compile_s" in ours and "compile_s" in coix:
                    check(
                        name,
                        label,
                        "ours compile / coix compile",
                        (ours, coix),
                        "compile_s",
                        1.0,
                    )
        scaling = section.get("compile_scaling") or []
        if len(scaling) >= 2 and "ours" in scaling[0]:
            first, last = scaling[0], scaling[-1]
            check(
                name,
                f"T = {first['T']} -> {last['T']}",
                f"ours compile(T={last['T']}) / compile(T={first['T']})",
                (last["ours"], first["ours"]),
                "compile_s",
                COMPILE_GROWTH_TARGET,
            )
    return checks


def targets_table(checks: list[dict]) -> str:
    """The targets as a markdown table (wall clock decides; CPU time alongside)."""
    lines = [
        "| workload | group | target | value (wall) | met | value (CPU time) "
        "| met (CPU) |",
        "|---|---|---|---:|:---:|---:|:---:|",
    ]

    def mark(met):
        return "" if met is None else ("yes" if met else "**no**")

    for c in checks:
        cpu = c.get("cpu_value", math.nan)
        lines.append(
            f"| {c['workload']} | {c['group']} | {c['target']} | {c['value']:.2f} "
            f"| {mark(c['met'])} | {cpu:.2f} | {mark(c.get('cpu_met'))} |"
        )
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    """The whole report."""
    machine = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    out = [
        "# Benchmarks: hand-written JAX vs combinators vs Coix 0.1.0 vs NumPyro\n",
        f"Run {report['started']} with `{report['command']}` "
        f"({'quick' if report['quick'] else 'full'} schedules, "
        f"{report['elapsed_s']:.0f} s).\n",
        f"Machine: {machine['backend']} {machine['devices']}, {machine['cpu_model']}, "
        f"{machine['cpu_count']} CPUs ({machine['cpus_usable']} usable); load "
        f"average (1/5/15 min) {machine['load_average_1_5_15min']} at the start, "
        f"{report['load_average_end']} at the end; {versions}.\n",
        "How to read: step = median over the timed steps of one jitted (or eager) "
        "training step / filter run, each timed with `block_until_ready`, the "
        "implementations interleaved in rounds; `/ hand` is the ratio to the "
        "hand-written floor, `/ coix` to Coix; `CPU / hand` the same ratio of "
        "process CPU time (less disturbed by other load). Compile = "
        "`jax.jit(step).lower(...)` (tracing + lowering: Python time) + "
        "`.compile()` (XLA), caches cleared. Peak MB = argument + output + XLA "
        "temporaries - aliased bytes of the compiled executable "
        "(`memory_analysis()`), the memory one call needs. Kernels = operations "
        "that launch work in the optimised HLO (a fusion is one), counted once "
        "per loop body. Quality metrics are computed after the same number of "
        "steps for every implementation by one shared evaluator.\n",
        "## Targets\n",
        targets_table(report["targets"]),
    ]
    for name, section in report["workloads"].items():
        out.append(f"## {section['title']} (`{name}`)\n")
        out.append(section["description"] + ".\n")
        out.append(
            f"Load average {section['load_before']} before, {section['load_after']} "
            f"after; {section['elapsed_s']:.0f} s.\n"
        )
        for group in section.get("groups", []):
            if group["label"]:
                out.append(f"### {group['label']}\n")
            out.append(group_table(group["results"]))
        sweep = particle_scaling_table(section)
        if sweep:
            out.append("### Scaling with N: time per particle-step, peak memory\n")
            out.append(sweep)
        if section.get("compile_scaling"):
            out.append("### Compile time against the number of steps T\n")
            out.append(compile_scaling_table(section["compile_scaling"]))
        groups = section.get("groups", [])
        if groups:
            last = groups[-1]
            label = f" ({last['label']})" if last["label"] else ""
            profile = profile_table(last["results"])
            if profile:
                out.append(f"### Profile{label}\n")
                out.append(profile)
                out.append(sources_table(last["results"]))
    return "\n".join(out)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    """Runs the chosen workloads, prints the report and writes the results."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="hand-written JAX vs combinators vs Coix vs NumPyro",
    )
    parser.add_argument("--quick", action="store_true", help="small schedules")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=sorted(WORKLOADS),
        default=list(WORKLOADS),
        help="workloads to run (default: all)",
    )
    parser.add_argument("--out", default=RESULTS, help="directory for latest.md/.json")
    args = parser.parse_args(argv)

    started = datetime.datetime.now().isoformat(timespec="seconds")
    tic = time.perf_counter()
    report: dict = {
        "started": started,
        "command": "python -m benchmarks.run " + " ".join(argv or sys.argv[1:]),
        "quick": args.quick,
        "machine": describe_machine(),
        "workloads": {},
    }
    for name in args.workloads:
        _log(f"{name}: starting (load average {load_average()})")
        load_before, section_tic = load_average(), time.perf_counter()
        section = WORKLOADS[name](args.quick, log=_log)
        section.update(
            load_before=load_before,
            load_after=load_average(),
            elapsed_s=time.perf_counter() - section_tic,
        )
        report["workloads"][name] = section
        _log(f"{name}: done in {section['elapsed_s']:.0f} s")
        jax.clear_caches()
    report["load_average_end"] = describe_machine()["load_average_1_5_15min"]
    report["elapsed_s"] = time.perf_counter() - tic
    report["targets"] = targets(report)
    text = markdown(report)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    _log(f"wrote {os.path.join(args.out, 'latest.md')} and latest.json")
    return report


if __name__ == "__main__":
    main()
