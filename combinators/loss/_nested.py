"""Coix's objectives for nested importance sampling and inference combinators.

ELBO, IWAE, the annealed variational objective, reweighted wake-sleep, the
two nested-VI objectives and amortised population Gibbs, all with the
shared loss signature (see :mod:`combinators.loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from combinators import weights
from combinators.loss.roles import (
    accepts_coix_traces,
    finish,
    normalized_weights,
    pathwise,
    role_log_probs,
    sum_log_probs,
    traces,
    uniform_weights,
)

__all__ = [
    "apg_loss",
    "avo_loss",
    "elbo_loss",
    "fkl_loss",
    "iwae_loss",
    "rkl_loss",
    "rws_loss",
]


@accepts_coix_traces
@pathwise
def elbo_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Negative evidence lower bound, ``-E_q[log p(x, z) - log q(z)]``.

    With incoming weights (a resampled or weighted proposal), the incremental
    log weights are averaged under the normalised incoming weights.

    References:
      Kingma & Welling (2014), "Auto-Encoding Variational Bayes",
      https://arxiv.org/abs/1312.6114; Rezende, Mohamed & Wierstra (2014),
      https://arxiv.org/abs/1401.4082.
    """
    del q_trace, p_trace
    w1 = normalized_weights(incoming_log_weight)
    return finish(-(w1 * incremental_log_weight), aggregate)


@accepts_coix_traces
@pathwise
def iwae_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Negative importance-weighted bound, ``-log (1/N sum_i w_i)``.

    The gradient is ``-sum_i wbar_i grad log w_i`` (normalised weights held
    fixed), the gradient of ``log Z-hat``. With ``aggregate=False`` the
    per-particle terms ``-wbar_i log w_i`` are returned; their sum has the
    same gradient.

    References:
      Burda, Grosse & Salakhutdinov (2016), "Importance Weighted
      Autoencoders", https://arxiv.org/abs/1509.00519.
    """
    del q_trace, p_trace
    log_weight = incoming_log_weight + incremental_log_weight
    if not aggregate:
        return -(normalized_weights(log_weight) * log_weight)
    return -weights.log_normalizer(log_weight)


@accepts_coix_traces
@pathwise
def avo_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Annealed variational objective: mean incremental log weight.

    References:
      Huang, Tan, Lacoste & Courville (2018), "Improving Explorability in
      Variational Inference with Annealed Variational Objectives",
      https://arxiv.org/abs/1809.01818.
    """
    del q_trace, p_trace
    w1 = uniform_weights(incoming_log_weight)
    return finish(-(w1 * incremental_log_weight), aggregate)


@accepts_coix_traces
def rws_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Reweighted wake-sleep: wake-theta and wake-phi in one surrogate.

    ``-sum_i wbar_i [log p(x, z_i) - log q_0(z_i) + log q(z_i)]`` with
    normalised weights ``wbar`` held fixed: its gradient in the target's
    parameters is wake-theta, in the proposal's parameters wake-phi. Use a
    detached proposal (score-function gradients).

    References:
      Bornschein & Bengio (2015), "Reweighted Wake-Sleep",
      https://arxiv.org/abs/1406.2751; Le, Kosiorek, Siddharth, Teh & Wood
      (2019), https://arxiv.org/abs/1805.10469.
    """
    layout, proposal_lp, forward_lp, target_lp = role_log_probs(q_trace, p_trace)
    surrogate = target_lp - proposal_lp + forward_lp
    w = normalized_weights(incoming_log_weight + incremental_log_weight)
    return finish(-(w * surrogate), aggregate)


@accepts_coix_traces
def fkl_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Nested VI with the forward (inclusive) KL objective.

    References:
      Zimmermann, Wu, Esmaeili & van de Meent (2021), "Nested Variational
      Inference", https://arxiv.org/abs/2106.11302.
    """
    _, proposal_lp, forward_lp, _ = role_log_probs(q_trace, p_trace)
    w1 = normalized_weights(incoming_log_weight)
    w = normalized_weights(incoming_log_weight + incremental_log_weight)
    terms = -(w * (forward_lp + proposal_lp) - w1 * proposal_lp)
    return finish(terms, aggregate)


@accepts_coix_traces
@pathwise
def rkl_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Nested VI with the reverse (exclusive) KL objective.

    References:
      Zimmermann, Wu, Esmaeili & van de Meent (2021), "Nested Variational
      Inference", https://arxiv.org/abs/2106.11302.
    """
    _, proposal_lp, _, target_lp = role_log_probs(q_trace, p_trace)
    w1 = normalized_weights(incoming_log_weight)
    v = jax.lax.stop_gradient(incremental_log_weight)
    baseline = jnp.sum(w1 * v, axis=0) if jnp.ndim(v) else v
    surrogate = incremental_log_weight + (1.0 + v - baseline) * proposal_lp
    w = normalized_weights(incoming_log_weight + incremental_log_weight)
    return finish(-(w1 * surrogate - w * target_lp), aggregate)


@accepts_coix_traces
def apg_loss(
    q_trace, p_trace, incoming_log_weight, incremental_log_weight, aggregate=True
):
    """Amortised population Gibbs: RWS restricted to the re-sampled block.

    The kernel's new values (forward sites) are weighted by
    ``p(x, z') r(z | z') / (q(z' | ...) q(rest))`` where ``r`` is the reverse
    kernel (the auxiliary sites). The weights have their own layout: the
    batch dims that the re-sampled block and the observations share. A
    block of *local* latents (one per data point, in a data plate or an
    undeclared batch dim) therefore gets one normalised weight per data
    point, APG's conditional-independence trick, and sites outside that
    layout (global latents the block conditions on) do not enter the weight.
    A block of global latents gets one weight per particle (and batch entry).

    References:
      Wu, Zimmermann, Sennesh, Le & van de Meent (2020), "Amortized
      Population Gibbs Samplers with Neural Sufficient Statistics",
      https://arxiv.org/abs/1911.01382.
    """
    del incoming_log_weight, incremental_log_weight
    q_trace, p_trace = traces(q_trace, p_trace, "apg_loss")
    histories = p_trace.histories()
    forward_names = {name for name, history in histories.items() if len(history) > 1}
    current = {
        name: history[0]
        for name, history in histories.items()
        if not history[0].auxiliary
    }
    # The weights' layout: what the re-sampled block and the data share.
    block = [s for name, s in current.items() if name in forward_names or s.observed]
    layout = weights.layout_of(block or list(current.values()), where="apg_loss")

    def spans_layout(site):
        shape = jnp.shape(site.log_prob)
        if len(shape) < layout.ndim:
            return layout.ndim == 0
        return all(
            frame is None or shape[frame.dim] == frame.size for frame in layout.frames
        )

    global_names = {name for name, site in current.items() if not spans_layout(site)}
    target_lp = sum_log_probs(
        (s for name, s in current.items() if name not in global_names), layout
    )
    reverse_lp = sum_log_probs(
        (s for _, _, s in p_trace.generations() if s.auxiliary), layout
    )
    # The kernel's draws: re-sampled names, and (when a kernel ran) every
    # site it drew for the first time (depth 0 while earlier sites are deeper).
    kernel_ran = any(s.depth > 0 for _, _, s in q_trace.generations())

    def is_forward(name, g, site):
        return g == 0 and (name in forward_names or (kernel_ran and site.depth == 0))

    forward_lp = sum_log_probs(
        (s for name, g, s in q_trace.generations() if is_forward(name, g, s)),
        layout,
    )
    proposal_lp = sum_log_probs(
        (
            s
            for name, g, s in q_trace.generations()
            if not (is_forward(name, g, s) or (g == 0 and name in global_names))
        ),
        layout,
    )
    log_weight = target_lp + reverse_lp - forward_lp - proposal_lp
    w = normalized_weights(log_weight)
    return finish(-(w * (target_lp + forward_lp)), aggregate)
