"""Calling a Flax linen module's parts with fixed parameters."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["BindModule"]


class _BoundMember:
    """A submodule or method of a bound module; callable and indexable."""

    def __init__(self, module, params, name: str, index=None):
        self._module, self._params, self._name, self._index = (
            module,
            params,
            name,
            index,
        )

    def _method(self):
        name, index = self._name, self._index

        def method(module, *args, **kwargs):
            member = getattr(module, name)
            if index is not None:
                member = member[index]
            return member(*args, **kwargs)

        return method

    def __call__(self, *args, **kwargs):
        return self._module.apply(self._params, *args, method=self._method(), **kwargs)

    def __getitem__(self, index):
        return _BoundMember(self._module, self._params, self._name, index)


class BindModule:
    """A Flax linen module with its parameters, usable inside jit and grad.

    Unlike ``module.bind(params)``, nothing is stored in the module, so the
    bound object can be rebuilt inside a jit-compiled loss from traced
    parameters. ``bound(x)`` calls the module; ``bound.encoder(x)`` calls a
    submodule or method named ``encoder``; ``bound.kernels[i](x)`` indexes a
    list of submodules; module fields are returned as they are.

    Example:
      >>> import flax.linen as nn
      >>> class AutoEncoder(nn.Module):
      ...     def setup(self):
      ...         self.encoder = nn.Dense(2)
      ...         self.decoder = nn.Dense(4)
      ...     def __call__(self, x):
      ...         return self.decoder(self.encoder(x))
      >>> x = jnp.ones((5, 4))
      >>> params = AutoEncoder().init(jax.random.key(0), x)
      >>> network = BindModule(AutoEncoder(), params)
      >>> network.encoder(x).shape, network(x).shape
      ((5, 2), (5, 4))
    """

    def __init__(self, module, params):
        self.module = module
        self.params = params

    def __call__(self, *args, **kwargs):
        """Applies the module with its bound parameters."""
        return self.module.apply(self.params, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("module", "params"):
            raise AttributeError(name)
        module = self.__dict__["module"]
        fields = (
            {f.name for f in dataclasses.fields(module)}
            if dataclasses.is_dataclass(module)
            else set()
        )
        if name in fields and name not in ("parent", "name"):
            return getattr(module, name)
        attr = getattr(type(module), name, None)
        if attr is not None and not callable(attr):
            return attr
        return _BoundMember(module, self.__dict__["params"], name)
