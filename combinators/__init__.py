"""combinators: inference combinators for JAX and NumPyro.

Programs are functions using numpyro primitives. Combinators turn them into
importance samplers: ``compose``, ``extend``, ``propose``, ``resample`` and
``fori_loop``. The public names and signatures follow Coix, so a Coix script
runs after ``import combinators as coix``.
"""

from combinators._xla import guard_cpu_fusion as _guard_cpu_fusion

_guard_cpu_fusion()

from combinators import (  # noqa: E402
    algo,
    amortized,
    checks,
    diagnostics,
    estimators,
    inspect,
    loss,
    plots,
    relaxed,
    resampling,
    util,
    weights,
)
from combinators.api import (
    compose,
    extend,
    fori_loop,
    memoize,
    newest,
    propose,
    resample,
    scan,
)
from combinators.checks import checked
from combinators.kleisli import Kernel, ParamKernel, repeat, stack
from combinators.handlers import (
    detach,
    empirical,
    stick_the_landing,
    suffix,
    traced_evaluate,
)
from combinators.keys import require_key as _require_key
from combinators.metrics import History, Metrics
from combinators.trace import Plate, Site, Trace

__version__ = "0.1.0"

__all__ = [
    "History",
    "Kernel",
    "ParamKernel",
    "Metrics",
    "Plate",
    "Site",
    "Trace",
    "algo",
    "amortized",
    "checked",
    "checks",
    "compose",
    "detach",
    "diagnostics",
    "empirical",
    "estimators",
    "extend",
    "fori_loop",
    "inspect",
    "loss",
    "memoize",
    "newest",
    "plots",
    "prng_key",
    "propose",
    "relaxed",
    "repeat",
    "resample",
    "resampling",
    "scan",
    "set_backend",
    "stack",
    "stick_the_landing",
    "suffix",
    "traced_evaluate",
    "util",
    "weights",
]

_BACKENDS = ("numpyro", "coix.numpyro", "combinators.numpyro")


def set_backend(backend: str) -> None:
    """Accepted for Coix scripts; numpyro is the only backend.

    There is no global backend state: this only checks the name.

    Raises:
      ValueError: for any backend other than numpyro.
    """
    if backend not in _BACKENDS:
        raise ValueError(
            f"set_backend: only the numpyro backend exists, got {backend!r}."
        )


def prng_key():
    """A fresh PRNG key from the enclosing ``numpyro.handlers.seed``.

    Raises:
      ValueError: outside a seed handler (says how to pass a key).
    """
    return _require_key("prng_key")
