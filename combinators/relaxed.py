"""Continuous relaxations of discrete latents: Concrete / Gumbel-softmax.

A categorical choice drawn as ``argmax_k(logits_k + G_k)`` with i.i.d.
Gumbel noise ``G`` becomes differentiable when the argmax is replaced by a
softmax at temperature ``lambda``: ``y = softmax((logits + G) / lambda)``. The
point ``y`` lies inside the probability simplex, has a closed-form density
(the Concrete distribution) and depends smoothly on ``logits``, so pathwise
losses (``elbo_loss``, ``iwae_loss``, ...) accept it in a proposal. The
objective they optimise is the *relaxed* one: target and proposal both score
``y`` with relaxed densities, and the likelihood sees ``y`` instead of a
one-hot vector. It is a biased surrogate of the discrete objective; the bias
vanishes as ``lambda -> 0`` while the gradient variance grows.

numpyro already provides the binary case,
``numpyro.distributions.RelaxedBernoulliLogits(temperature, logits)`` (a
logistic variable pushed through a sigmoid). This module adds the
categorical case, in two parameterisations, and straight-through helpers.

References:
  Maddison, Mnih & Teh (2017), "The Concrete Distribution: A Continuous
  Relaxation of Discrete Random Variables", https://arxiv.org/abs/1611.00712;
  Jang, Gu & Poole (2017), "Categorical Reparameterization with
  Gumbel-Softmax", https://arxiv.org/abs/1611.01144.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import gammaln, logsumexp
from numpyro.distributions import constraints

__all__ = [
    "ExpRelaxedOneHotCategorical",
    "RelaxedOneHotCategorical",
    "straight_through_bernoulli",
    "straight_through_one_hot",
]


def _logits_from(where: str, logits, probs):
    if (logits is None) == (probs is None):
        raise ValueError(
            f"{where}: give exactly one of `logits` and `probs`, got "
            f"logits={logits!r}, probs={probs!r}."
        )
    if probs is not None:
        probs = jnp.asarray(probs)
        return jnp.log(jnp.clip(probs, jnp.finfo(probs.dtype).tiny))
    return jnp.asarray(logits)


class _Concrete(dist.Distribution):
    """Shared parameters and shapes of the two Concrete parameterisations."""

    arg_constraints = {
        "temperature": constraints.positive,
        "logits": constraints.real_vector,
    }
    reparametrized_params = ["temperature", "logits"]

    def __init__(self, temperature, logits=None, probs=None, *, validate_args=None):
        logits = _logits_from(type(self).__name__, logits, probs)
        if jnp.ndim(logits) < 1 or jnp.shape(logits)[-1] < 2:
            raise ValueError(
                f"{type(self).__name__}: logits need a last (event) axis of at "
                f"least 2 categories, got shape {jnp.shape(logits)}."
            )
        temperature = jnp.asarray(temperature, dtype=jnp.result_type(logits, float))
        batch_shape = jax.lax.broadcast_shapes(
            jnp.shape(temperature), jnp.shape(logits)[:-1]
        )
        event_shape = jnp.shape(logits)[-1:]
        self.temperature = jnp.broadcast_to(temperature, batch_shape)
        self.logits = jnp.broadcast_to(logits, batch_shape + event_shape)
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def _log_sample(self, key, sample_shape):
        """``log softmax((logits + G) / temperature)`` with Gumbel noise ``G``."""
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        gumbel = jax.random.gumbel(key, shape, dtype=self.logits.dtype)
        return jax.nn.log_softmax(
            (self.logits + gumbel) / self.temperature[..., None], axis=-1
        )

    def _log_density_of_log(self, log_y):
        """``log (n-1)! + (n-1) log t + sum_k (a_k - t x_k) - n LSE_k(a_k - t x_k)``.

        This is the ExpConcrete density of ``x = log y`` (Maddison et al., 2017,
        Appendix C.3); the Concrete density of ``y`` subtracts ``sum_k x_k``.
        """
        n = self.event_shape[-1]
        t = self.temperature[..., None]
        score = self.logits - t * log_y
        return (
            gammaln(float(n))
            + (n - 1) * jnp.log(self.temperature)
            + jnp.sum(score, axis=-1)
            - n * logsumexp(score, axis=-1)
        )

    @property
    def probs(self):
        """Probabilities of the discrete variable that the relaxation approximates."""
        return jax.nn.softmax(self.logits, axis=-1)


class RelaxedOneHotCategorical(_Concrete):
    """The Concrete (Gumbel-softmax) distribution on the probability simplex.

    ``y = softmax((logits + G) / temperature)`` with i.i.d. standard Gumbel
    ``G``: a reparameterised relaxation of a one-hot categorical vector
    with probabilities ``softmax(logits)``. ``argmax(y)`` has exactly that
    categorical distribution at every temperature (Maddison et al., 2017,
    Proposition 1a). The density, with respect to Lebesgue measure on the
    first ``n - 1`` coordinates, is

    ``(n-1)! t^(n-1) prod_k (a_k y_k^(-t-1)) / (sum_i a_i y_i^(-t))^n``

    with ``a = exp(logits)``. Coordinates that underflow to zero (very low
    temperatures in float32) are clipped to the smallest positive float in
    ``log_prob``; below ``temperature ~ 0.05`` prefer
    :class:`ExpRelaxedOneHotCategorical`, which works in log space.

    Args:
      temperature: positive temperature ``t`` (broadcasts with the batch).
      logits: unnormalised log probabilities, last axis the categories.
      probs: probabilities instead of ``logits`` (give exactly one).
      validate_args: numpyro's argument validation.

    Example:
      >>> def program(logits):
      ...     with numpyro.plate("particles", 5):
      ...         y = numpyro.sample("y", RelaxedOneHotCategorical(0.5, logits=logits))
      ...     return (y,)
      >>> run = jax.jit(lambda key, x: coix.traced_evaluate(program, seed=key)(x))
      >>> (y,), trace, _ = run(jax.random.key(0), jnp.zeros(3))
      >>> y.shape, trace["y"].log_prob.shape  # 3 categories: one event per particle
      ((5, 3), (5,))
      >>> bool(jnp.allclose(y.sum(-1), 1.0))  # points of the simplex
      True

    References:
      Maddison, Mnih & Teh (2017), https://arxiv.org/abs/1611.00712;
      Jang, Gu & Poole (2017), https://arxiv.org/abs/1611.01144.
    """

    support = constraints.simplex

    def sample(self, key, sample_shape=()):
        """Reparameterised draws ``softmax((logits + G) / temperature)``."""
        return jnp.exp(self._log_sample(key, sample_shape))

    def log_prob(self, value):
        """The Concrete log density of points ``value`` of the simplex."""
        value = jnp.asarray(value)
        log_y = jnp.log(jnp.clip(value, jnp.finfo(value.dtype).tiny))
        return self._log_density_of_log(log_y) - jnp.sum(log_y, axis=-1)


class ExpRelaxedOneHotCategorical(_Concrete):
    """The log of a Concrete variable: ``x = log_softmax((logits + G) / t)``.

    Numerically stable at low temperatures, where the simplex coordinates
    underflow. The density is the ExpConcrete density of Maddison et al.
    (2017, Appendix C.3); its base measure differs from the Concrete one by
    the factor ``prod_k y_k``, which cancels in importance weights as long as
    target and proposal use the same parameterisation. Apply ``jnp.exp`` to
    the value where the model needs a point of the simplex.

    Args:
      temperature: positive temperature.
      logits: unnormalised log probabilities, last axis the categories.
      probs: probabilities instead of ``logits`` (give exactly one).
      validate_args: numpyro's argument validation.

    References:
      Maddison, Mnih & Teh (2017), https://arxiv.org/abs/1611.00712.
    """

    support = constraints.real_vector

    def sample(self, key, sample_shape=()):
        """Reparameterised draws ``log_softmax((logits + G) / temperature)``."""
        return self._log_sample(key, sample_shape)

    def log_prob(self, value):
        """The ExpConcrete log density of log-simplex points ``value``."""
        return self._log_density_of_log(jnp.asarray(value))


def straight_through_one_hot(y):
    """The one-hot ``argmax`` of ``y`` forward, the gradient of ``y`` backward.

    The straight-through Gumbel-softmax estimator (Jang et al., 2017,
    Section 2.2) uses a relaxed sample ``y`` for the gradient and its
    discretised value in the model. The gradient is biased for both the
    discrete and the relaxed objective; use it where the model needs a hard
    choice.

    Args:
      y: points of the simplex (last axis the categories), e.g. draws of
        :class:`RelaxedOneHotCategorical`.

    Returns:
      One-hot vectors with ``y``'s shape and dtype.

    References:
      Jang, Gu & Poole (2017), https://arxiv.org/abs/1611.01144; Bengio,
      Léonard & Courville (2013), https://arxiv.org/abs/1308.3432.
    """
    y = jnp.asarray(y)
    hard = jax.nn.one_hot(jnp.argmax(y, axis=-1), y.shape[-1], dtype=y.dtype)
    return y + jax.lax.stop_gradient(hard - y)


def straight_through_bernoulli(y):
    """``1[y > 1/2]`` forward, the gradient of ``y`` backward.

    The binary counterpart of :func:`straight_through_one_hot`, for draws of
    ``numpyro.distributions.RelaxedBernoulliLogits``.

    References:
      Jang, Gu & Poole (2017), https://arxiv.org/abs/1611.01144; Bengio,
      Léonard & Courville (2013), https://arxiv.org/abs/1308.3432.
    """
    y = jnp.asarray(y)
    hard = (y > 0.5).astype(y.dtype)
    return y + jax.lax.stop_gradient(hard - y)
