"""Set-up for the docstring examples (``pytest --doctest-modules combinators``).

``make test`` runs every ``>>>`` example in the package as a doctest. The
examples assume the imports the tutorials and the API reference state
(``jax``, ``jnp``, ``np``, ``numpyro``, ``dist``, ``optax`` and
``combinators as coix``); this file puts them in each example's namespace.
Nothing here applies to the tests in ``tests/`` (their set-up is
``tests/conftest.py``).

In the smoke configuration (``COMBINATORS_SMOKE=1``, as ``make test`` runs)
the doctests compile without XLA's backend optimisations, as the tests do:
they run many small programs once each, so compile time dominates.
"""

import os

import pytest

FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


def pytest_configure(config):
    """Fast compilation for a doctest run in the smoke configuration."""
    if config.getoption("doctestmodules", False) and (
        os.environ.get("COMBINATORS_SMOKE") == "1"
    ):
        flags = os.environ.get("XLA_FLAGS", "")
        if FAST_COMPILE not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE}".strip()
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _doctest_imports(request):
    """The imports every docstring example may use."""
    if not isinstance(request.node, pytest.DoctestItem):
        return
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    import optax

    import combinators as coix

    namespace = request.getfixturevalue("doctest_namespace")
    namespace.update(
        jax=jax, jnp=jnp, np=np, numpyro=numpyro, dist=dist, optax=optax, coix=coix
    )
