"""Saving and restoring pytrees bit for bit, one msgpack file per step.

A checkpoint holds one pytree (the training state: parameters, optimiser
state, run key, carried keyword arguments) and a dict of metadata (metric
history, counters). The pytree is stored as its flattened leaves next to
their key paths; restoring it needs a *template*, a pytree of the same
structure (for training, the freshly initialised state), whose tree
definition rebuilds the restored leaves. Leaves are compared path by path,
with shape and dtype, so a checkpoint from a different model fails loudly
instead of loading into the wrong slots.

Typed PRNG keys (``jax.random.key``) are stored as their key data
(``jax.random.key_data``) with the name of their implementation and are
rewrapped with ``jax.random.wrap_key_data`` on restore.

The byte format is Flax's msgpack serialisation
(``flax.serialization.msgpack_serialize``), which writes array bytes
verbatim, so restored arrays are bit-for-bit equal to the saved ones. A file
is written under a temporary name and renamed, so a crash mid-write leaves
the previous checkpoint intact.

Example:
  >>> path = checkpoint.save("ckpt", 100, {"params": params}, metadata={})
  >>> saved = checkpoint.load(checkpoint.latest("ckpt"))
  >>> params = checkpoint.restore(saved, {"params": params})["params"]
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

__all__ = ["Checkpoint", "latest", "load", "restore", "save"]

_FILE = re.compile(r"^checkpoint_(\d+)\.msgpack$")
_FORMAT = 1


class Checkpoint(NamedTuple):
    """A checkpoint read from disk, before it is matched to a template.

    Attributes:
      step: the step the checkpoint was taken after.
      paths: key path of each leaf (``jax.tree_util.keystr``), in flattening
        order.
      leaves: the leaves as numpy arrays (key data for typed PRNG keys).
      key_impls: for each leaf, the PRNG implementation name of a typed key,
        or ``""`` for an ordinary array.
      metadata: the metadata dict given to :func:`save`.
    """

    step: int
    paths: list[str]
    leaves: list[np.ndarray]
    key_impls: list[str]
    metadata: dict


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _file_name(step: int) -> str:
    return f"checkpoint_{step:09d}.msgpack"


def _steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    found = (_FILE.match(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


def save(
    directory: str,
    step: int,
    tree: Any,
    *,
    metadata: dict | None = None,
    keep: int | None = 3,
) -> str:
    """Writes ``tree`` and ``metadata`` as the checkpoint of ``step``.

    Args:
      directory: the checkpoint directory (created if missing).
      step: the step number; names the file ``checkpoint_<step>.msgpack``.
      tree: any pytree of arrays (typed PRNG keys allowed). Leaves are
        copied to the host.
      metadata: a dict of what msgpack can hold: numbers, strings, numpy
        arrays, lists and dicts with string keys.
      keep: how many checkpoints to keep (the newest); ``None`` keeps all.

    Returns:
      The path of the written file.

    Raises:
      ValueError: if ``step`` is negative or ``keep`` is below 1.
    """
    if step < 0:
        raise ValueError(f"checkpoint.save: step must be non-negative, got {step}.")
    if keep is not None and keep < 1:
        raise ValueError(f"checkpoint.save: keep must be at least 1, got {keep}.")
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths, leaves, impls = [], [], []
    for path, leaf in flat:
        paths.append(jax.tree_util.keystr(path))
        if _is_typed_key(leaf):
            impls.append(str(jax.random.key_impl(leaf)))
            leaf = jax.random.key_data(leaf)
        else:
            impls.append("")
        leaves.append(np.asarray(jax.device_get(leaf)))
    record = {
        "format": _FORMAT,
        "step": int(step),
        "paths": paths,
        "leaves": leaves,
        "key_impls": impls,
        "metadata": {} if metadata is None else metadata,
    }
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, _file_name(step))
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(serialization.msgpack_serialize(record))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    if keep is not None:
        for old in _steps(directory)[:-keep]:
            os.remove(os.path.join(directory, _file_name(old)))
    return path


def latest(directory: str) -> str | None:
    """The path of the newest checkpoint in ``directory``, or ``None``."""
    steps = _steps(directory)
    return os.path.join(directory, _file_name(steps[-1])) if steps else None


def load(path: str) -> Checkpoint:
    """Reads a checkpoint file written by :func:`save`.

    Args:
      path: the file.

    Returns:
      A :class:`Checkpoint`; match it to a template with :func:`restore`.

    Raises:
      ValueError: if the file is not a checkpoint of this format.
    """
    with open(path, "rb") as f:
        record = serialization.msgpack_restore(f.read())
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError(f"checkpoint.load: {path} is not a checkpoint file.")
    return Checkpoint(
        step=int(record["step"]),
        paths=list(record["paths"]),
        leaves=[np.asarray(leaf) for leaf in record["leaves"]],
        key_impls=list(record["key_impls"]),
        metadata=record["metadata"],
    )


def restore(checkpoint: Checkpoint, template: Any) -> Any:
    """The saved pytree, rebuilt with the structure of ``template``.

    Args:
      checkpoint: a loaded :class:`Checkpoint`.
      template: a pytree of the saved structure (e.g. freshly initialised
        parameters); only its tree definition, key paths, shapes and dtypes
        are used.

    Returns:
      A pytree like ``template`` holding the saved values as device arrays
      (typed PRNG keys where the template has them).

    Raises:
      ValueError: naming the first leaf whose path, shape, dtype or key type
        differs from the template's.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    if len(flat) != len(checkpoint.leaves):
        raise ValueError(
            f"checkpoint.restore: the checkpoint of step {checkpoint.step} has "
            f"{len(checkpoint.leaves)} leaves, the template {len(flat)}."
        )
    restored = []
    for (path, want), name, leaf, impl in zip(
        flat, checkpoint.paths, checkpoint.leaves, checkpoint.key_impls, strict=True
    ):
        where = jax.tree_util.keystr(path)
        if where != name:
            raise ValueError(
                f"checkpoint.restore: leaf {name} of the checkpoint is {where} "
                "in the template."
            )
        typed = _is_typed_key(want)
        if typed != bool(impl):
            kinds = ("a typed PRNG key", "an array")
            raise ValueError(
                f"checkpoint.restore: {where} is {kinds[not impl]} in the "
                f"checkpoint but {kinds[not typed]} in the template."
            )
        want_data = jax.random.key_data(want) if typed else want
        shape = np.shape(want_data)
        if hasattr(want_data, "dtype"):
            dtype = np.dtype(want_data.dtype)
        else:  # a Python scalar: the dtype JAX would give it
            dtype = np.dtype(jax.dtypes.canonicalize_dtype(np.result_type(want_data)))
        if leaf.shape != shape or leaf.dtype != dtype:
            raise ValueError(
                f"checkpoint.restore: {where} is {leaf.dtype}{list(leaf.shape)} "
                f"in the checkpoint but {dtype}{list(shape)} in the template."
            )
        value = jnp.asarray(leaf)
        restored.append(jax.random.wrap_key_data(value, impl=impl) if typed else value)
    return jax.tree_util.tree_unflatten(treedef, restored)
