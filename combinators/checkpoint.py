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

File format (version 2): a 52-byte header, then the payload.

* header: the magic bytes 0x89 ``CMBCKPT`` (8), the format version
  (uint32, little-endian), the payload length in bytes (uint64) and the
  SHA-256 digest (32 bytes) of the first 20 header bytes followed by the
  payload;
* payload: Flax's msgpack serialisation
  (``flax.serialization.msgpack_serialize``) of a record with the step, the
  leaves' key paths, the leaves, the key implementations and the metadata.
  Array bytes are written verbatim, so restored arrays are bit-for-bit equal
  to the saved ones.

:func:`load` checks the length and the digest before decoding anything, so a
flipped bit or a truncated file raises :class:`CheckpointError` naming the
file instead of loading wrong numbers. Files of format 1 (a bare msgpack
record, written before checksums) are still read, unverified.

A file is written under a temporary name, flushed to disk and renamed (the
directory is flushed too), so a crash mid-write leaves the previous
checkpoint intact. :func:`load_latest` skips (and renames to ``*.corrupt``)
checkpoints that fail to load, with a warning, and returns the newest intact
one; :func:`check_writable` reports an unusable directory before a run
starts.

Example:
  >>> import tempfile
  >>> from combinators import checkpoint
  >>> directory = tempfile.mkdtemp()
  >>> params = {"w": jnp.arange(3.0)}
  >>> path = checkpoint.save(directory, 100, {"params": params}, metadata={})
  >>> saved = checkpoint.load_latest(directory)
  >>> saved.step
  100
  >>> checkpoint.restore(saved, {"params": params})["params"]
  {'w': Array([0., 1., 2.], dtype=float32)}
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import struct
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from combinators.types import is_typed_key

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "check_writable",
    "latest",
    "load",
    "load_latest",
    "restore",
    "save",
]

_FILE = re.compile(r"^checkpoint_(\d+)\.msgpack$")
_FORMAT = 2
_LEGACY_FORMAT = 1  # a bare msgpack record, no header and no checksum
_MAGIC = b"\x89CMBCKPT"
_PREFIX = struct.Struct("<8sIQ")  # magic, format version, payload length
_HEADER_SIZE = _PREFIX.size + hashlib.sha256().digest_size  # 52 bytes


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt or foreign."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped when looking for the newest intact one."""


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
      path: the file it was read from.
    """

    step: int
    paths: list[str]
    leaves: list[np.ndarray]
    key_impls: list[str]
    metadata: dict
    path: str = ""


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
      OSError: naming the file, if it cannot be written (the previous
        checkpoints are left as they were).
    """
    if step < 0:
        raise ValueError(f"checkpoint.save: step must be non-negative, got {step}.")
    if keep is not None and keep < 1:
        raise ValueError(f"checkpoint.save: keep must be at least 1, got {keep}.")
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths, leaves, impls = [], [], []
    for key_path, leaf in flat:
        paths.append(jax.tree_util.keystr(key_path))
        if is_typed_key(leaf):
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
    payload = serialization.msgpack_serialize(record)
    prefix = _PREFIX.pack(_MAGIC, _FORMAT, len(payload))
    digest = hashlib.sha256(prefix)
    digest.update(payload)
    path = os.path.join(directory, _file_name(step))
    partial = path + ".partial"
    try:
        os.makedirs(directory, exist_ok=True)
        with open(partial, "wb") as f:
            f.write(prefix)
            f.write(digest.digest())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        _fsync_directory(directory)
    except OSError as e:
        _remove_quietly(partial)
        raise OSError(
            e.errno, f"checkpoint.save: cannot write {path}: {e.strerror or e}"
        ) from e
    if keep is not None:
        for old in _steps(directory)[:-keep]:
            os.remove(os.path.join(directory, _file_name(old)))
    return path


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_directory(directory: str) -> None:
    """Flushes a directory's entries (a rename) to disk, where supported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(directory: str, nbytes: int = 0) -> None:
    """Checks that checkpoints can be written to ``directory``, creating it.

    Writes, flushes to disk and removes a small probe file, and compares the
    free space with ``nbytes``, so that an unusable directory is reported
    before a run starts rather than at its first checkpoint.

    Args:
      directory: the checkpoint directory.
      nbytes: the expected size of one checkpoint (0 to skip the free-space
        check).

    Raises:
      OSError: naming the directory and the reason (not a directory, no
        permission, no space left, ...).
    """
    probe = os.path.join(directory, f".write_probe_{os.getpid()}.partial")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
        free = shutil.disk_usage(directory).free
    except OSError as e:
        _remove_quietly(probe)
        raise OSError(
            e.errno,
            f"checkpoint: cannot write checkpoints to the directory {directory!r}: "
            f"{e.strerror or e}",
        ) from e
    if free < nbytes:
        raise OSError(
            errno.ENOSPC,
            f"checkpoint: the checkpoint directory {directory!r} has {free} bytes "
            f"free, but a checkpoint needs about {nbytes}",
        )


def latest(directory: str) -> str | None:
    """The path of the newest checkpoint in ``directory``, or ``None``.

    The file is not read; :func:`load_latest` finds the newest intact one.
    """
    steps = _steps(directory)
    return os.path.join(directory, _file_name(steps[-1])) if steps else None


def _payload(path: str, data: bytes) -> bytes | None:
    """The verified payload of a format-2 file, ``None`` for format 1."""
    if not data:
        raise CheckpointError(f"checkpoint.load: {path} is empty.")
    if not data.startswith(_MAGIC):
        if _MAGIC.startswith(data):
            raise CheckpointError(
                f"checkpoint.load: {path} is truncated ({len(data)} bytes)."
            )
        return None
    if len(data) < _HEADER_SIZE:
        raise CheckpointError(
            f"checkpoint.load: {path} is truncated ({len(data)} bytes, shorter "
            f"than the {_HEADER_SIZE}-byte header)."
        )
    _, version, length, digest = struct.unpack_from(
        f"<8sIQ{_HEADER_SIZE - _PREFIX.size}s", data
    )
    payload = data[_HEADER_SIZE:]
    if len(payload) != length:
        raise CheckpointError(
            f"checkpoint.load: {path} is truncated or corrupt: its header gives "
            f"{length} bytes of data, the file holds {len(payload)}."
        )
    check = hashlib.sha256(data[: _PREFIX.size])
    check.update(payload)
    if check.digest() != digest:
        raise CheckpointError(
            f"checkpoint.load: {path} is corrupt: its SHA-256 checksum does not "
            "match its contents."
        )
    if version != _FORMAT:
        raise CheckpointError(
            f"checkpoint.load: {path} has format {version}; this version of "
            f"combinators reads formats {_LEGACY_FORMAT} and {_FORMAT}."
        )
    return payload


def load(path: str) -> Checkpoint:
    """Reads and verifies a checkpoint file written by :func:`save`.

    Args:
      path: the file.

    Returns:
      A :class:`Checkpoint`; match it to a template with :func:`restore`.

    Raises:
      CheckpointError: (a ``ValueError``) naming the file, if it is empty,
        truncated, fails its checksum or is not a checkpoint file.
      OSError: if it cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    payload = _payload(path, data)
    expected = _LEGACY_FORMAT if payload is None else _FORMAT
    try:
        record = serialization.msgpack_restore(data if payload is None else payload)
        if not isinstance(record, dict) or record.get("format") != expected:
            raise TypeError("no checkpoint record")
        return Checkpoint(
            step=int(record["step"]),
            paths=list(record["paths"]),
            leaves=[np.asarray(leaf) for leaf in record["leaves"]],
            key_impls=list(record["key_impls"]),
            metadata=record["metadata"],
            path=path,
        )
    except Exception as e:  # any decoding failure of foreign or damaged bytes
        what = "not a checkpoint file" if payload is None else "corrupt"
        raise CheckpointError(
            f"checkpoint.load: {path} is {what} ({type(e).__name__}: {e})."
        ) from e


def load_latest(directory: str) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that loads intact.

    A newer file that fails to load (truncated, fails its checksum, ...) is
    renamed to ``<name>.corrupt``, so that it is neither loaded nor kept in
    place of new checkpoints, with a :class:`CheckpointWarning` naming it
    and the reason.

    Args:
      directory: the checkpoint directory.

    Returns:
      The loaded :class:`Checkpoint` (its ``path`` says which), or ``None``
      if the directory holds no checkpoint.

    Raises:
      CheckpointError: if it holds checkpoints but none is intact.
    """
    skipped = []
    for step in reversed(_steps(directory)):
        path = os.path.join(directory, _file_name(step))
        try:
            return load(path)
        except (CheckpointError, OSError) as e:
            try:
                os.replace(path, path + ".corrupt")
                where = f"set aside as {path}.corrupt"
            except OSError as move_error:
                where = f"left in place ({move_error})"
            skipped.append(path)
            warnings.warn(
                f"Skipping a checkpoint: {e} It was {where}; trying the previous "
                "checkpoint.",
                CheckpointWarning,
                stacklevel=2,
            )
    if skipped:
        raise CheckpointError(
            f"checkpoint: no checkpoint in {directory} is intact (tried "
            f"{', '.join(skipped)}; see the warnings)."
        )
    return None


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
        typed = is_typed_key(want)
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
