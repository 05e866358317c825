"""The core: programs <-> (out, Trace, Metrics), and nothing else.

This subpackage is the only code that talks to numpyro's effect-handler
stack or reads its private names; the rest of the library uses its public
functions. One job per module:

* :mod:`~combinators.core.trace`: ``Site``, ``Plate``, ``Trace`` (pytrees);
* :mod:`~combinators.core.metrics`: ``Metrics``, ``History`` (fixed records);
* :mod:`~combinators.core.messages`: the ``msg["infer"]`` keys as a contract;
* :mod:`~combinators.core.evaluate`: ``traced_evaluate``, ``empirical``;
* :mod:`~combinators.core.sites`: a checked ``Site`` from a sample message;
* :mod:`~combinators.core.transforms`: ``suffix``, ``detach``,
  ``stick_the_landing``, ``scope``, the one distribution wrapper;
* :mod:`~combinators.core.keys`: PRNG keys from arguments or seed handlers;
* :mod:`~combinators.core.checked`: checked mode (``checkify``);
* :mod:`~combinators.core.pretty`: the printout of a trace (a leaf);
* :mod:`~combinators.core.backend`: Coix's ``coix.core`` backend API
  (``set_backend``, ``register_backend``, ``get_backend_name``,
  ``desuffix``) for the one numpyro backend.

Its public names are also Coix's ``coix.core`` names, so ``from coix import
core`` scripts work after ``import combinators as coix``.
"""

from combinators.core.backend import (
    desuffix,
    get_backend_name,
    prng_key,
    register_backend,
    set_backend,
)
from combinators.core.evaluate import empirical, traced_evaluate
from combinators.core.metrics import History, Metrics
from combinators.core.trace import Plate, Site, Trace
from combinators.core.transforms import detach, stick_the_landing, suffix

__all__ = [
    "History",
    "Metrics",
    "Plate",
    "Site",
    "Trace",
    "desuffix",
    "detach",
    "empirical",
    "get_backend_name",
    "prng_key",
    "register_backend",
    "set_backend",
    "stick_the_landing",
    "suffix",
    "traced_evaluate",
]
