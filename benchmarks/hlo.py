"""Reading compiled XLA programs: op counts, loop bodies and source attribution.

The benchmark explains a speed difference by what the compiler was given:
how many operations run per step (each top-level operation of a computation
is one kernel launch on CPU and GPU; a fusion is one kernel), how many
loops, and which Python source produced them. Everything here reads the
text of an optimised HLO module (``jax.jit(f).lower(...).compile().as_text()``)
or a jaxpr; nothing runs.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Iterable

__all__ = [
    "FREE_OPS",
    "count_primitives",
    "instructions_by_source",
    "kernels_by_source",
    "loop_body_profile",
    "module_summary",
    "time_loop_body_jaxpr",
]

# Operations that move no data at run time (no kernel launch).
FREE_OPS = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")

# Op counts reported for the body of a time loop.
LOOP_BODY_OPS = (
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
    "copy",
)

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(")
_CALLEES = re.compile(
    r"(?:calls|to_apply|body|condition)=%([\w.\-]+)|branch_computations=\{([^}]*)\}"
)


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """Instruction lines of each computation, by name, and the entry's name."""
    computations: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = computations.setdefault(match.group(1), [])
            if line.startswith("ENTRY"):
                entry = match.group(1)
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            current.append(line)
    return computations, entry


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


def _callees(line: str) -> list[str]:
    names = []
    for single, several in _CALLEES.findall(line):
        names.extend([single] if single else re.findall(r"%([\w.\-]+)", several))
    return names


def module_summary(hlo: str) -> dict:
    """Size of a compiled module and the kernels it launches.

    ``kernels`` counts the operations that launch work (not parameters,
    tuples, bitcasts or constants) in the entry computation and in the
    bodies of its loops and conditionals, each counted once however often
    the loop runs; a fusion counts as one. ``kernels_per_call`` weights the
    loop bodies by their known trip counts, i.e. the launches of one call.
    ``instructions`` counts every instruction of every computation
    (fused computations included), a measure of what XLA had to compile.

    Args:
      hlo: the text of an optimised HLO module.

    Returns:
      ``{"instructions", "kernels", "kernels_per_call", "fusions", "while",
      "conditional", "sort", "custom-call", "copy"}``.
    """
    computations, entry = _computations(hlo)
    counts: collections.Counter = collections.Counter()
    per_call = 0

    def visit(name: str, multiplier: int, seen: tuple) -> None:
        nonlocal per_call
        if name in seen:
            return
        for line in computations.get(name, ()):
            op = _opcode(line)
            if op in FREE_OPS:
                continue
            counts["kernels"] += 1
            counts[op] += 1
            per_call += multiplier
            if op == "while":
                trips = max(_trip_count(line), 1)
                for callee in re.findall(r"(?:body|condition)=%([\w.\-]+)", line):
                    visit(callee, multiplier * trips, seen + (name,))
            elif op in ("conditional", "call"):
                for callee in _callees(line):
                    visit(callee, multiplier, seen + (name,))

    if entry is not None:
        visit(entry, 1, ())
    return {
        "instructions": sum(len(lines) for lines in computations.values()),
        "kernels": counts["kernels"],
        "kernels_per_call": per_call,
        "fusions": counts["fusion"],
        "while": counts["while"],
        "conditional": counts["conditional"],
        "sort": counts["sort"],
        "custom-call": counts["custom-call"],
        "copy": counts["copy"],
    }


def _time_loop(computations: dict[str, list[str]]) -> str | None:
    """The body of the outermost ``while`` with the largest trip count.

    Loops nested in another loop's body (threefry rounds, a blocked prefix
    sum inside an SMC step) are not candidates, however many trips they make:
    the time loop is the one that runs them.
    """
    nested: set[str] = set()

    def mark(name: str) -> None:
        if name in nested:
            return
        nested.add(name)
        for line in computations.get(name, ()):
            for callee in _callees(line):
                mark(callee)

    for lines in computations.values():
        for line in lines:
            if _opcode(line) == "while":
                for callee in re.findall(r"(?:body|condition)=%([\w.\-]+)", line):
                    mark(callee)
    best = None
    for name, lines in computations.items():
        if name in nested:
            continue
        for line in lines:
            if _opcode(line) == "while":
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                if best is None or _trip_count(line) > best[0]:
                    best = (_trip_count(line), body)
    return None if best is None else best[1]


def loop_body_profile(hlo: str) -> dict:
    """Op counts in the body of the longest loop (e.g. an SMC time step).

    Fused computations, nested loops and conditionals are counted inside
    (an op in a nested loop once, not per iteration); ``kernels`` counts
    the top-level launching ops of the body (one per fusion);
    ``nested_loop_iterations`` sums the trip counts of loops nested in one
    step (small rolled loops, such as threefry rounds, cost a fixed time per
    iteration on CPU).
    """
    computations, _ = _computations(hlo)
    body = _time_loop(computations)
    if body is None:
        return {}
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
            for callee in _callees(line):
                visit(callee, multiplier)

    visit(body, 1)
    profile = {op: counts.get(op, 0) for op in LOOP_BODY_OPS}
    profile["kernels"] = sum(
        1 for line in computations[body] if _opcode(line) not in FREE_OPS
    )
    profile["instructions"] = sum(counts.values())
    profile["nested_loop_iterations"] = iterations
    return profile


def _source_tables(hlo: str):
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
        if loc in locations and locations[loc][0] in files
    }


def kernels_by_source(hlo: str, sources: Iterable[str], loop: bool = True) -> dict:
    """Kernel launches by Python source: per loop iteration, or per call.

    Each launching op is attributed to the innermost Python frame in a file
    whose path contains one of ``sources`` (``file.py:function``); ops
    without source information (mostly copies of loop-carried buffers)
    count as ``"(copies and other unattributed ops)"``, key splits inside
    numpyro's ``seed`` handler as ``"numpyro seed handler: key split"``,
    ops from other files as ``"(other)"`` (jax, flax, optax internals). XLA
    keeps one source per jit-cached function (e.g. threefry split), that of
    its first trace.

    Args:
      hlo: an optimised HLO module with stack frames (the default for
        ``compile().as_text()``).
      sources: substrings of the file paths to attribute to.
      loop: count the top-level ops of the body of the longest loop (one
        iteration, e.g. one SMC step); else every launch of one call: the
        entry computation and, recursively, loop bodies weighted by their
        known trip counts (both branches of a conditional are counted).

    Returns:
      ``{label: count}``, most frequent first.
    """
    sources = tuple(sources)
    computations, entry = _computations(hlo)
    frames = _source_tables(hlo)
    start = _time_loop(computations) if loop else entry
    if start is None:
        return {}

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

    def visit(name: str, multiplier: int, seen: tuple) -> None:
        if name in seen:
            return
        for line in computations.get(name, ()):
            op = _opcode(line)
            if op in FREE_OPS:
                continue
            match = re.search(r"stack_frame_id=(\d+)", line)
            if match is None:
                counts["(copies and other unattributed ops)"] += multiplier
            else:
                counts[label(int(match.group(1)))] += multiplier
            if loop:
                continue
            if op == "while":
                trips = max(_trip_count(line), 1)
                for callee in re.findall(r"(?:body|condition)=%([\w.\-]+)", line):
                    visit(callee, multiplier * trips, seen + (name,))
            elif op in ("conditional", "call"):
                for callee in _callees(line):
                    visit(callee, multiplier, seen + (name,))

    visit(start, 1, ())
    return dict(counts.most_common())


def instructions_by_source(hlo: str, sources: Iterable[str]) -> dict:
    """HLO instructions of every computation (fused ones included) by source.

    What XLA had to compile, attributed like :func:`kernels_by_source`; a
    measure of where compile time goes.
    """
    sources = tuple(sources)
    computations, _ = _computations(hlo)
    frames = _source_tables(hlo)
    counts: collections.Counter = collections.Counter()
    for lines in computations.values():
        for line in lines:
            match = re.search(r"stack_frame_id=(\d+)", line)
            if match is None:
                counts["(no source)"] += 1
                continue
            frame, found = int(match.group(1)), "(other)"
            seen = set()
            while frame in frames and frame not in seen:
                seen.add(frame)
                path, function, parent = frames[frame]
                if any(source in path for source in sources):
                    found = f"{os.path.basename(path)}:{function}"
                    break
                frame = parent
            counts[found] += 1
    return dict(counts.most_common())


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def count_primitives(jaxpr, counts: collections.Counter | None = None):
    """Counts primitives, inlining nested calls but not loop or cond bodies."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("scan", "while", "cond"):
            counts[name] += 1
            continue
        subs = list(_subjaxprs(eqn))
        if subs:
            for sub in subs:
                count_primitives(sub, counts)
        else:
            counts[name] += 1
    return counts


def time_loop_body_jaxpr(jaxpr):
    """The body of the longest ``scan`` (or ``while``) in a jaxpr, or None."""
    best = None
    stack = [jaxpr]
    while stack:
        current = stack.pop()
        for eqn in current.eqns:
            name = eqn.primitive.name
            if name == "scan":
                length = eqn.params["length"]
                if best is None or length > best[0]:
                    best = (length, eqn.params["jaxpr"].jaxpr)
            elif name == "while":
                if best is None:
                    best = (0, eqn.params["body_jaxpr"].jaxpr)
            elif name != "cond":
                stack.extend(_subjaxprs(eqn))
    return None if best is None else best[1]
