"""The variational Renyi bound, computed per data point."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, cast

import jax.numpy as jnp

from combinators import weights
from combinators.loss.roles import finish, normalized_weights, pathwise

__all__ = ["renyi_loss"]


class _RenyiLoss(Protocol):
    # The loss function object, carrying its order.
    alpha: float

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def renyi_loss(alpha: float) -> Callable:
    """Negative variational Rényi bound of order ``alpha``, pathwise gradient.

    Per column ``L_alpha = 1 / (1 - alpha) log (1/K sum_k w_k^(1 - alpha))``;
    the loss is ``-sum_columns L_alpha``. Its gradient is
    ``-sum_k wbar_{alpha,k} grad log w_k`` with
    ``wbar_alpha = softmax((1 - alpha) log w)``. ``alpha = 0`` is the IWAE
    bound; ``alpha -> 1`` the ELBO (``alpha = 1`` exactly gives the mean log
    weight); ``alpha < 0`` gives objectives above ``log p(x)`` in the
    many-particle limit. A model whose local latents sit in a data plate
    inside the particle plate has one column per data point, and the bound
    is per data point, as in the paper's minibatch estimator.

    Args:
      alpha: the order, a finite real number.

    Returns:
      A pathwise loss with the shared signature.

    Raises:
      ValueError: for a non-finite or non-real ``alpha``.

    References:
      Li & Turner (2016), "Rényi Divergence Variational Inference",
      https://arxiv.org/abs/1602.02311.
    """
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(
            f"renyi_loss: alpha must be a real number, got {alpha!r}."
        ) from None
    if not math.isfinite(alpha):
        raise ValueError(f"renyi_loss: alpha must be finite, got {alpha!r}.")

    @pathwise
    def loss(
        q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
    ):
        del q_trace, p_trace
        log_weight = jnp.asarray(incoming_log_weight) + jnp.asarray(
            incremental_log_weight
        )
        if log_weight.ndim == 0:
            # One particle: every order gives the log weight itself.
            return -log_weight
        if alpha == 1.0:
            terms = -log_weight / log_weight.shape[0]
            return finish(terms, aggregate)
        scaled = (1.0 - alpha) * log_weight
        if not aggregate:
            return -normalized_weights(scaled) * log_weight
        return -weights.log_normalizer(scaled) / (1.0 - alpha)

    loss.__name__ = f"renyi_loss(alpha={alpha:g})"
    renyi = cast(_RenyiLoss, loss)
    renyi.alpha = alpha
    return renyi
