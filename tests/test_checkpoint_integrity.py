"""Checkpoint integrity: checksums, truncation, fallback on resume, and an
unusable directory reported before the first step.

A checkpoint file (format 2) is a 52-byte header (magic, format version,
payload length, SHA-256 digest) and a msgpack payload. A flipped bit
anywhere, or a truncated file, must raise an error naming the file instead
of loading wrong numbers; ``train(resume=True)`` must then continue from the
newest intact checkpoint, with a warning, exactly as an uninterrupted run.
"""

import hashlib
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from combinators import checkpoint
from combinators.train import train

HEADER = 52


def leaves_equal(a, b) -> bool:
    """Bit-for-bit equality of two pytrees (typed keys compared by key data)."""

    def data(x):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(
        data(x).dtype == data(y).dtype and np.array_equal(data(x), data(y))
        for x, y in zip(flat_a, flat_b, strict=True)
    )


def flip_bit(path, offset, bit=0):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 1 << bit
    open(path, "wb").write(bytes(data))


def saved_file(tmp_path):
    tree = {
        "w": jnp.linspace(-1.0, 1.0, 64),
        "step": jnp.int32(7),
        "key": jax.random.key(3),
    }
    path = checkpoint.save(str(tmp_path), 7, tree, metadata={"note": "x"})
    return path, tree


# ---------------------------------------------------------------------------
# The file: header, checksum, corruption and truncation
# ---------------------------------------------------------------------------


def test_file_has_a_header_with_length_and_sha256(tmp_path):
    path, tree = saved_file(tmp_path)
    data = open(path, "rb").read()
    magic, version, length, digest = struct.unpack_from("<8sIQ32s", data)
    assert magic == b"\x89CMBCKPT" and version == 2
    assert length == len(data) - HEADER
    assert digest == hashlib.sha256(data[:20] + data[HEADER:]).digest()
    saved = checkpoint.load(path)
    assert saved.step == 7 and saved.path == path
    assert leaves_equal(checkpoint.restore(saved, tree), tree)


# Magic, version, length, digest (first and last byte), then the payload.
HEADER_OFFSETS = [0, 7, 8, 12, 20, 51]


@pytest.mark.parametrize("where", HEADER_OFFSETS + ["payload_start", "middle", "end"])
@pytest.mark.parametrize("bit", [0, 7])
def test_a_flipped_bit_raises_naming_the_file(tmp_path, where, bit):
    path, _ = saved_file(tmp_path)
    size = os.path.getsize(path)
    offset = {"payload_start": HEADER, "middle": (HEADER + size) // 2, "end": size - 1}
    flip_bit(path, offset.get(where, where), bit)
    with pytest.raises(checkpoint.CheckpointError, match=path):
        checkpoint.load(path)


@pytest.mark.parametrize("keep", [0, 3, 8, 30, 51, 52, 53, "half", -1])
def test_a_truncated_file_raises_naming_the_file(tmp_path, keep):
    path, _ = saved_file(tmp_path)
    data = open(path, "rb").read()
    keep = {"half": len(data) // 2}.get(keep, keep)
    open(path, "wb").write(data[:keep])
    with pytest.raises(checkpoint.CheckpointError, match=path) as error:
        checkpoint.load(path)
    assert isinstance(error.value, ValueError)  # what load raised before


def test_format_1_files_without_checksum_still_load(tmp_path):
    record = {
        "format": 1,
        "step": 3,
        "paths": ["['w']"],
        "leaves": [np.arange(4.0, dtype=np.float32)],
        "key_impls": [""],
        "metadata": {"a": 1},
    }
    path = str(tmp_path / "checkpoint_000000003.msgpack")
    open(path, "wb").write(serialization.msgpack_serialize(record))
    saved = checkpoint.load(path)
    assert saved.step == 3 and saved.metadata == {"a": 1}
    restored = checkpoint.restore(saved, {"w": jnp.zeros(4)})
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))


def test_load_latest_skips_and_sets_aside_corrupt_files(tmp_path):
    directory = str(tmp_path)
    for step in (1, 2, 3):
        checkpoint.save(directory, step, {"x": jnp.full(2, step)})
    newest = checkpoint.latest(directory)
    flip_bit(newest, HEADER + 3)
    with pytest.warns(checkpoint.CheckpointWarning, match=newest):
        saved = checkpoint.load_latest(directory)
    assert saved.step == 2 and saved.path.endswith("checkpoint_000000002.msgpack")
    assert os.path.exists(newest + ".corrupt") and not os.path.exists(newest)
    assert checkpoint.load_latest(str(tmp_path / "missing")) is None


def test_no_intact_checkpoint_raises(tmp_path):
    directory = str(tmp_path)
    for step in (1, 2):
        path = checkpoint.save(directory, step, {"x": jnp.zeros(2)})
        open(path, "r+b").truncate(40)
    with pytest.warns(checkpoint.CheckpointWarning):
        with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
            checkpoint.load_latest(directory)


# ---------------------------------------------------------------------------
# Resuming from the newest intact checkpoint
# ---------------------------------------------------------------------------

STEPS = 12


def memory_loss(params, key, *, memory):
    noise = 0.1 * jax.random.normal(key, (3,))
    loss = jnp.sum((params["w"] - jnp.sin(memory) - noise) ** 2)
    return loss, {"memory": 0.9 * memory + 0.1 * params["w"]}


def run(num_steps, directory):
    return train(
        memory_loss,
        {"w": jnp.zeros(3)},
        optax.adam(0.05),
        num_steps,
        seed=jax.random.key(42),
        eval_fn=lambda step, params, opt_state, metrics: {"w": params["w"]},
        eval_every=2,
        checkpoint_dir=directory,
        checkpoint_every=2 if directory else None,
        progress=False,
        return_result=True,
        memory=jnp.arange(3.0),
    )


@pytest.fixture(scope="module")
def uninterrupted():
    return run(STEPS, None)


@pytest.mark.parametrize("damage", ["bit", "truncate", "both"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(
    tmp_path, uninterrupted, damage
):
    directory = str(tmp_path)
    first = run(6, directory)  # checkpoints after steps 2, 4 and 6
    assert first.step == 6
    newest = os.path.join(directory, "checkpoint_000000006.msgpack")
    previous = os.path.join(directory, "checkpoint_000000004.msgpack")
    if damage in ("bit", "both"):
        flip_bit(newest, os.path.getsize(newest) // 2, 3)
    if damage in ("truncate", "both"):
        target = previous if damage == "both" else newest
        open(target, "r+b").truncate(os.path.getsize(target) - 10)
    with pytest.warns(checkpoint.CheckpointWarning) as warned:
        resumed = run(STEPS, directory)
    skipped = [6, 4] if damage == "both" else [6]
    assert len(warned) == len(skipped)
    for record, step in zip(warned, skipped, strict=True):
        assert f"checkpoint_{step:09d}.msgpack is " in str(record.message)
    assert leaves_equal(resumed.params, uninterrupted.params)
    assert leaves_equal(resumed.opt_state, uninterrupted.opt_state)
    assert leaves_equal(resumed.metrics, uninterrupted.metrics)
    assert resumed.step == STEPS
    for name in set(uninterrupted.history) - {"compile_seconds"}:
        assert leaves_equal(resumed.history[name], uninterrupted.history[name]), name
    assert leaves_equal(dict(resumed.evaluations), dict(uninterrupted.evaluations))
    # The damaged files were set aside; the newest three are intact.
    set_aside = ["checkpoint_000000006.msgpack.corrupt"]
    if damage == "both":
        set_aside.insert(0, "checkpoint_000000004.msgpack.corrupt")
    kept = [f"checkpoint_0000000{step:02d}.msgpack" for step in (8, 10, 12)]
    assert sorted(os.listdir(directory)) == sorted(kept + set_aside)
    for name in kept:
        assert checkpoint.load(os.path.join(directory, name)).step == int(name[11:20])


# ---------------------------------------------------------------------------
# An unusable directory fails before the first step
# ---------------------------------------------------------------------------


def traced_run(directory, calls):
    def loss_fn(params, key):
        calls.append("step")  # runs while tracing the first step
        return jnp.sum(params["w"] ** 2), {}

    def eval_fn(step, params, opt_state, metrics):
        calls.append("eval")

    train(loss_fn, {"w": jnp.ones(2)}, optax.sgd(0.1), 3, eval_fn=eval_fn,
          checkpoint_dir=directory, progress=False)  # fmt: skip


def test_a_directory_under_a_file_fails_before_the_first_step(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    directory = str(tmp_path / "file" / "checkpoints")
    calls = []
    with pytest.raises(OSError, match="checkpoints") as error:
        traced_run(directory, calls)
    assert directory in str(error.value)
    assert calls == []  # neither traced nor evaluated


def test_a_full_directory_fails_before_the_first_step(tmp_path, monkeypatch):
    def nearly_full(path):
        return type("usage", (), {"total": 10**9, "used": 10**9 - 100, "free": 100})

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", nearly_full)
    calls = []
    with pytest.raises(OSError, match="100 bytes free") as error:
        traced_run(str(tmp_path / "ckpt"), calls)
    assert str(tmp_path / "ckpt") in str(error.value)
    assert calls == []
    assert os.listdir(tmp_path / "ckpt") == []  # the probe file is removed


def test_save_errors_name_the_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="checkpoint_000000001.msgpack"):
        checkpoint.save(str(tmp_path / "file" / "x"), 1, {"x": jnp.zeros(1)})
