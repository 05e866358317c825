"""A jit-compiled optax training loop for the loss of any program.

``train`` keeps Coix's ``util.train`` call shape, so a Coix script runs
unchanged, and adds what a training loop needs: a progress bar, a metric
history, and steps whose loss or gradient is not finite leave the parameters
and optimiser state untouched (and are counted).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

__all__ = ["TrainResult", "make_step", "train"]


class TrainResult(NamedTuple):
    """What :func:`train` learnt and saw.

    Attributes:
      params: the final parameters.
      metrics: the last step's metrics (a dict).
      history: each scalar metric over steps, as numpy arrays.
      opt_state: the final optimiser state.
      skipped: the number of steps skipped for non-finite loss or gradient.
    """

    params: Any
    metrics: dict
    history: dict
    opt_state: Any
    skipped: int


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """One optimisation step ``(params, opt_state, *args) -> (params, opt_state, metrics)``.

    ``loss_fn(params, *args, **kwargs)`` returns ``(loss, metrics)``. A step
    whose loss or gradient has a non-finite entry returns the incoming
    parameters and optimiser state unchanged and reports ``skipped = 1``.
    """

    def step(params, opt_state, *args, **kwargs):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, *args, **kwargs
        )
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
        finite = _all_finite(grads) & jnp.all(jnp.isfinite(loss))
        updates, new_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
            lambda a, b: jnp.where(finite, a, b), new, old
        )
        metrics = dict(metrics.items()) if hasattr(metrics, "items") else {}
        metrics["loss"] = loss
        metrics["squared_grad_norm"] = sum(
            jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)
        )
        metrics["skipped"] = 1 - finite.astype(jnp.int32)
        return keep(new_params, params), keep(new_state, opt_state), metrics

    return step


def _scalars(metrics: dict) -> dict:
    out = {}
    for name, value in metrics.items():
        if isinstance(value, (jax.Array, np.ndarray, float, int)) and np.ndim(value) == 0:
            out[name] = float(value)
    return out


def train(
    loss_fn: Callable,
    init_params,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    dataloader: Iterator | None = None,
    seed=0,
    jit_compile=True,
    eval_fn: Callable | None = None,
    log_every: int | None = None,
    init_step: int = 0,
    opt_state=None,
    *,
    progress: bool = True,
    return_result: bool = False,
    **kwargs,
):
    """Optimises ``loss_fn`` with ``optimizer`` for ``num_steps`` steps.

    Args:
      loss_fn: ``loss_fn(params, key, [batch], **kwargs) -> (loss, metrics)``.
      init_params: initial parameters (a pytree; not modified).
      optimizer: an optax transformation.
      num_steps: the last step number.
      dataloader: optional iterator of batches, passed after the key.
      seed: an int or a PRNG key; step ``t`` uses ``fold_in(key, t)``.
      jit_compile: compile the step (or a callable used to compile it).
      eval_fn: called as ``eval_fn(step, params, opt_state, metrics)`` every
        ``log_every`` steps.
      log_every: how often to log and evaluate (default: 20 times a run).
      init_step: the step to resume after.
      opt_state: optimiser state to resume from.
      progress: show a tqdm progress bar with loss, ESS and log Z.
      return_result: return a :class:`TrainResult` instead of Coix's
        ``(params, metrics)``.
      **kwargs: passed to ``loss_fn``; a kwarg whose name is also a metric is
        updated from that metric after each step (e.g. a memory).

    Returns:
      ``(params, metrics)`` like Coix, or a :class:`TrainResult`.
    """
    step_fn = make_step(loss_fn, optimizer)
    if callable(jit_compile):
        step_fn = jit_compile(step_fn)
    elif jit_compile:
        step_fn = jax.jit(step_fn)
    opt_state = optimizer.init(init_params) if opt_state is None else opt_state
    params = init_params
    run_key = jax.random.key(seed) if isinstance(seed, int) else seed
    log_every = max(num_steps // 20, 1) if log_every is None else log_every
    kwargs = dict(kwargs)
    history: dict[str, list] = {}
    skipped = 0
    metrics: dict = {}
    if eval_fn is not None:
        eval_fn(init_step, params, opt_state, None)
    bar = tqdm(
        range(init_step + 1, num_steps + 1),
        disable=not progress,
        desc="train",
        dynamic_ncols=True,
    )
    tic = time.perf_counter()
    for step in bar:
        key = jax.random.fold_in(run_key, step)
        args = (key, next(dataloader)) if dataloader is not None else (key,)
        params, opt_state, metrics = step_fn(params, opt_state, *args, **kwargs)
        for name in kwargs:
            if name in metrics:
                kwargs[name] = metrics[name]
        scalars = _scalars(metrics)
        skipped += int(scalars.get("skipped", 0))
        for name, value in scalars.items():
            history.setdefault(name, []).append(value)
        if step == init_step + 1:
            compile_seconds = time.perf_counter() - tic
            history["compile_seconds"] = [compile_seconds]
        if step % log_every == 0 or step == num_steps:
            shown = {k: scalars[k] for k in ("loss", "ess", "log_Z") if k in scalars}
            bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            if not progress:
                line = f"Step {step:>{len(str(num_steps))}d}"
                for name, value in sorted(scalars.items()):
                    line += f" | {name} {value:10.4f}"
                print(line, flush=True)
            if eval_fn is not None:
                eval_fn(step, params, opt_state, metrics)
    bar.close()
    history_arrays = {k: np.asarray(v) for k, v in history.items()}
    if return_result:
        return TrainResult(params, metrics, history_arrays, opt_state, skipped)
    return params, metrics
