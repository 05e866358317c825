"""Test-session set-up, before any test computes with JAX.

* In the smoke configuration (``COMBINATORS_SMOKE=1``, what ``make test``
  and CI run), XLA compiles without its backend optimisations: the tests
  run many small programs once each, so compile time dominates, and this
  cuts the suite's time by about an eighth. On jaxlib 0.10 XLA:CPU's MLIR
  fusion emitters (its default there) are turned off too: the older
  emitters compile the same programs in about half the time (backend
  compile of a sample of SMC, tempering and annealing tests: -45%, the
  sample's wall time -27%). jaxlib 0.12 has no such switch and an unknown
  flag aborts XLA, so it is set on the 0.10 series only. Numbers are
  checked with tolerances either way; ``tests/test_xla_guard.py`` runs its
  subprocesses with XLA's default flags (the CPU-fusion miscompilation it
  guards against appears only with optimisations on).
* combinators is imported first, so that its guard against the jaxlib 0.10
  CPU fusion miscompilation (combinators/_xla.py) is in XLA_FLAGS before the
  backend starts.
"""

import importlib.metadata
import os

FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
if importlib.metadata.version("jaxlib").startswith("0.10."):
    FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false"

if os.environ.get("COMBINATORS_SMOKE") == "1":
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    )

import combinators  # noqa: E402, F401
