"""Imports combinators before any test computes with JAX, so that its guard
against the jaxlib 0.10 CPU fusion miscompilation (combinators/_xla.py) is
in XLA_FLAGS before the backend starts."""

import combinators  # noqa: F401
