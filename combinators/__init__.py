"""combinators: inference combinators for JAX and NumPyro.

Programs are functions using numpyro primitives. Combinators turn them into
importance samplers: ``compose``, ``extend``, ``propose``, ``resample`` and
``fori_loop``. The public names and signatures follow Coix, so a Coix script
runs after ``import combinators as coix``.

Module map (each layer uses only the layers above it):

* ``types``: ``Program``, ``LossFn``, ``Array``, ``PRNGKey``.
* ``core/``: program <-> ``(out, Trace, Metrics)``; the only code that
  touches numpyro's handler stack. ``trace`` (Site, Plate, Trace),
  ``metrics`` (Metrics, History), ``messages`` (the ``msg["infer"]``
  contract), ``evaluate`` (traced_evaluate, empirical), ``sites`` (a
  checked Site per sample message), ``transforms``
  (suffix, detach, stick_the_landing, scope), ``keys``, ``checked``,
  ``pretty`` (trace printout).
* ``weights``, ``resampling``, ``diagnostics``, ``mcmc``: pure array maths
  (layout, log Z, ESS; resampling schemes; Monte Carlo diagnostics;
  Metropolis-Hastings kernels over particle populations).
* ``api/``: the combinators, one family per file: ``_compose`` (compose,
  extend, newest), ``_propose``, ``_resample``, ``_loops`` (fori_loop,
  scan), ``_memoize``, ``_move`` (MCMC moves).
* ``loss/``: every objective with the shared signature, by family:
  ``_nested`` (Coix's seven), ``_score`` (REINFORCE, NVIL, VIMCO), ``_dreg``,
  ``_renyi``, ``_wake_sleep``; site roles in ``roles``.
* ``algo``: algorithms as short compositions of combinators and losses
  (SVI, IWAE, RWS, AFT, DAIS, NVI, APG, SMC, VSMC, NASMC; builders such as
  ``vimco``, ``dreg_iwae``, ``sleep_phi``).
* ``smoothing``: particle smoothing from an SMC run's per-step history
  (genealogy tracing, forward-filtering backward-simulation).
* ``pmcmc``: particle MCMC (conditional SMC with ancestor sampling,
  particle Gibbs, particle marginal Metropolis-Hastings).
* Around them: ``kleisli`` (``>>`` composition of kernels), ``amortized``
  (q(z|x), p(x,z) for autoencoders), ``relaxed`` (Concrete), ``sharding``,
  ``train`` and ``checkpoint`` (optax loop), ``inspect`` and ``plots``,
  ``util`` (Coix's ``util``).
* Compatibility modules keep historical import paths: ``handlers``,
  ``checks``, ``keys``, ``trace``, ``metrics``, ``estimators``.
"""

from combinators._xla import guard_cpu_fusion as _guard_cpu_fusion

_guard_cpu_fusion()

from combinators import (  # noqa: E402
    algo,
    amortized,
    checks,
    core,
    diagnostics,
    estimators,
    inspect,
    loss,
    mcmc,
    plots,
    pmcmc,
    relaxed,
    resampling,
    smoothing,
    util,
    weights,
)
from combinators.api import (
    compose,
    extend,
    fori_loop,
    memoize,
    move,
    newest,
    propose,
    resample,
    scan,
)
from combinators.core.backend import prng_key, set_backend
from combinators.core.checked import checked
from combinators.core.evaluate import empirical, traced_evaluate
from combinators.core.metrics import History, Metrics
from combinators.core.paths import temper
from combinators.core.trace import Plate, Site, Trace
from combinators.core.transforms import detach, stick_the_landing, suffix
from combinators.kleisli import Kernel, ParamKernel, repeat, stack

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
    "core",
    "compose",
    "detach",
    "diagnostics",
    "empirical",
    "estimators",
    "extend",
    "fori_loop",
    "inspect",
    "loss",
    "mcmc",
    "memoize",
    "move",
    "newest",
    "plots",
    "pmcmc",
    "prng_key",
    "propose",
    "relaxed",
    "repeat",
    "resample",
    "resampling",
    "scan",
    "smoothing",
    "set_backend",
    "stack",
    "stick_the_landing",
    "suffix",
    "temper",
    "traced_evaluate",
    "util",
    "weights",
]
