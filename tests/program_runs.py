"""Starting a reference program's smoke run in a subprocess, for module fixtures.

A test module starts the run at once (a module-scoped fixture) and checks its
outputs last, so the module's other tests run while the program compiles.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Fast XLA compilation for the subprocess (a smoke run is dominated by it).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def start_smoke_run(program: str, seed: int, out: pathlib.Path) -> subprocess.Popen:
    """``python -m programs.<program> --smoke --seed <seed> --out <out>``, started."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), FAST_XLA]))
    return subprocess.Popen(
        [sys.executable, "-m", f"programs.{program}", "--smoke"]
        + ["--seed", str(seed), "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen) -> None:
    """Kills the run if it is still going (a failed or interrupted module)."""
    if process.poll() is None:
        process.kill()
        process.communicate()
