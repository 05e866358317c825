"""Amortised inference: an inference network ``q(z | x)`` and a model ``p(x, z)``.

Variational autoencoders and their relatives (Kingma & Welling, 2014; Burda,
Grosse & Salakhutdinov, 2016; Bornschein & Bengio, 2015) pair a generative
model ``p_theta(x, z) = p_theta(z) p_theta(x | z)`` with an inference network
``q_phi(z | x)`` shared by all data points. This module gives both one small,
model-agnostic interface:

* :class:`InferenceNetwork` wraps ``distribution_fn(params, x)``, a function
  returning ``q(z | x)`` as a numpyro distribution;
* :class:`GenerativeModel` wraps ``prior_fn(params)`` and
  ``likelihood_fn(params, z)``.

Each exposes ``sample`` and ``log_prob`` as plain array functions, and
``program``, a numpyro program with the particle plate outermost and the data
plate inside::

    with numpyro.plate("particles", K, dim=-2), numpyro.plate("data", B, dim=-1):
        ...

so that ``propose(model.program(...), guide.program(...), loss_fn=...)``
weights particle ``k`` of data point ``b`` by
``log w[k, b] = log p(x_b, z_kb) - log q(z_kb | x_b)``. Any loss with the
shared signature ``loss_fn(q_trace, p_trace, incoming_log_weight,
incremental_log_weight)`` (:mod:`combinators.loss`) drives the pair;
:func:`make_loss_fn` turns it into the ``loss_fn(params, key, batch) ->
(loss, metrics)`` that :func:`combinators.train.train` optimises.

Parameters are any pytree: Flax linen parameters with ``module.apply``,
Flax NNX state with :func:`nnx_apply`, or plain dictionaries of arrays.

Example:
  >>> def encoder(params, x):  # any function of (params, x): here linear
  ...     return x @ params["w"]  # (B, 4) -> (B, 2): loc and scale of z
  >>> def decoder(params, z):
  ...     return z @ params["w"]  # (..., 1) -> (..., 4): logits of x
  >>> guide = InferenceNetwork(from_apply(encoder, diagonal_normal))
  >>> model = GenerativeModel(standard_normal(1),
  ...                         from_apply(decoder, bernoulli_logits))
  >>> loss_fn = make_loss_fn(model, guide, num_particles=2)
  >>> params = AmortizedParams(p={"w": jnp.zeros((1, 4))},
  ...                          q={"w": jnp.zeros((4, 2))})
  >>> batches = iter(jnp.ones((5, 8, 4)))  # 5 batches of 8 binary vectors
  >>> result = coix.util.train(loss_fn, params, optax.adam(1e-2), 5,
  ...                          dataloader=batches, progress=False,
  ...                          return_result=True)
  >>> result.history["iwae"].shape  # the K-sample bound per data point, by step
  (5,)

References:
  Kingma & Welling (2014), "Auto-Encoding Variational Bayes",
  https://arxiv.org/abs/1312.6114; Burda, Grosse & Salakhutdinov (2016),
  "Importance Weighted Autoencoders", https://arxiv.org/abs/1509.00519;
  Bornschein & Bengio (2015), "Reweighted Wake-Sleep",
  https://arxiv.org/abs/1406.2751; Stites et al. (2021), "Learning Proposals
  for Probabilistic Programs with Inference Combinators",
  https://arxiv.org/abs/2103.00668.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp

from combinators import weights
from combinators.api import propose
from combinators.core.evaluate import traced_evaluate
from combinators.core.transforms import detach as _detach
from combinators.loss import elbo_loss
from combinators.loss.roles import is_pathwise

__all__ = [
    "AmortizedParams",
    "Bounds",
    "GenerativeModel",
    "InferenceNetwork",
    "bernoulli_logits",
    "bounds",
    "categorical_logits",
    "diagonal_normal",
    "from_apply",
    "log_weights",
    "make_loss_fn",
    "make_program",
    "nnx_apply",
    "standard_normal",
]

PARTICLE_PLATE = "particles"
DATA_PLATE = "data"

Params = Any
Distribution: TypeAlias = dist.Distribution


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


class AmortizedParams(NamedTuple):
    """Parameters of a generative model and its inference network.

    A NamedTuple, hence a pytree: optax and ``jax.grad`` treat it like any
    other parameter tree.

    Attributes:
      p: parameters ``theta`` of the generative model ``p_theta(x, z)``.
      q: parameters ``phi`` of the inference network ``q_phi(z | x)``.
    """

    p: Params
    q: Params


class Bounds(NamedTuple):
    """Per-data-point bounds on ``log p(x)``, averaged over a data set.

    Attributes:
      elbo: ``mean_b (1/K) sum_k log w[k, b]``, a Monte Carlo estimate of the
        evidence lower bound ``E_q[log p(x, z) - log q(z | x)]``.
      iwae: ``mean_b log (1/K) sum_k w[k, b]``, the K-sample importance
        weighted bound of Burda et al. (2016); it increases with K towards
        ``log p(x)``.
      ess: the mean over data points of the effective sample size of the K
        weights of each point.
    """

    elbo: jax.Array
    iwae: jax.Array
    ess: jax.Array


# ---------------------------------------------------------------------------
# Heads: network outputs to distributions
# ---------------------------------------------------------------------------


def diagonal_normal(raw: jax.Array, min_scale: float = 1e-4) -> Distribution:
    """``Normal(loc, softplus(s) + min_scale)`` over the last axis.

    Args:
      raw: network output whose last axis holds ``[loc, s]`` (even width).
      min_scale: a floor on the scale, for numerical stability.

    Returns:
      A distribution with event shape ``(raw.shape[-1] // 2,)``.
    """
    if raw.shape[-1] % 2:
        raise ValueError(
            f"diagonal_normal: the last axis holds [loc, scale] and must have even "
            f"width, got shape {raw.shape}."
        )
    loc, s = jnp.split(raw, 2, axis=-1)
    return dist.Normal(loc, jax.nn.softplus(s) + min_scale).to_event(1)


def bernoulli_logits(logits: jax.Array) -> Distribution:
    """Independent Bernoulli variables over the last axis of ``logits``."""
    return dist.Bernoulli(logits=logits).to_event(1)


def categorical_logits(logits: jax.Array) -> Distribution:
    """One categorical variable whose class logits are the last axis."""
    return dist.Categorical(logits=logits)


def standard_normal(dim: int) -> Callable[[Params], Distribution]:
    """A parameter-free prior ``N(0, I_dim)``, as a ``prior_fn``."""

    def prior_fn(params):
        del params
        return dist.Normal(jnp.zeros(dim), 1.0).to_event(1)

    return prior_fn


def from_apply(apply_fn: Callable, head: Callable[[jax.Array], Distribution]):
    """``(params, x) -> head(apply_fn(params, x))``: a network with a head.

    Args:
      apply_fn: e.g. a Flax linen ``module.apply`` or any pure function of
        parameters and input.
      head: maps the output to a distribution (:func:`diagonal_normal`,
        :func:`bernoulli_logits`, :func:`categorical_logits`, ...).

    Returns:
      A ``distribution_fn`` / ``likelihood_fn``.
    """

    def distribution_fn(params, inputs):
        return head(apply_fn(params, inputs))

    return distribution_fn


def nnx_apply(graphdef) -> Callable:
    """``(state, x) -> nnx.merge(graphdef, state)(x)`` for a Flax NNX module.

    Split the module once, ``graphdef, state = nnx.split(module)``, and use
    ``state`` (a pytree) as the parameters.

    Args:
      graphdef: the static graph definition from ``nnx.split``.

    Returns:
      A pure apply function, usable with :func:`from_apply`.
    """
    from flax import nnx

    def apply(state, inputs):
        return nnx.merge(graphdef, state)(inputs)

    return apply


# ---------------------------------------------------------------------------
# The two halves
# ---------------------------------------------------------------------------


def _check_distribution(where: str, d, expected_batch: tuple[int, ...], hint: str):
    if not isinstance(d, dist.Distribution):
        raise TypeError(
            f"{where} must return a numpyro distribution, got {type(d).__name__}."
        )
    if tuple(d.batch_shape) != tuple(expected_batch):
        raise ValueError(
            f"{where} returned a distribution with batch shape "
            f"{tuple(d.batch_shape)} (event shape {tuple(d.event_shape)}); "
            f"expected batch shape {tuple(expected_batch)}. {hint}"
        )


def _check_data(where: str, x) -> None:
    if jnp.ndim(x) < 1:
        raise ValueError(
            f"{where}: x must have a leading data (batch) axis, got shape "
            f"{jnp.shape(x)}; use x[None] for a single data point."
        )


def _check_particles(where: str, num_particles) -> None:
    integral = isinstance(num_particles, numbers.Integral)
    if not integral or isinstance(num_particles, bool) or num_particles < 1:
        raise ValueError(
            f"{where}: num_particles must be a positive int, got {num_particles!r}."
        )


def _plates(num_particles: int, num_data: int):
    return (
        numpyro.plate(PARTICLE_PLATE, num_particles, dim=-2),
        numpyro.plate(DATA_PLATE, num_data, dim=-1),
    )


@dataclasses.dataclass(frozen=True)
class InferenceNetwork:
    """An inference network (encoder, guide) ``q_phi(z | x)``.

    Attributes:
      distribution_fn: ``distribution_fn(params, x)`` for data ``x`` of shape
        ``(B, *data_event)`` returns ``q(z | x)`` with batch shape ``(B,)``
        (use ``.to_event`` for vector latents).
      latent: the latent site's name; it must match the model's.

    Example:
      >>> def encoder(params, x):
      ...     return x @ params["w"]  # (B, 4) -> (B, 2 * d) with d = 1
      >>> guide = InferenceNetwork(from_apply(encoder, diagonal_normal))
      >>> x = jnp.ones((8, 4))
      >>> z = guide.sample({"w": jnp.zeros((4, 2))}, jax.random.key(0), x,
      ...                  num_particles=10)
      >>> z.shape  # (K, B, d)
      (10, 8, 1)
    """

    distribution_fn: Callable[[Params, jax.Array], Distribution]
    latent: str = "z"

    def distribution(self, params: Params, x: jax.Array) -> Distribution:
        """``q(z | x)`` with batch shape ``(B,)``.

        Raises:
          ValueError: if ``x`` has no batch axis or the batch shape is wrong.
        """
        _check_data("InferenceNetwork", x)
        d = self.distribution_fn(params, x)
        _check_distribution(
            "InferenceNetwork.distribution_fn",
            d,
            jnp.shape(x)[:1],
            "One distribution per data point: put the latent's own axes in "
            "the event shape with .to_event(n).",
        )
        return d

    def sample(
        self, params: Params, key: jax.Array, x: jax.Array, num_particles: int
    ) -> jax.Array:
        """``num_particles`` draws ``z ~ q(z | x)``, shape ``(K, B, *event)``."""
        _check_particles("InferenceNetwork.sample", num_particles)
        return self.distribution(params, x).sample(key, (num_particles,))

    def log_prob(self, params: Params, x: jax.Array, z: jax.Array) -> jax.Array:
        """``log q(z | x)``; ``z`` of shape ``(..., B, *event)`` gives ``(..., B)``."""
        return self.distribution(params, x).log_prob(z)

    def program(self, params: Params, num_particles: int) -> Callable:
        """The numpyro program ``x -> (z,)`` sampling ``z ~ q(z | x)``.

        ``z`` is drawn inside ``plate("particles", K, dim=-2)`` and
        ``plate("data", B, dim=-1)``, so it has shape ``(K, B, *event)``.
        """
        _check_particles("InferenceNetwork.program", num_particles)

        def inference_program(x):
            d = self.distribution(params, x)
            particles, data = _plates(num_particles, jnp.shape(x)[0])
            with particles, data:
                z = numpyro.sample(self.latent, d)
            return (z,)

        return inference_program


@dataclasses.dataclass(frozen=True)
class GenerativeModel:
    """A generative model ``p_theta(x, z) = p_theta(z) p_theta(x | z)``.

    Attributes:
      prior_fn: ``prior_fn(params)`` returns ``p(z)`` for one data point
        (batch shape ``()``).
      likelihood_fn: ``likelihood_fn(params, z)`` returns ``p(x | z)`` with
        the batch shape of ``z`` (its leading axes) and the data's event
        shape.
      latent: the latent site's name.
      observed: the observed site's name.

    Example:
      >>> def decoder(params, z):
      ...     return z @ params["w"]  # (..., 2) -> (..., 4): logits of x
      >>> model = GenerativeModel(standard_normal(2),
      ...                         from_apply(decoder, bernoulli_logits))
      >>> z, x = model.sample({"w": jnp.ones((2, 4))}, jax.random.key(0), 16)
      >>> z.shape, x.shape
      ((16, 2), (16, 4))
    """

    prior_fn: Callable[[Params], Distribution]
    likelihood_fn: Callable[[Params, jax.Array], Distribution]
    latent: str = "z"
    observed: str = "x"

    def prior(self, params: Params) -> Distribution:
        """``p(z)`` for one data point.

        Raises:
          ValueError: if its batch shape is not ``()``.
        """
        d = self.prior_fn(params)
        _check_distribution(
            "GenerativeModel.prior_fn",
            d,
            (),
            "The prior is for one data point; put the latent's axes in the "
            "event shape with .to_event(n).",
        )
        return d

    def likelihood(self, params: Params, z: jax.Array) -> Distribution:
        """``p(x | z)``; its batch shape is the batch shape of ``z``.

        Raises:
          ValueError: if the batch shape does not match ``z``'s.
        """
        event_ndim = len(self.prior(params).event_shape)
        batch = jnp.shape(z)[: jnp.ndim(z) - event_ndim]
        d = self.likelihood_fn(params, z)
        _check_distribution(
            "GenerativeModel.likelihood_fn",
            d,
            batch,
            "One distribution per latent: put the data's own axes in the "
            "event shape with .to_event(n).",
        )
        return d

    def log_prob(self, params: Params, x: jax.Array, z: jax.Array) -> jax.Array:
        """``log p(x, z) = log p(z) + log p(x | z)``, shape ``z``'s batch shape."""
        return self.prior(params).log_prob(z) + self.likelihood(params, z).log_prob(x)

    def sample(
        self, params: Params, key: jax.Array, num_samples: int
    ) -> tuple[jax.Array, jax.Array]:
        """Ancestral samples ``z ~ p(z)``, ``x ~ p(x | z)``.

        Returns:
          ``(z, x)`` with leading axis ``num_samples``.
        """
        key_z, key_x = jax.random.split(key)
        z = self.prior(params).sample(key_z, (num_samples,))
        return z, self.likelihood(params, z).sample(key_x)

    def program(self, params: Params, num_particles: int) -> Callable:
        """The numpyro program ``x -> (x,)`` scoring ``p(x, z)`` at data ``x``.

        ``z`` and the observed ``x`` are inside ``plate("particles", K,
        dim=-2)`` and ``plate("data", B, dim=-1)``; as a target of
        :func:`combinators.propose` its ``z`` is the proposal's.
        """
        _check_particles("GenerativeModel.program", num_particles)

        def generative_program(x):
            _check_data("GenerativeModel.program", x)
            prior = self.prior(params)
            particles, data = _plates(num_particles, jnp.shape(x)[0])
            with particles, data:
                z = numpyro.sample(self.latent, prior)
                x = numpyro.sample(self.observed, self.likelihood(params, z), obs=x)
            return (x,)

        return generative_program


# ---------------------------------------------------------------------------
# Importance sampling and training
# ---------------------------------------------------------------------------


def _check_names(model: GenerativeModel, guide: InferenceNetwork) -> None:
    if model.latent != guide.latent:
        raise ValueError(
            f"the inference network samples {guide.latent!r} but the model's "
            f"latent is {model.latent!r}; give both the same name."
        )


def make_program(
    model: GenerativeModel,
    guide: InferenceNetwork,
    params: AmortizedParams,
    num_particles: int,
    *,
    loss_fn: Callable | None = elbo_loss,
    detach: bool | None = None,
) -> Callable:
    """``propose(p(x, z), q(z | x), loss_fn=...)``: a weighted program of ``x``.

    Args:
      model: the generative model (the target).
      guide: the inference network (the proposal).
      params: :class:`AmortizedParams` ``(p, q)``.
      num_particles: K, importance samples per data point.
      loss_fn: any loss with the shared signature (``combinators.loss``);
        ``None`` for no loss.
      detach: stop gradients through the proposal's samples, so that the
        loss gives score-function gradients (reweighted wake-sleep,
        REINFORCE-type estimators). The default detaches exactly when
        ``loss_fn`` is not marked ``pathwise`` (a reparameterised loss
        differentiates through the samples; the other losses expect
        detached ones). The mark is found through ``functools.partial``
        but not through a lambda: pass ``detach=False`` for a pathwise
        loss wrapped in a lambda.

    Returns:
      A program of the data ``x`` (shape ``(B, ...)``) whose metrics have
      ``log_weight`` of shape ``(K, B)``, ``log_Z`` summed over the batch and
      ``loss`` summed over the batch.
    """
    _check_names(model, guide)
    if detach is None:
        detach = loss_fn is not None and not is_pathwise(loss_fn)
    proposal = guide.program(params.q, num_particles)
    if detach:
        proposal = _detach(proposal)
    return propose(model.program(params.p, num_particles), proposal, loss_fn=loss_fn)


def make_loss_fn(
    model: GenerativeModel,
    guide: InferenceNetwork,
    *,
    num_particles: int,
    loss_fn: Callable = elbo_loss,
    detach: bool | None = None,
) -> Callable:
    """The training objective ``loss(params, key, batch) -> (loss, metrics)``.

    The shape Coix's and :func:`combinators.train.train`'s loops expect, with
    ``batch`` the data of shape ``(B, ...)`` (from a ``dataloader``).

    Args:
      model: the generative model.
      guide: the inference network.
      num_particles: K, importance samples per data point.
      loss_fn: a loss with the shared signature, e.g. ``elbo_loss`` (SVI),
        ``iwae_loss`` (IWAE) or ``rws_loss`` (reweighted wake-sleep).
      detach: see :func:`make_program`.

    Returns:
      A function whose loss is the program's loss divided by ``B`` (a loss
      per data point, so learning rates do not depend on the batch size),
      with scalar metrics ``loss``, ``elbo`` (mean log weight), ``iwae``
      (the K-sample bound per data point, ``log_Z / B``) and ``ess``.
    """
    _check_particles("make_loss_fn", num_particles)

    def amortized_loss(params: AmortizedParams, key: jax.Array, batch: jax.Array):
        program = make_program(
            model, guide, params, num_particles, loss_fn=loss_fn, detach=detach
        )
        _, _, metrics = traced_evaluate(program, seed=key)(batch)
        num_data = jnp.shape(batch)[0]
        loss = metrics["loss"] / num_data
        log_weight = jax.lax.stop_gradient(metrics["log_weight"])
        return loss, {
            "loss": loss,
            "elbo": jnp.mean(log_weight),
            "iwae": jax.lax.stop_gradient(metrics["log_Z"]) / num_data,
            "ess": metrics["ess"],
        }

    return amortized_loss


def log_weights(
    model: GenerativeModel,
    guide: InferenceNetwork,
    params: AmortizedParams,
    key: jax.Array,
    x: jax.Array,
    num_particles: int,
) -> jax.Array:
    """Log importance weights ``log p(x_b, z_kb) - log q(z_kb | x_b)``, ``(K, B)``.

    Computed by the same program that training uses.
    """
    program = make_program(model, guide, params, num_particles, loss_fn=None)
    _, _, metrics = traced_evaluate(program, seed=key)(x)
    return metrics["log_weight"]


def bounds(
    model: GenerativeModel,
    guide: InferenceNetwork,
    params: AmortizedParams,
    key: jax.Array,
    x: jax.Array,
    num_particles: int,
    *,
    batch_size: int | None = None,
) -> Bounds:
    """ELBO and K-sample IWAE bound per data point, averaged over ``x``.

    Args:
      model: the generative model.
      guide: the inference network.
      params: :class:`AmortizedParams`.
      key: a PRNG key; chunk ``i`` uses ``fold_in(key, i)``.
      x: the data, shape ``(N, ...)``.
      num_particles: K.
      batch_size: data points per jit-compiled chunk (bounds memory to
        ``K * batch_size`` likelihood evaluations); default all of ``x``.

    Returns:
      :class:`Bounds` (floats as 0-d arrays).

    References:
      Burda, Grosse & Salakhutdinov (2016), https://arxiv.org/abs/1509.00519.
    """
    _check_particles("bounds", num_particles)
    _check_data("bounds", x)
    n = jnp.shape(x)[0]
    size = n if batch_size is None else max(1, min(int(batch_size), n))
    totals = jnp.zeros(3)
    for i, start in enumerate(range(0, n, size)):
        chunk = x[start : start + size]
        sums = _chunk_bounds(
            model, guide, params, jax.random.fold_in(key, i), chunk, num_particles
        )
        totals = totals + jnp.stack(sums)
    elbo, iwae, ess = totals / n
    return Bounds(elbo=elbo, iwae=iwae, ess=ess)


@functools.partial(jax.jit, static_argnames=("model", "guide", "num_particles"))
def _chunk_bounds(model, guide, params, key, x, num_particles):
    """Sums over data points of the ELBO, the IWAE bound and the ESS."""
    log_weight = log_weights(model, guide, params, key, x, num_particles)
    ess = weights.column_effective_sample_size(log_weight)
    iwae = logsumexp(log_weight, axis=0) - jnp.log(num_particles)
    return jnp.sum(jnp.mean(log_weight, axis=0)), jnp.sum(iwae), jnp.sum(ess)
