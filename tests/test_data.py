"""programs.data: IDX files round-trip through hand-written bytes; digits; batches."""

import gzip
import struct

import numpy as np
import pytest

from programs import data


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """The IDX encoding, written out by hand: magic, sizes, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(data.IDX_DTYPES[code]).tobytes()


def write(path, payload: bytes, compress: bool = False):
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


# ---------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, values",
    [
        (0x08, np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
        (0x09, np.array([[-128, 0, 127]], dtype=np.int8)),
        (0x0B, np.array([-300, 2, 30000], dtype=np.int16)),
        (0x0C, np.array([[-(2**31), 1], [7, 2**31 - 1]], dtype=np.int32)),
        (0x0D, np.array([1.5, -2.25, 1e30], dtype=np.float32)),
        (0x0E, np.array([[np.pi], [-1e-300]], dtype=np.float64)),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_every_type(tmp_path, code, values, compress):
    path = write(tmp_path / "a.idx", idx_bytes(values, code), compress)
    got = data.read_idx(path)
    assert got.shape == values.shape
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, values)


def test_read_idx_reads_mnist_named_gz_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(images, 0x08), True)
    np.testing.assert_array_equal(
        data.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", ndim=3), images
    )


def test_read_idx_zero_length_dimension(tmp_path):
    path = write(tmp_path / "empty", idx_bytes(np.zeros((0, 4), np.uint8), 0x08))
    assert data.read_idx(path).shape == (0, 4)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x1f\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic number"),
        (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic number"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX type code"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 1), "truncated header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00" * 4, "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00" * 3, "trailing"),
        (
            b"\x00\x00\x0c\x01" + struct.pack(">I", 2) + b"\x00" * 7,
            "needs 8 data bytes",
        ),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, payload, message):
    path = write(tmp_path / "bad", payload)
    with pytest.raises(ValueError, match=message) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_wrong_rank_and_corrupt_gzip(tmp_path):
    path = write(tmp_path / "labels", idx_bytes(np.zeros(3, np.uint8), 0x08))
    with pytest.raises(ValueError, match="expected 3 dimensions, the header says 1"):
        data.read_idx(path, ndim=3)
    corrupt = write(tmp_path / "bad.gz", gzip.compress(b"\x00" * 64)[:-6])
    with pytest.raises(ValueError, match="corrupt gzip"):
        data.read_idx(corrupt)


# ---------------------------------------------------------------------------
# load_mnist
# ---------------------------------------------------------------------------


def mnist_pair(directory, prefix, n, n_labels=None, compress=False, dotted=False):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n if n_labels is None else n_labels, dtype=np.uint8)
    sep = "." if dotted else "-"
    gz = ".gz" if compress else ""
    write(
        directory / f"{prefix}-images{sep}idx3-ubyte{gz}",
        idx_bytes(images, 8),
        compress,
    )
    write(
        directory / f"{prefix}-labels{sep}idx1-ubyte{gz}",
        idx_bytes(labels, 8),
        compress,
    )
    return images, labels


@pytest.mark.parametrize(
    "compress, dotted", [(False, False), (True, False), (False, True)]
)
def test_load_mnist_scales_images_and_reads_labels(tmp_path, compress, dotted):
    images, labels = mnist_pair(tmp_path, "t10k", 6, compress=compress, dotted=dotted)
    x, y = data.load_mnist(tmp_path, "test")
    assert x.shape == (6, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x, images / 255.0, rtol=1e-6)
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(y, labels)
    assert y.dtype == np.int32


def test_load_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        data.load_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be"):
        data.load_mnist(tmp_path, "validation")
    mnist_pair(tmp_path, "train", 4, n_labels=3)
    with pytest.raises(ValueError, match="4 images .* but 3 labels"):
        data.load_mnist(tmp_path, "train")


def test_load_mnist_rejects_images_with_wrong_rank(tmp_path):
    write(
        tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((2, 784), np.uint8), 8)
    )
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(2, np.uint8), 8))
    with pytest.raises(ValueError, match="expected 3 dimensions"):
        data.load_mnist(tmp_path)


# ---------------------------------------------------------------------------
# digits and binarisation
# ---------------------------------------------------------------------------


def test_load_digits_split_is_fixed_binary_and_stratified():
    a = data.load_digits(seed=0)
    b = data.load_digits(seed=0)
    for left, right in zip(a, b, strict=True):
        np.testing.assert_array_equal(left, right)
    assert a.x_train.shape == (1437, 64) and a.x_test.shape == (360, 64)
    assert set(np.unique(a.x_train)) <= {0.0, 1.0}
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    # Stratified: every class has the same share of the test set (to one image).
    counts = np.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    other = data.load_digits(seed=1)
    assert not np.array_equal(a.y_test, other.y_test)


def test_load_digits_grey_levels_lie_in_unit_interval():
    grey = data.load_digits(binarization=None)
    both = np.concatenate([grey.x_train, grey.x_test])
    assert both.min() == 0.0 and both.max() == 1.0
    assert len(np.unique(both)) == 17  # sklearn's 0..16 grey levels, divided by 16
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=1.0)


def test_stochastic_binarisation_has_the_grey_level_as_mean():
    # Each pixel is one Bernoulli(p) draw: over n = 200_000 pixels of level p
    # the mean is within 5 standard errors sqrt(p (1 - p) / n) of p.
    n = 200_000
    for p in (0.1, 0.5, 0.8):
        bits = data.binarize(np.full(n, p, np.float32), "stochastic", seed=3)
        assert abs(bits.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    x = np.linspace(0, 1, 11, dtype=np.float32)
    np.testing.assert_array_equal(data.binarize(x), (x > 0.5).astype(np.float32))
    with pytest.raises(ValueError, match="method"):
        data.binarize(x, "otsu")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.binarize(x * 16)


# ---------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------


def test_batches_visit_every_row_once_per_epoch():
    x = np.arange(10)
    y = -np.arange(10)
    epochs = list(data.batches(x, y, batch_size=5, seed=0, num_epochs=2))
    assert len(epochs) == 4
    for bx, by in epochs:
        np.testing.assert_array_equal(by, -bx)  # rows stay paired
    first = np.sort(np.concatenate([bx for bx, _ in epochs[:2]]))
    np.testing.assert_array_equal(first, x)
    assert not np.array_equal(epochs[0][0], epochs[2][0])  # reshuffled


def test_batches_drop_last_and_keep_last():
    x = np.arange(7)
    dropped = list(data.batches(x, batch_size=3, num_epochs=1))
    assert [len(b) for b in dropped] == [3, 3]
    kept = list(
        data.batches(x, batch_size=3, num_epochs=1, shuffle=False, drop_last=False)
    )
    np.testing.assert_array_equal(np.concatenate(kept), x)
    endless = data.batches(x, batch_size=3)
    assert all(len(next(endless)) == 3 for _ in range(100))


def test_batches_errors():
    with pytest.raises(ValueError, match="at least one"):
        data.batches(batch_size=2)
    with pytest.raises(ValueError, match="different lengths"):
        data.batches(np.zeros(3), np.zeros(4), batch_size=2)
    with pytest.raises(ValueError, match="positive int"):
        data.batches(np.zeros(3), batch_size=0)
    with pytest.raises(ValueError, match="exceeds"):
        data.batches(np.zeros(3), batch_size=4)


def test_tile_images_places_images_row_by_row():
    images = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)  # three 2x2 images
    grid = data.tile_images(images, columns=2, shape=(2, 2), pad=1)
    assert grid.shape == (5, 5)
    np.testing.assert_array_equal(grid[:2, :2], images[0].reshape(2, 2))
    np.testing.assert_array_equal(grid[:2, 3:], images[1].reshape(2, 2))
    np.testing.assert_array_equal(grid[3:, :2], images[2].reshape(2, 2))
    assert np.isnan(grid[2]).all() and np.isnan(grid[3:, 3:]).all()
