"""Data for the reference programs: 8x8 digits, MNIST IDX files, minibatches.

* :func:`load_digits` gives scikit-learn's bundled 8x8 handwritten digits
  (1797 images, no download), scaled to [0, 1], optionally binarised, split
  into train and test sets with a fixed seed.
* :func:`read_idx` reads the IDX format of the MNIST files
  (``train-images-idx3-ubyte`` etc., plain or gzip-compressed) with numpy
  only; :func:`load_mnist` reads an images/labels pair from a local
  directory. Nothing is downloaded.
* :func:`batches` is an endless iterator of shuffled minibatches, the
  ``dataloader`` of :func:`combinators.train.train`.

References:
  Alpaydin & Kaynak (1998), "Optical Recognition of Handwritten Digits",
  UCI Machine Learning Repository (the 8x8 digits); LeCun, Bottou, Bengio &
  Haffner (1998), "Gradient-based learning applied to document
  recognition" (MNIST, whose page, http://yann.lecun.com/exdb/mnist/,
  defines the IDX format).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

__all__ = [
    "Dataset",
    "IDX_DTYPES",
    "batches",
    "binarize",
    "load_digits",
    "load_mnist",
    "read_idx",
    "tile_images",
]

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


class Dataset(NamedTuple):
    """A train/test split of images and class labels.

    Attributes:
      x_train: training images, float32, shape ``(n_train, *image)``.
      y_train: training labels, int32, shape ``(n_train,)``.
      x_test: test images.
      y_test: test labels.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# ---------------------------------------------------------------------------
# 8x8 digits
# ---------------------------------------------------------------------------


def binarize(
    x: np.ndarray, method: str = "threshold", *, seed: int = 0, threshold: float = 0.5
) -> np.ndarray:
    """Binarises intensities in [0, 1].

    Args:
      x: intensities in [0, 1].
      method: ``"threshold"`` (``x > threshold``) or ``"stochastic"`` (one
        draw ``Bernoulli(x)`` per pixel, fixed by ``seed``, as in Salakhutdinov
        & Murray 2008, "On the quantitative analysis of deep belief
        networks").
      seed: the seed of the stochastic binarisation.
      threshold: the threshold of ``"threshold"``.

    Returns:
      A float32 array of zeros and ones with the shape of ``x``.

    Raises:
      ValueError: for an unknown method or intensities outside [0, 1].
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"binarize: intensities must lie in [0, 1], got range "
            f"[{x.min()}, {x.max()}]."
        )
    if method == "threshold":
        return (x > threshold).astype(np.float32)
    if method == "stochastic":
        rng = np.random.default_rng(seed)
        return (rng.random(x.shape) < x).astype(np.float32)
    raise ValueError(
        f"binarize: method must be 'threshold' or 'stochastic', got {method!r}."
    )


def load_digits(
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    binarization: str | None = "threshold",
) -> Dataset:
    """scikit-learn's 8x8 digits, scaled to [0, 1], split into train and test.

    Args:
      seed: seeds the (class-stratified) split and a stochastic binarisation.
      test_fraction: the fraction of images in the test set.
      binarization: ``"threshold"`` (pixel > 0.5), ``"stochastic"`` (one
        Bernoulli draw per pixel) or ``None`` (grey levels in [0, 1]).

    Returns:
      A :class:`Dataset` of flattened images (64 pixels, row-major).
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"load_digits: test_fraction must be in (0, 1), got {test_fraction}."
        )
    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    if binarization is not None:
        x = binarize(x, binarization, seed=seed)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset(x_train, y_train, x_test, y_test)


# ---------------------------------------------------------------------------
# IDX (MNIST) files
# ---------------------------------------------------------------------------


def _read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(
                f"read_idx: {path}: corrupt gzip data ({error})."
            ) from None
    return raw


def read_idx(path: str | os.PathLike, *, ndim: int | None = None) -> np.ndarray:
    """Reads one IDX file (the MNIST format), plain or gzip-compressed.

    The format: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed
    byte, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of
    dimensions, one big-endian uint32 size per dimension, then the data in
    C order, big-endian. Gzip is recognised by its magic bytes, whatever the
    file is called.

    Args:
      path: the file.
      ndim: if given, the number of dimensions the file must have (3 for
        images, 1 for labels).

    Returns:
      The array, in native byte order.

    Raises:
      ValueError: naming the file, for a bad magic number, an unknown type
        code, a wrong number of dimensions, or a data size that does not
        match the header (truncated or trailing bytes).
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(
            f"read_idx: {path}: {len(raw)} bytes is too short for an IDX header "
            f"(4-byte magic number)."
        )
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"read_idx: {path}: bad magic number 0x{raw[:4].hex()}; an IDX file "
            f"starts with two zero bytes, a type code and the number of "
            f"dimensions (e.g. 0x00000803 for MNIST images)."
        )
    code, rank = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise ValueError(
            f"read_idx: {path}: unknown IDX type code 0x{code:02x} in magic number "
            f"0x{raw[:4].hex()}; known codes: {known}."
        )
    if ndim is not None and rank != ndim:
        raise ValueError(
            f"read_idx: {path}: expected {ndim} dimensions, the header says {rank}."
        )
    header = 4 + 4 * rank
    if len(raw) < header:
        raise ValueError(
            f"read_idx: {path}: truncated header: {rank} dimensions need "
            f"{header} bytes, the file has {len(raw)}."
        )
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=rank, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"read_idx: {path}: shape {shape} of {dtype} needs {expected} data "
            f"bytes, the file has {len(raw) - header} (truncated or trailing "
            f"data)."
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find(directory: str | os.PathLike, stem: str) -> str:
    candidates = [stem, stem + ".gz"]
    dotted = stem.replace(
        "-idx", ".idx"
    )  # some copies are called train-images.idx3-ubyte
    candidates += [dotted, dotted + ".gz"]
    for name in candidates:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"load_mnist: none of {candidates} in {directory!s}; this library downloads "
        f"nothing, so place the MNIST IDX files there."
    )


def load_mnist(
    directory: str | os.PathLike, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Reads the MNIST images and labels of one split from local IDX files.

    Looks for ``{prefix}-images-idx3-ubyte`` and ``{prefix}-labels-idx1-ubyte``
    (optionally ``.gz``, or with ``.idx`` instead of ``-idx``), where
    ``prefix`` is ``train`` or ``t10k``.

    Args:
      directory: the folder holding the files.
      split: ``"train"`` or ``"test"`` (``"t10k"`` is accepted too).

    Returns:
      ``(images, labels)``: float32 images in [0, 1] of shape
      ``(n, rows, cols)`` and int32 labels of shape ``(n,)``.

    Raises:
      FileNotFoundError: if a file is missing.
      ValueError: for malformed files or when images and labels disagree.
    """
    prefixes = {"train": "train", "test": "t10k", "t10k": "t10k"}
    if split not in prefixes:
        raise ValueError(f"load_mnist: split must be 'train' or 'test', got {split!r}.")
    prefix = prefixes[split]
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(
            f"load_mnist: MNIST images and labels are unsigned bytes, got "
            f"{images.dtype} ({images_path}) and {labels.dtype} ({labels_path})."
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"load_mnist: {images.shape[0]} images ({images_path}) but "
            f"{labels.shape[0]} labels ({labels_path})."
        )
    return (images / np.float32(255.0)).astype(np.float32), labels.astype(np.int32)


# ---------------------------------------------------------------------------
# Minibatches
# ---------------------------------------------------------------------------


def batches(
    *arrays: np.ndarray,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    num_epochs: int | None = None,
) -> Iterator:
    """Minibatches of ``arrays`` (sliced together along axis 0), epoch after epoch.

    Each epoch visits every row once, in a new random order when ``shuffle``
    (a numpy generator seeded by ``seed``). With ``drop_last`` every batch has
    exactly ``batch_size`` rows (fixed shapes, so a jit-compiled step
    compiles once); the left-over rows of an epoch are skipped, different
    ones each epoch.

    Args:
      *arrays: one or more arrays with the same leading length.
      batch_size: rows per batch.
      seed: the shuffling seed.
      shuffle: shuffle every epoch.
      drop_last: skip a last, smaller batch.
      num_epochs: stop after this many epochs; ``None`` runs forever.

    Yields:
      One array per batch, or a tuple when several arrays are given.

    Raises:
      ValueError: for no arrays, mismatched lengths or a bad batch size.
    """
    if not arrays:
        raise ValueError("batches: give at least one array.")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(
            f"batches: arrays have different lengths {[len(a) for a in arrays]}."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batches: batch_size must be a positive int, got {batch_size!r}."
        )
    if drop_last and batch_size > n:
        raise ValueError(
            f"batches: batch_size {batch_size} exceeds the {n} rows and drop_last "
            f"is set, so no batch would be produced."
        )
    return _batches(arrays, batch_size, seed, shuffle, drop_last, num_epochs)


def _batches(arrays, batch_size, seed, shuffle, drop_last, num_epochs):
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    epoch = 0
    while num_epochs is None or epoch < num_epochs:
        order = rng.permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            chunk = tuple(a[index] for a in arrays)
            yield chunk[0] if len(chunk) == 1 else chunk
        epoch += 1


# ---------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------


def tile_images(
    images: np.ndarray, columns: int, shape: tuple[int, int] = (8, 8), pad: int = 1
) -> np.ndarray:
    """Arranges flattened images in a grid (rows filled first), for ``imshow``.

    (:func:`combinators.plots.image_grid` draws such a grid on an axes; this
    returns the array.)

    Args:
      images: shape ``(n, rows * cols)`` or ``(n, rows, cols)``.
      columns: images per grid row.
      shape: ``(rows, cols)`` of one image.
      pad: pixels of padding between images (filled with NaN, which
        ``imshow`` leaves blank).

    Returns:
      A 2-D float array.
    """
    images = np.asarray(images, dtype=np.float32).reshape(-1, *shape)
    n = images.shape[0]
    grid_rows = -(-n // columns)
    height, width = shape[0] + pad, shape[1] + pad
    grid = np.full(
        (grid_rows * height - pad, columns * width - pad), np.nan, np.float32
    )
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * height : r * height + shape[0], c * width : c * width + shape[1]] = (
            image
        )
    return grid
