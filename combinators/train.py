"""A jit-compiled optax training loop for the loss of any program.

``train`` keeps Coix's ``util.train`` call shape, so a Coix script runs
unchanged, and adds what a training loop needs:

* one compiled step (``jax.jit`` with the parameters and optimiser state
  donated, so XLA updates them in place); the caller's initial parameters
  are copied once and stay valid;
* a step whose loss or gradient has a non-finite entry leaves the
  parameters and optimiser state unchanged and is counted;
* a tqdm progress bar with loss, ESS and log Z (or Coix-style log lines, or
  nothing, for scripts);
* the history of every scalar metric as numpy arrays, with the compile time;
* an evaluation hook every ``eval_every`` steps whose results are collected;
* checkpoints every ``checkpoint_every`` steps that resume bit for bit
  (:mod:`combinators.checkpoint`);
* separate optimisers for parameter groups (e.g. target ``p`` and proposal
  ``q``) and, wake-sleep style, a separate loss per group.

Parameters are any pytree: a Flax linen variable dict (``module.init``), the
``nnx.State`` of a Flax NNX module (``nnx.split``; ``nnx.merge`` inside the
loss) or a plain dict of arrays.
"""

from __future__ import annotations

import math
import time
import types
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from combinators import checkpoint
from combinators.types import is_typed_key

__all__ = ["TrainResult", "group_labels", "group_optimizers", "make_step", "train"]


class TrainResult(NamedTuple):
    """What :func:`train` learnt and saw.

    Attributes:
      params: the final parameters.
      metrics: the last step's metrics (a dict of arrays; empty when no step
        ran).
      history: numpy arrays over steps: ``step``, each scalar metric (with
        ``loss``, ``squared_grad_norm`` and ``skipped``, 1 where a step was
        skipped), and ``compile_seconds``, one entry per :func:`train` call
        (the wall time of its first step, which includes tracing and
        compilation).
      opt_state: the final optimiser state.
      skipped: the number of steps skipped for a non-finite loss or gradient.
      evaluations: what ``eval_fn`` returned, as numpy arrays over
        evaluations, with the evaluated ``step``; empty if it returned
        ``None``.
      step: the last step trained.
    """

    params: Any
    metrics: dict
    history: dict
    opt_state: Any
    skipped: int
    evaluations: Mapping = types.MappingProxyType({})
    step: int = 0


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _entry_name(entry) -> Hashable:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return getattr(entry, attribute)
    raise ValueError(f"group_labels: cannot name the parameter group {entry!r}.")


def group_labels(params) -> Any:
    """The group of each leaf: the top-level key of ``params`` it sits under.

    Args:
      params: a mapping (or other pytree node) of parameter groups, e.g.
        ``{"p": target_params, "q": proposal_params}``.

    Returns:
      A pytree like ``params`` whose leaves are the group names.

    Raises:
      ValueError: if ``params`` has a leaf outside any group.
    """

    def label(path, _):
        if not path:
            raise ValueError(
                "group_labels: the parameters are a single array; give them as "
                "a dict of groups, e.g. {'p': ..., 'q': ...}."
            )
        return _entry_name(path[0])

    return jax.tree_util.tree_map_with_path(label, params)


def group_optimizers(
    optimizers: Mapping[Hashable, optax.GradientTransformation],
) -> optax.GradientTransformation:
    """One optimiser per parameter group, routed by ``optax.multi_transform``.

    Args:
      optimizers: an optimiser for each top-level key of the parameters, e.g.
        ``{"p": optax.adam(1e-3), "q": optax.adam(3e-3)}`` for the target and
        proposal parameters of reweighted wake-sleep.

    Returns:
      An optax transformation that updates group ``g`` with
      ``optimizers[g]`` only.

    Raises:
      ValueError: (at ``init``/``update``) if the parameter groups and the
        optimiser names differ.

    Example:
      >>> optimizer = group_optimizers({"p": optax.adam(1e-3), "q": optax.sgd(1e-2)})
      >>> params = {"p": {"w": jnp.ones(2)}, "q": {"loc": jnp.zeros(3)}}
      >>> state = optimizer.init(params)
      >>> grads = {"p": {"w": jnp.ones(2)}, "q": {"loc": jnp.ones(3)}}
      >>> updates, state = optimizer.update(grads, state, params)
      >>> updates["q"]["loc"]  # plain SGD for the proposal's group
      Array([-0.01, -0.01, -0.01], dtype=float32)

    References:
      Bornschein & Bengio (2015), "Reweighted Wake-Sleep",
      https://arxiv.org/abs/1406.2751 (separate target and proposal updates).
    """
    optimizers = dict(optimizers)

    def labels(params):
        tree = group_labels(params)
        groups = set(jax.tree_util.tree_leaves(tree))
        if groups != set(optimizers):
            raise ValueError(
                f"group_optimizers: parameter groups {sorted(map(str, groups))} "
                f"differ from the optimisers' names {sorted(map(str, optimizers))}."
            )
        return tree

    return optax.multi_transform(optimizers, labels)


def _loss_and_grads(loss_fn: Callable, params, args, kwargs):
    """``(loss, per-group losses or None, metrics, grads)`` of ``loss_fn``.

    A scalar loss is differentiated with respect to all parameters. A dict
    of scalar losses, one per parameter group, gives each group the gradient
    of its own loss only: one forward pass and one backward pass per group.
    """

    def fn(p):
        loss, metrics = loss_fn(p, *args, **kwargs)
        return (dict(loss) if isinstance(loss, Mapping) else loss), metrics

    loss, vjp_fn, metrics = jax.vjp(fn, params, has_aux=True)
    if not isinstance(loss, Mapping):
        if jnp.ndim(loss) != 0:
            raise ValueError(
                "train: loss_fn must return a scalar loss (or a dict of scalar "
                f"losses, one per parameter group), got shape {jnp.shape(loss)}."
            )
        (grads,) = vjp_fn(jnp.ones_like(loss))
        return loss, None, metrics, grads
    labels = group_labels(params)
    groups = list(loss)
    if set(groups) != set(jax.tree_util.tree_leaves(labels)):
        raise ValueError(
            f"train: loss_fn returned losses for {sorted(map(str, groups))} but the "
            f"parameter groups are {sorted(map(str, set(jax.tree.leaves(labels))))}."
        )
    for group, value in loss.items():
        if jnp.ndim(value) != 0:
            raise ValueError(
                f"train: the loss of group {group!r} must be a scalar, got shape "
                f"{jnp.shape(value)}."
            )
    per_group = []
    for group in groups:
        cotangent = {
            g: jnp.ones_like(v) if g == group else jnp.zeros_like(v)
            for g, v in loss.items()
        }
        per_group.append(vjp_fn(cotangent)[0])
    position = {group: i for i, group in enumerate(groups)}
    grads = jax.tree.map(lambda label, *gs: gs[position[label]], labels, *per_group)
    total = sum(loss.values())
    return total, loss, metrics, grads


def make_step(loss_fn: Callable, optimizer) -> Callable:
    """One step ``(params, opt_state, *args) -> (params, opt_state, metrics)``.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs) -> (loss, metrics)``. The
        loss is a scalar, or a dict of scalars keyed by the parameter groups
        (the top-level keys of ``params``): then each group gets the
        gradient of its own loss only (wake-sleep style, e.g.
        ``{"p": wake_theta_loss, "q": wake_phi_loss}``), and ``loss`` in the
        metrics is their sum, with ``loss_<group>`` for each.
      optimizer: an optax transformation, or a dict of them per parameter
        group (see :func:`group_optimizers`).

    Returns:
      The step function. A step whose loss or gradient has a non-finite
      entry returns the incoming parameters and optimiser state unchanged
      and reports ``skipped = 1`` in its metrics.
    """
    if isinstance(optimizer, Mapping):
        optimizer = group_optimizers(optimizer)

    # The branches are built once (not per call), so that an eager
    # (un-jitted) step finds its compiled lax.cond in JAX's cache.
    def apply(operands):
        params, opt_state, grads = operands
        updates, new_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state

    def skip(operands):
        params, opt_state, _ = operands
        return params, opt_state

    def step(params, opt_state, *args, **kwargs):
        loss, losses, metrics, grads = _loss_and_grads(loss_fn, params, args, kwargs)
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
        squared_grad_norm = sum(
            jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)
        )
        # One reduction decides (a NaN or inf entry makes the squared norm
        # non-finite; so does a gradient norm beyond ~1e19 in float32, which
        # is skipped too), and one lax.cond applies the update, so the
        # donated buffers are updated in place and a skipped step costs no
        # optimiser work.
        finite = jnp.isfinite(squared_grad_norm) & _all_finite(
            loss if losses is None else losses
        )

        new_params, new_state = jax.lax.cond(
            finite, apply, skip, (params, opt_state, grads)
        )
        metrics = dict(metrics.items()) if hasattr(metrics, "items") else {}
        metrics["loss"] = loss
        for group, value in (losses or {}).items():
            metrics[f"loss_{group}"] = value
        metrics["squared_grad_norm"] = squared_grad_norm
        metrics["skipped"] = 1 - finite.astype(jnp.int32)
        return new_params, new_state, metrics

    return step


def _owned_copy(tree):
    """Fresh device buffers for every leaf, with strong (not weak) dtypes.

    Donating the copies leaves the caller's arrays valid; strong dtypes make
    the first step's output types equal its input types, so the step is
    compiled once.
    """

    def copy(x):
        if is_typed_key(x):
            data = jnp.array(jax.random.key_data(x), copy=True)
            return jax.random.wrap_key_data(data, impl=str(jax.random.key_impl(x)))
        x = jnp.asarray(x)
        return jnp.array(x, dtype=x.dtype, copy=True)

    return jax.tree_util.tree_map(copy, tree)


def _checkpoint_nbytes(tree) -> int:
    """About the size of a checkpoint of ``tree`` (its leaves plus 64 KiB)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(int(getattr(x, "nbytes", 0)) for x in leaves) + (1 << 16)


def _is_scalar(value) -> bool:
    arraylike = isinstance(value, (jax.Array, np.ndarray, float, int))
    return arraylike and np.ndim(value) == 0


def _stack(values: list) -> np.ndarray:
    return np.stack([np.asarray(v) for v in values]) if values else np.zeros(0)


class _Log:
    """Host-side record of a run: metric history and evaluations.

    Per-step metrics stay on the device until :meth:`flush` fetches them in
    one transfer, so the loop does not wait for each step to finish.
    """

    def __init__(self, history=None, evaluations=None, last_eval_step=-1):
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self.evaluations = {k: list(v) for k, v in (evaluations or {}).items()}
        self.last_eval_step = last_eval_step
        self.pending: list = []

    def add(self, step: int, metrics: Mapping) -> None:
        scalars = {k: v for k, v in metrics.items() if _is_scalar(v)}
        self.pending.append((step, scalars))

    def flush(self) -> dict:
        """Moves pending steps into the history; returns the newest scalars."""
        newest: dict = {}
        for step, scalars in jax.device_get(self.pending):
            self.history.setdefault("step", []).append(np.int64(step))
            for name, value in scalars.items():
                self.history.setdefault(name, []).append(value)
            newest = scalars
        self.pending = []
        return newest

    def add_evaluation(self, step: int, value) -> None:
        self.last_eval_step = step
        if value is None:
            return
        row = dict(value) if isinstance(value, Mapping) else {"value": value}
        row = {k: np.asarray(v) for k, v in jax.device_get(row).items()}
        if self.evaluations and set(row) | {"step"} != set(self.evaluations):
            raise ValueError(
                f"train: eval_fn returned {sorted(row)} at step {step} but "
                f"{sorted(set(self.evaluations) - {'step'})} before."
            )
        self.evaluations.setdefault("step", []).append(np.int64(step))
        for name, v in row.items():
            self.evaluations.setdefault(name, []).append(v)

    def arrays(self) -> tuple[dict, dict]:
        history = {k: _stack(v) for k, v in self.history.items()}
        return history, {k: _stack(v) for k, v in self.evaluations.items()}


def _compile(step_fn: Callable, jit_compile, donate: bool) -> Callable:
    def run_step(params, opt_state, run_key, step, *args, **kwargs):
        key = jax.random.fold_in(run_key, step)
        return step_fn(params, opt_state, key, *args, **kwargs)

    if callable(jit_compile):
        return jit_compile(run_step)
    if jit_compile:
        return jax.jit(run_step, donate_argnums=(0, 1) if donate else ())
    return run_step


def _run_key(seed):
    if isinstance(seed, (int, np.integer)):
        return jax.random.key(int(seed))
    return seed


def _log_line(step: int, num_steps: int, scalars: Mapping) -> str:
    line = f"Step {step:>{len(str(num_steps))}d}"
    for name, value in sorted(scalars.items()):
        line += f" | {name} {float(value):10.4f}"
    return line


def train(
    loss_fn: Callable,
    init_params,
    optimizer,
    num_steps: int,
    dataloader: Iterator | None = None,
    seed=0,
    jit_compile=True,
    eval_fn: Callable | None = None,
    log_every: int | None = None,
    init_step: int = 0,
    opt_state=None,
    *,
    progress: bool | str = True,
    return_result: bool = False,
    eval_every: int | None = None,
    donate: bool = True,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    **kwargs,
):
    """Optimises ``loss_fn`` with ``optimizer`` over steps ``init_step + 1..num_steps``.

    Args:
      loss_fn: ``loss_fn(params, key, [batch], **kwargs) -> (loss, metrics)``;
        the loss is a scalar or a dict of scalars per parameter group (see
        :func:`make_step`). Metrics named ``ess`` and ``log_Z`` are shown in
        the progress bar.
      init_params: initial parameters, any pytree (a Flax linen variable
        dict, an ``nnx.State``, a dict of arrays). They are copied once, so
        the caller's arrays stay valid although the step donates its inputs.
      optimizer: an optax transformation, or a dict of them keyed by the
        top-level keys of the parameters (:func:`group_optimizers`).
      num_steps: the last step number.
      dataloader: optional iterator of batches, passed after the key. On
        resume it must yield the batches of the steps after the checkpoint.
      seed: an int or a PRNG key; step ``t`` uses ``fold_in(key, t)``.
      jit_compile: compile the step with ``jax.jit`` (donating parameters
        and optimiser state), or a callable used to compile it instead
        (without donation), or ``False`` to run it eagerly.
      eval_fn: called as ``eval_fn(step, params, opt_state, metrics)`` at the
        start (``metrics=None``), every ``eval_every`` steps and after the
        last step. It may return ``None`` or a dict of arrays, collected in
        :attr:`TrainResult.evaluations`. The arrays it receives are donated
        to the next step: copy them to keep them.
      log_every: how often to update the bar (or print a line); default: 20
        times a run.
      init_step: the step to start after (Coix's way to resume).
      opt_state: optimiser state to start from (default:
        ``optimizer.init(init_params)``); copied like ``init_params``.
      progress: ``True`` for a tqdm bar with loss, ESS and log Z; ``"log"``
        for a line of all scalar metrics every ``log_every`` steps (Coix's
        output); ``False`` prints nothing (scripts).
      return_result: return a :class:`TrainResult` instead of Coix's
        ``(params, metrics)``.
      eval_every: how often to call ``eval_fn`` (default: ``log_every``).
      donate: donate the parameters and optimiser state to the compiled
        step, so XLA updates them in place (with ``jit_compile=True``).
        JAX (0.10) honours donation on CPU as on GPU: the donated buffers
        are deleted after the step. Where a backend cannot reuse a buffer,
        JAX warns ("Some donated buffers were not usable") and copies.
      checkpoint_dir: a directory to save checkpoints in (after every
        ``checkpoint_every`` steps and after the last step; the newest three
        are kept) and to resume from. A checkpoint
        (:mod:`combinators.checkpoint`) holds the pytree ``{"params",
        "opt_state", "run_key", "carried"}`` and, as metadata, the history,
        the evaluations and the step last evaluated.
        The directory is created and checked (a probe file is written and
        the free space compared with the state's size) before the first
        step, so an unwritable or full directory fails at once.
      checkpoint_every: steps between checkpoints (default: only the last).
      resume: if ``checkpoint_dir`` holds a checkpoint, continue from its
        newest intact one (:func:`combinators.checkpoint.load_latest`: a
        newer file that is truncated or fails its checksum is set aside as
        ``*.corrupt`` with a warning): parameters, optimiser state, run key
        (it replaces ``seed``), carried keyword arguments, history and
        evaluations. The run then equals an uninterrupted one bit for bit.
        A ``dataloader`` must start after that checkpoint's step
        (``checkpoint.load_latest(checkpoint_dir).step``).
      **kwargs: passed to ``loss_fn``; a kwarg whose name is also a metric is
        updated from that metric after each step (e.g. a memory) and saved
        in checkpoints.

    Returns:
      ``(params, metrics)`` like Coix, or a :class:`TrainResult`.

    Raises:
      ValueError: for a bad ``progress``, step count or interval, or a
        checkpoint that does not match the parameters.
      OSError: naming ``checkpoint_dir``, if checkpoints cannot be written
        there (raised before the first step).
      combinators.checkpoint.CheckpointError: if ``checkpoint_dir`` holds
        checkpoints but none is intact.

    Example:
      >>> def loss_fn(params, key, x):
      ...     loss = jnp.mean((params["w"] * x - 1.0) ** 2)
      ...     return loss, {}
      >>> batches = iter(jnp.full((100, 8), 2.0))  # a batch of x = 2 per step
      >>> result = train(loss_fn, {"w": jnp.zeros(())}, optax.adam(0.1), 100,
      ...                dataloader=batches, progress=False, return_result=True)
      >>> result.history["loss"].shape
      (100,)
      >>> round(float(result.params["w"]), 2)  # w x = 1
      0.5
    """
    if progress not in (True, False, "log"):
        raise ValueError(
            f"train: progress must be True, False or 'log', got {progress!r}."
        )
    if num_steps < init_step:
        raise ValueError(
            f"train: num_steps={num_steps} is before init_step={init_step}."
        )
    log_every = max(num_steps // 20, 1) if log_every is None else log_every
    eval_every = log_every if eval_every is None else eval_every
    for name, value in (("log_every", log_every), ("eval_every", eval_every)):
        if value < 1:
            raise ValueError(f"train: {name} must be at least 1, got {value}.")
    if checkpoint_every is not None and (
        checkpoint_dir is None or checkpoint_every < 1
    ):
        raise ValueError(
            "train: checkpoint_every needs a checkpoint_dir and must be at least 1, "
            f"got {checkpoint_every}."
        )
    if isinstance(optimizer, Mapping):
        optimizer = group_optimizers(optimizer)
    step_fn = _compile(make_step(loss_fn, optimizer), jit_compile, donate)

    params = _owned_copy(init_params)
    opt_state = _owned_copy(optimizer.init(params) if opt_state is None else opt_state)
    run_key = _run_key(seed)
    kwargs = dict(kwargs)
    start = init_step
    log = _Log()
    carried: list[str] = []
    saved = None
    if checkpoint_dir is not None:
        # An unusable directory fails here, before any step, not at the
        # first checkpoint.
        checkpoint.check_writable(
            checkpoint_dir, _checkpoint_nbytes((params, opt_state, kwargs))
        )
        if resume:
            saved = checkpoint.load_latest(checkpoint_dir)
    if saved is not None:
        saved_path = saved.path
        carried = list(saved.metadata["carried"])
        missing = [name for name in carried if name not in kwargs]
        if missing:
            raise ValueError(
                f"train: the checkpoint {saved_path} carries the keyword arguments "
                f"{missing}; pass them (their initial values give the structure)."
            )
        template = {
            "params": params,
            "opt_state": opt_state,
            "run_key": run_key,
            "carried": {name: kwargs[name] for name in carried},
        }
        state = checkpoint.restore(saved, template)
        params, opt_state = state["params"], state["opt_state"]
        run_key = state["run_key"]
        kwargs.update(state["carried"])
        start = saved.step
        log = _Log(
            saved.metadata["history"],
            saved.metadata["evaluations"],
            int(saved.metadata["last_eval_step"]),
        )

    def save(step: int) -> None:
        log.flush()
        history, evaluations = log.arrays()
        tree = {
            "params": params,
            "opt_state": opt_state,
            "run_key": run_key,
            "carried": {name: kwargs[name] for name in carried},
        }
        metadata = {
            "history": history,
            "evaluations": evaluations,
            "last_eval_step": log.last_eval_step,
            "carried": carried,
        }
        checkpoint.save(cast(str, checkpoint_dir), step, tree, metadata=metadata)

    if eval_fn is not None and log.last_eval_step != start:
        log.add_evaluation(start, eval_fn(start, params, opt_state, None))
    # The first step compiles: it is shown as such and timed on its own, so
    # that the bar's rate and ETA count only compiled steps.
    status = tqdm(
        desc="compiling the training step…",
        bar_format="{desc} {elapsed}",
        disable=progress is not True or start >= num_steps,
        dynamic_ncols=True,
    )
    bar = status
    compile_seconds = math.nan
    metrics: dict = {}
    tic = time.perf_counter()
    for step in range(start + 1, num_steps + 1):
        args = (next(dataloader),) if dataloader is not None else ()
        params, opt_state, metrics = step_fn(
            params, opt_state, run_key, step, *args, **kwargs
        )
        if step == start + 1:
            jax.block_until_ready((params, opt_state, metrics))
            compile_seconds = time.perf_counter() - tic
            status.close()
            bar = tqdm(
                total=num_steps,
                initial=step,
                disable=progress is not True,
                desc=f"train (compiled in {compile_seconds:.1f} s)",
                dynamic_ncols=True,
            )
        for name in kwargs:
            if name in metrics:
                kwargs[name] = metrics[name]
                if name not in carried:
                    carried.append(name)
        log.add(step, metrics)
        if step > start + 1:
            bar.update(1)
        if step % log_every == 0 or step == num_steps:
            scalars = log.flush()
            shown = {k: scalars[k] for k in ("loss", "ess", "log_Z") if k in scalars}
            postfix = {k: f"{float(v):.4g}" for k, v in shown.items()}
            bar.set_postfix(postfix, refresh=False)
            if progress == "log":
                print(_log_line(step, num_steps, scalars), flush=True)
        if eval_fn is not None and (step % eval_every == 0 or step == num_steps):
            log.add_evaluation(step, eval_fn(step, params, opt_state, metrics))
        if checkpoint_every and step % checkpoint_every == 0 and step < num_steps:
            save(step)
    bar.close()
    log.flush()
    if start < num_steps:
        log.history.setdefault("compile_seconds", []).append(compile_seconds)
    if checkpoint_dir is not None and start < num_steps:
        save(num_steps)
    history, evaluations = log.arrays()
    if not return_result:
        return params, metrics
    skipped = int(np.sum(history.get("skipped", 0)))
    return TrainResult(
        params, metrics, history, opt_state, skipped, evaluations, max(start, num_steps)
    )
