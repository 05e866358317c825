"""Proposals from a memory of the best samples: ``memoize``."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from combinators import weights
from combinators.core import evaluate
from combinators.core import keys as _keys
from combinators.core.trace import Plate, Trace

__all__ = ["memoize"]


def _check_memory(memory: Mapping, q_trace: Trace) -> None:
    """Memory entries name latent sites of the proposal, with their shapes."""
    for name, stored in memory.items():
        site = q_trace.get(name)
        if site is None or site.observed:
            latents = sorted(n for n, s in q_trace.items() if not s.observed)
            raise ValueError(
                f"memoize: the memory holds site {name!r}, which is not a latent "
                f"site of the proposal (its latent sites: {latents})."
            )
        want = tuple(jnp.shape(site.value))[1:]
        got = tuple(jnp.shape(stored))[1:]
        if got != want:
            raise ValueError(
                f"memoize: memory[{name!r}] has shape {tuple(jnp.shape(stored))}: "
                f"per-sample shape {got}, but the proposal's site {name!r} has "
                f"per-particle shape {want} (value shape "
                f"{tuple(jnp.shape(site.value))})."
            )


def memoize(p: Callable, q: Callable, memory: Mapping | None = None, memory_size=None):
    """Proposes from ``q`` and from a memory of the best samples seen so far.

    The memory's samples are stacked along axis 0 of each latent. The target
    scores the memory's samples together with fresh ones from ``q``; the
    ``memory_size`` best distinct samples (by target log density) are kept,
    returned as the program's particles and stored in ``metrics["memory"]``.
    Distinctness is checked with array comparisons, so the program compiles
    under ``jit``. The target's particle plate must have room for both sets:
    ``len(memory) + N`` where N is the proposal's particle count.

    Args:
      p: the target program.
      q: the proposal program.
      memory: ``{name: array of shape (memory_size, ...)}`` or ``None``.
      memory_size: the number of samples kept (default: memory's length).

    Returns:
      A program whose log weights are the target log densities of the kept
      samples.

    References:
      Hewitt, Le & Tenenbaum (2020), "Learning to learn generative programs
      with Memoised Wake-Sleep", https://arxiv.org/abs/2007.03132.
    """
    evaluate.check_callable("memoize", p=p, q=q)
    if memory is None and memory_size is None:
        raise ValueError("memoize: give `memory` or `memory_size`.")
    memory = dict(memory or {})
    sizes = {int(jnp.shape(v)[0]) for v in memory.values()}
    if len(sizes) > 1:
        raise ValueError(
            f"memoize: every memory entry must hold the same number of samples, "
            f"got {sorted(sizes)}."
        )
    size = memory_size if memory_size is not None else (sizes.pop() if sizes else None)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"memoize: memory_size must be a positive int, got {size!r}.")

    def memoized(*args, **kwargs):
        p_args, q_args = _keys.split_program_args(args)
        q_eval = evaluate.evaluate(q, where="memoize")(*q_args, **kwargs)
        _check_memory(memory, q_eval.trace)
        latents = {}
        for name, site in q_eval.trace.items():
            if site.observed:
                continue
            value = site.value
            if name in memory:
                value = jnp.concatenate([jnp.asarray(memory[name]), value], axis=0)
            latents[(name, 0)] = value
        p_eval = evaluate.evaluate(p, latents, where="memoize")(*p_args, **kwargs)
        layout = weights.layout_of(p_eval.trace)
        log_density = weights.trace_log_prob(
            [p_eval.trace[n] for n in p_eval.trace], layout
        )
        k = log_density.shape[0]
        latent_names = [n for n in p_eval.trace if not p_eval.trace[n].observed]
        flat = jnp.concatenate(
            [
                jnp.reshape(p_eval.trace[n].value, (k, -1)).astype(jnp.float32)
                for n in latent_names
            ],
            axis=1,
        )
        order = jnp.argsort(-log_density)
        ranked = flat[order]
        same = jnp.all(ranked[:, None, :] == ranked[None, :, :], axis=-1)
        earlier = jnp.tril(jnp.ones((k, k), dtype=bool), k=-1)
        duplicate = jnp.any(same & earlier, axis=1)
        score = jnp.where(duplicate, -jnp.inf, log_density[order])
        keep = order[jax.lax.top_k(score, size)[1]]
        marginal = Trace(
            {
                name: (
                    history[0].replace(
                        value=jnp.take(history[0].value, keep, axis=0),
                        log_prob=jnp.take(history[0].log_prob, keep, axis=0),
                        plates=tuple(
                            Plate(f.name, size, f.dim) if f.size == k else f
                            for f in history[0].plates
                        ),
                    ),
                )
                for name, history in p_eval.trace.histories().items()
                if not history[0].observed
            }
        )
        new_memory = {n: marginal[n].value for n in marginal}
        log_weight = jnp.take(log_density, keep, axis=0)
        metrics = evaluate.metrics_from_log_weight(
            log_weight,
            loss=q_eval.metrics.loss if q_eval.metrics is not None else 0.0,
            log_density=jnp.mean(log_weight),
            extras={"memory": new_memory},
        )
        out = jax.tree_util.tree_map(
            lambda x: jnp.take(x, keep, axis=0)
            if isinstance(x, jax.Array) and x.ndim and x.shape[0] == k
            else x,
            p_eval.out,
        )
        return evaluate.empirical(out, marginal, metrics)(*args, **kwargs)

    return memoized
