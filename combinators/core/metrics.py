"""The fixed record of diagnostics every evaluated program returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["ANCESTORS", "History", "Metrics"]

#: The ``extras`` key under which ``resample(..., record_ancestors=True)``
#: reports the ancestor index of every new particle. Loops (``fori_loop``,
#: ``scan``) keep it out of their carry; ``scan`` shows it to its ``record``
#: function, so a per-step record can keep the genealogy (see
#: :mod:`combinators.smoothing`).
ANCESTORS = "ancestors"

_FIELDS = ("log_weight", "ess", "log_Z", "loss", "log_density", "resampled")


@dataclasses.dataclass
class Metrics(MutableMapping):
    """Diagnostics of a (weighted) program, with fixed fields.

    The record always has the same fields, so loop carries (``fori_loop``,
    ``lax.scan``) line up by construction. It also reads and writes like
    Coix's metrics dict: ``metrics["loss"]``, ``"log_Z" in metrics``,
    ``dict(metrics)``, ``metrics["log_Z"] = metrics["log_Z"] / n``; a new key
    goes to ``extras``; ``pop`` of a fixed field leaves ``None`` in its place.

    Attributes:
      log_weight: per-particle log importance weights; shape is the particle
        layout (particle axis first), ``()`` for a single particle.
      ess: effective sample size ``1 / sum(normalised_weights**2)``, averaged
        over non-particle axes. NaN when the weights are not finite.
      log_Z: estimate of the log normaliser,
        ``logsumexp(log_weight) - log(num_particles)`` summed over
        non-particle axes.
      loss: accumulated loss of the ``propose`` steps (0 when none).
      log_density: log density of the target's marginal sites, averaged over
        particles.
      extras: further named arrays (e.g. ``memory`` of ``memoize``;
        :data:`ANCESTORS` of ``resample(..., record_ancestors=True)``: the
        index, among the incoming particles, of every new particle's
        ancestor, shape ``(M,) + columns``).
      resampled: whether the program's latest ``resample`` drew new
        particles (a boolean scalar; always True for a non-adaptive
        ``resample``, data-dependent under ``resample(..., ess_threshold=)``).
    """

    log_weight: Any
    ess: Any
    log_Z: Any
    loss: Any
    log_density: Any
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resampled: Any = False

    def __getitem__(self, key: str) -> Any:
        if key in _FIELDS:
            return getattr(self, key)
        return self.extras[key]

    def __iter__(self) -> Iterator[str]:
        yield from _FIELDS
        yield from self.extras

    def __len__(self) -> int:
        return len(_FIELDS) + len(self.extras)

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _FIELDS:
            object.__setattr__(self, key, value)
        else:
            self.extras = {**self.extras, key: value}

    def __delitem__(self, key: str) -> None:
        if key in _FIELDS:
            object.__setattr__(self, key, None)
        else:
            extras = dict(self.extras)
            del extras[key]
            self.extras = extras

    def __contains__(self, key: object) -> bool:
        return key in _FIELDS or key in self.extras

    def replace(self, **changes: Any) -> Metrics:
        """Returns a copy with some fields (or extras) changed."""
        fields = {k: v for k, v in changes.items() if k in _FIELDS}
        extra = {k: v for k, v in changes.items() if k not in _FIELDS and k != "extras"}
        extras = dict(changes.get("extras", self.extras))
        extras.update(extra)
        return dataclasses.replace(self, extras=extras, **fields)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of all fields and extras."""
        return dict(self.items())

    def summary(self) -> dict[str, float]:
        """Scalar diagnostics as Python floats (for printing and logging)."""
        out = {}
        for key, value in self.items():
            if jnp.ndim(value) == 0:
                out[key] = float(value)
        return out


jax.tree_util.register_dataclass(
    Metrics, data_fields=list(_FIELDS) + ["extras"], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class History:
    """Per-step diagnostics of a :func:`~combinators.scan` loop.

    Every field is stacked over steps (axis 0): entry 0 is the initial
    program, entry ``t`` the program after step ``t``.

    Attributes:
      ess: effective sample size after each step.
      log_Z: running log normaliser estimate.
      log_Z_increment: ``log_Z[t] - log_Z[t-1]`` (entry 0: ``log_Z[0]``).
      resampled: whether the step resampled.
      records: what the loop's ``record`` function returned, stacked.
    """

    ess: Any
    log_Z: Any
    log_Z_increment: Any
    resampled: Any
    records: Any = dataclasses.field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


jax.tree_util.register_dataclass(
    History,
    data_fields=["ess", "log_Z", "log_Z_increment", "resampled", "records"],
    meta_fields=[],
)
