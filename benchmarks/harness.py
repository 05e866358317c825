"""Measuring implementations of a workload side by side in one process.

A workload is given as a list of :class:`Case` objects, one per
implementation (hand-written JAX, the library, Coix, NumPyro). Every case
is a step function ``step(state, key, *inputs) -> (state, aux)``: a
training step carries ``(params, opt_state)`` and returns its loss (and
metrics) in ``aux``; a sampler carries nothing and returns its estimates.

For every case :func:`measure` reports

* compile time (jitted cases): ``jax.jit(step).lower(...)`` (tracing and
  lowering, Python time in the library) and ``.compile()`` (XLA), with the
  compilation caches cleared first (the fastest of ``compile_repeats``);
* steady-state step time: the median over many steps, each timed with
  ``jax.block_until_ready`` on its outputs; the cases are interleaved in
  rounds (each round runs a block of steps of every case, in rotating
  order) so that load on a shared machine affects them alike; wall time
  and process CPU time (all threads of this process) are both kept;
* peak memory (jitted cases): from the compiled executable's
  ``memory_analysis()``: arguments + outputs + XLA temporaries - aliased
  bytes, i.e. the device memory one call needs beyond the executable
  itself; on GPU also the device's ``peak_bytes_in_use``;
* a profile: HLO instruction and kernel counts (:mod:`benchmarks.hlo`) and
  XLA's ``cost_analysis()`` flops and bytes accessed;
* the workload's quality metric, from the state after all the steps and
  the per-step outputs (every case runs the same number of steps).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import hlo

__all__ = [
    "Case",
    "Schedule",
    "describe_machine",
    "installed",
    "measure",
    "memory_of",
]


def installed(module: str) -> bool:
    """Whether an optional peer (``coix``, ``blackjax``, ``cuthbert``) imports."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@dataclasses.dataclass
class Case:
    """One implementation of a workload.

    Attributes:
      name: ``"hand"``, ``"ours"``, ``"coix"``, ``"numpyro"`` or a variant
        such as ``"ours (plain step)"``.
      step: ``step(state, key, *inputs) -> (state, aux)``.
      state: the initial carried state (a pytree; ``()`` for none).
      inputs: ``inputs(i)`` gives the extra arguments of step ``i`` (data,
        a minibatch); the same for every case of a workload.
      jit: compile the step with ``jax.jit`` (else run it eagerly).
      quality: ``quality(state, auxes) -> {name: float}`` after all steps;
        ``auxes`` are the per-step ``aux`` outputs, in order.
      sources: substrings of source paths for :func:`hlo.kernels_by_source`.
      loop: profile the body of the longest loop (a time step, a level, a
        sweep) rather than the whole entry computation.
      donate: donate the carried state to the jitted step
        (``donate_argnums=0``), as ``combinators.util.train`` does, so that
        XLA may update parameters and optimiser state in place.
      note: a short remark shown under the table.
    """

    name: str
    step: Callable
    state: Any
    inputs: Callable[[int], tuple]
    jit: bool = True
    quality: Callable[[Any, list], dict] | None = None
    sources: tuple[str, ...] = ()
    loop: bool = False
    donate: bool = True
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How many steps to run.

    Attributes:
      warmup: untimed steps after compilation.
      rounds: interleaved rounds.
      steps_per_round: timed steps of each case per round.
      compile_repeats: compilations per case (the fastest is reported).
    """

    warmup: int
    rounds: int
    steps_per_round: int
    compile_repeats: int = 1

    @property
    def total_steps(self) -> int:
        """Steps every case runs (warm-up and timed)."""
        return self.warmup + self.rounds * self.steps_per_round


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
    versions = {"jax": jax.__version__, "python": platform.python_version()}
    for module in ("jaxlib", "numpyro", "flax", "optax", "coix"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[module] = None
    return {
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average_1_5_15min": [round(x, 2) for x in load],
        "versions": versions,
    }


def load_average() -> float:
    """The one-minute load average (NaN where unknown)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return math.nan


def memory_of(compiled) -> dict:
    """Bytes one call of a compiled executable needs, from XLA's analysis.

    ``peak_bytes = argument + output + temp - alias``: the buffers live
    during a call (inputs, results and XLA's scratch space); the generated
    code is reported separately.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    fields = {
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
        "code_bytes": analysis.generated_code_size_in_bytes,
    }
    fields["peak_bytes"] = (
        fields["argument_bytes"]
        + fields["output_bytes"]
        + fields["temp_bytes"]
        - fields["alias_bytes"]
    )
    return fields


def _device_peak() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {
        "flops": float(cost.get("flops", math.nan)),
        "bytes_accessed": float(cost.get("bytes accessed", math.nan)),
    }


class _Runner:
    """A case being measured: its executable, state and timings."""

    def __init__(self, case: Case, keys: Sequence[jax.Array]):
        self.case = case
        self.keys = keys
        # A private copy: a donated state is consumed by the step.
        self.state = jax.tree_util.tree_map(
            lambda x: x.copy() if isinstance(x, jax.Array) else x, case.state
        )
        self.index = 0
        self.auxes: list = []
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.result: dict = {"name": case.name, "jit": case.jit}
        self.fn = case.step

    def compile(self, repeats: int) -> None:
        """Compiles the step (jitted cases), timing tracing and XLA separately."""
        args = (self.state, self.keys[0], *self.case.inputs(0))
        if not self.case.jit:
            return
        timings = []
        for _ in range(repeats):
            jax.clear_caches()
            wall, cpu = time.perf_counter(), time.process_time()
            donate = (0,) if self.case.donate else ()
            lowered = jax.jit(self.case.step, donate_argnums=donate).lower(*args)
            lowered_wall, lowered_cpu = time.perf_counter(), time.process_time()
            compiled = lowered.compile()
            timings.append(
                {
                    "lower_s": lowered_wall - wall,
                    "xla_s": time.perf_counter() - lowered_wall,
                    "lower_cpu_s": lowered_cpu - cpu,
                    "xla_cpu_s": time.process_time() - lowered_cpu,
                }
            )
        # The fastest compilation: the least disturbed by other load.
        best = min(timings, key=lambda t: t["lower_s"] + t["xla_s"])
        self.result.update(best)
        self.result["compile_s"] = self.result["lower_s"] + self.result["xla_s"]
        self.result["compile_cpu_s"] = (
            self.result["lower_cpu_s"] + self.result["xla_cpu_s"]
        )
        self.fn = compiled
        self.result["memory"] = memory_of(compiled)
        self.result["cost"] = _cost(compiled)
        text = compiled.as_text()
        self.result["hlo"] = hlo.module_summary(text)
        loop = hlo.loop_body_profile(text) if self.case.loop else {}
        if loop:
            self.result["hlo_loop_body"] = loop
        if self.case.sources:
            self.result["kernels_by_source"] = hlo.kernels_by_source(
                text, self.case.sources, loop=bool(loop)
            )

    def run(self, count: int, timed: bool) -> None:
        """Runs ``count`` steps, keeping per-step wall and CPU times if ``timed``."""
        for _ in range(count):
            i = self.index
            args = (self.state, self.keys[i], *self.case.inputs(i))
            wall, cpu = time.perf_counter(), time.process_time()
            state, aux = self.fn(*args)
            jax.block_until_ready((state, aux))
            if timed:
                self.wall.append(time.perf_counter() - wall)
                self.cpu.append(time.process_time() - cpu)
            elif i == 0:
                self.result["first_step_s"] = time.perf_counter() - wall
            self.state = state
            self.auxes.append(aux)
            self.index += 1

    def finish(self) -> dict:
        """Timing statistics and the quality metric."""
        wall = self.wall
        quartiles = statistics.quantiles(wall, n=4) if len(wall) > 1 else wall * 3
        self.result.update(
            steps=self.index,
            timed_steps=len(wall),
            step_median_s=statistics.median(wall),
            step_q1_s=quartiles[0],
            step_q3_s=quartiles[-1],
            step_min_s=min(wall),
            step_cpu_median_s=statistics.median(self.cpu),
        )
        if self.case.quality is not None:
            self.result["quality"] = {
                k: float(v)
                for k, v in self.case.quality(self.state, self.auxes).items()
            }
        if self.case.note:
            self.result["note"] = self.case.note
        self.auxes = []
        return self.result


def measure(
    cases: Sequence[Case],
    schedule: Schedule,
    key: jax.Array,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Compiles, warms up and times the cases interleaved; returns one dict each.

    Every case gets the same per-step keys and inputs. Rounds rotate the
    order of the cases, so none always runs first after another's
    allocations.

    Args:
      cases: the implementations.
      schedule: the number of steps.
      key: the key from which the per-step keys are split.
      log: progress messages.

    Returns:
      One result dict per case (see the module docstring).
    """
    keys = list(jax.random.split(key, schedule.total_steps))
    runners = [_Runner(case, keys) for case in cases]
    for runner in runners:
        tic = time.perf_counter()
        runner.compile(schedule.compile_repeats)
        runner.run(schedule.warmup, timed=False)
        peak = _device_peak()
        if peak is not None:
            runner.result["device_peak_bytes_in_use"] = peak
        log(
            f"    {runner.case.name}: compiled and warmed up in "
            f"{time.perf_counter() - tic:.1f} s"
        )
    for r in range(schedule.rounds):
        shift = r % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            runner.run(schedule.steps_per_round, timed=True)
    results = [runner.finish() for runner in runners]
    for result in results:
        log(
            f"    {result['name']}: {1e3 * result['step_median_s']:.3f} ms/step"
            + (
                f", compile {result['compile_s']:.2f} s"
                if "compile_s" in result
                else ""
            )
        )
    return results


def floats(tree) -> list[float]:
    """Host floats of a list of scalar arrays."""
    return [float(x) for x in np.asarray(jax.device_get(tree)).ravel()]
