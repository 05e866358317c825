"""Program transforms: effect handlers that change how sites are drawn.

``suffix`` and ``auxiliary`` mark sites for the combinators (``compose`` and
``extend``); ``detach`` and ``stick_the_landing`` stop gradients; ``scope``
prefixes names; :func:`map_fresh_samples` lets other modules (sharding)
change the values of freshly drawn sites. Every one changes a site through
:class:`WrappedDistribution`, the one distribution wrapper of the library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpyro
import numpyro.distributions as dist
from numpyro.primitives import Messenger

from combinators.core import messages

__all__ = [
    "WrappedDistribution",
    "auxiliary",
    "base_distribution",
    "detach",
    "map_fresh_samples",
    "scope",
    "scope_parts",
    "stick_the_landing",
    "suffix",
]


class WrappedDistribution(dist.Distribution):
    """``base_dist`` with its samples mapped and, optionally, detached params.

    Args:
      base_dist: the distribution to wrap.
      sample_fn: applied to every sample (e.g. ``jax.lax.stop_gradient`` or a
        sharding constraint); must keep the value's shape. Part of the pytree
        definition, so pass a hashable function.
      detach_params: stop gradients through the parameters in ``log_prob``.
    """

    def __init__(
        self,
        base_dist: dist.Distribution,
        sample_fn: Callable | None = None,
        detach_params: bool = False,
    ):
        self.base_dist = base_dist
        self.sample_fn = sample_fn
        self.detach_params = detach_params
        super().__init__(base_dist.batch_shape, base_dist.event_shape)

    @property
    def support(self):
        """The base distribution's support."""
        return self.base_dist.support

    @property
    def has_rsample(self):
        """Whether the base distribution is reparameterisable."""
        return self.base_dist.has_rsample

    def sample(self, key, sample_shape=()):
        """Samples the base distribution and applies ``sample_fn``."""
        value = self.base_dist.sample(key, sample_shape)
        return value if self.sample_fn is None else self.sample_fn(value)

    def log_prob(self, value):
        """The base log density (parameters detached if asked)."""
        base = self.base_dist
        if self.detach_params:
            base = jax.lax.stop_gradient(base)
        return base.log_prob(value)

    def tree_flatten(self):
        """Flattens to the base distribution's leaves."""
        leaves, treedef = jax.tree_util.tree_flatten(self.base_dist)
        return leaves, (treedef, self.sample_fn, self.detach_params)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        """Rebuilds the wrapper around the unflattened base distribution."""
        treedef, sample_fn, detach_params = aux
        base = jax.tree_util.tree_unflatten(treedef, leaves)
        return cls(base, sample_fn=sample_fn, detach_params=detach_params)


def base_distribution(fn: dist.Distribution) -> dist.Distribution:
    """The innermost distribution under wrappers that have a ``base_dist``."""
    while True:
        inner = getattr(fn, "base_dist", None)
        if inner is None:
            return fn
        fn = inner


class suffix(Messenger):  # noqa: N801 (Coix's name for the transform)
    """Marks every site of a program as one generation older.

    ``compose(q2, q1)`` runs ``q1`` under this transform, so that a site that
    ``q2`` samples again supersedes ``q1``'s value instead of clashing with
    it. The site keeps its name; its generation is recorded in the trace.
    """

    def process_message(self, msg):
        """Deepens a sample site by one generation."""
        if msg["type"] == "sample":
            messages.with_infer(msg, **{messages.DEPTH: messages.depth(msg) + 1})


class auxiliary(Messenger):  # noqa: N801
    """Marks the sites of a program as auxiliary (the kernel of ``extend``)."""

    def process_message(self, msg):
        """Marks a sample site auxiliary."""
        if msg["type"] != "sample":
            return
        replay = messages.replayed_site(msg)
        if replay is not None:
            messages.with_infer(
                msg, **{messages.REPLAY: replay.replace(auxiliary=True)}
            )
        messages.with_infer(msg, **{messages.AUXILIARY: True})


class detach(Messenger):  # noqa: N801
    """Stops gradients through the values of a program's latent sites.

    The log densities still depend on the parameters, so the program gives
    score-function (REINFORCE-style) gradients, as reweighted wake-sleep and
    the nested-VI objectives need.
    """

    def process_message(self, msg):
        """Stops gradients through a latent site's value."""
        if msg["type"] != "sample" or msg.get("is_observed", False):
            return
        replay = messages.replayed_site(msg)
        if replay is not None:
            value = jax.lax.stop_gradient(replay.value)
            messages.with_infer(msg, **{messages.REPLAY: replay.replace(value=value)})
        else:
            msg["fn"] = WrappedDistribution(msg["fn"], sample_fn=jax.lax.stop_gradient)


class stick_the_landing(Messenger):  # noqa: N801
    """Stops gradients through distribution parameters inside log densities.

    Gives the sticking-the-landing estimator of Roeder, Wu & Duvenaud (2017),
    "Sticking the Landing: Simple, Lower-Variance Gradient Estimators for
    Variational Inference", https://arxiv.org/abs/1703.09194: the pathwise
    gradient of ``log q(z)`` flows only through ``z``.
    """

    def process_message(self, msg):
        """Detaches the parameters of a freshly drawn site's density."""
        if msg["type"] != "sample" or msg.get("is_observed", False):
            return
        if messages.replayed_site(msg) is None:
            msg["fn"] = WrappedDistribution(msg["fn"], detach_params=True)


def scope(program: Callable, prefix: str) -> Callable:
    """``program`` with every sample site renamed ``prefix/name``.

    Plates keep their names, so copies of a program share one particle axis.
    """
    return numpyro.handlers.scope(
        program, prefix=prefix, divider="/", hide_types=["plate"]
    )


def scope_parts(program: Any) -> tuple[str, str, Callable] | None:
    """``(prefix, divider, inner program)`` of a :func:`scope`, else ``None``."""
    if isinstance(program, numpyro.handlers.scope):
        return program.prefix, program.divider, program.fn
    return None


class _MapFreshSamples(Messenger):
    def __init__(self, fn, site_fn):
        self.site_fn = site_fn
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        fn = msg["fn"]
        replayed = messages.replayed_site(msg) is not None
        observed = msg["value"] is not None
        if observed:
            shape = tuple(jax.numpy.shape(msg["value"]))
        else:
            sample_shape = tuple(msg["kwargs"].get("sample_shape", ()))
            shape = sample_shape + tuple(fn.batch_shape) + tuple(fn.event_shape)
        value_fn = self.site_fn(
            name=msg["name"],
            frames=tuple(msg["cond_indep_stack"]),
            shape=shape,
            event_dim=len(fn.event_shape),
            replayed=replayed,
        )
        if value_fn is None:
            return
        if observed:
            msg["value"] = value_fn(msg["value"])
        else:
            msg["fn"] = WrappedDistribution(fn, sample_fn=value_fn)


def map_fresh_samples(program: Callable, site_fn: Callable) -> Callable:
    """Applies a per-site function to the values a program draws or observes.

    Args:
      program: the program.
      site_fn: ``site_fn(*, name, frames, shape, event_dim, replayed)`` returns
        a shape-preserving function to apply to the site's value, or ``None``
        to leave the site alone; ``frames`` are numpyro's plate frames and
        ``replayed`` says whether the value is a combinator's output (it may
        raise to refuse such sites).

    Returns:
      The transformed program.
    """
    return _MapFreshSamples(program, site_fn)
