"""Dataset readers against tiny files written in the real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from distillkit.data import (
    DatasetNotFoundError,
    channel_stats,
    list_datasets,
    load_dataset,
    read_idx,
)
from distillkit.data import datasets as ds

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.int32): 0x0C}


def write_idx(path: Path, arr: np.ndarray, compress: bool) -> Path:
    """Write `arr` as an IDX file (big-endian, as in the MNIST distribution)."""
    header = struct.pack(">HBB", 0, _IDX_CODES[arr.dtype], arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_fashion_dir(root: Path, compress: bool, n_train: int = 12, n_test: int = 5) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / name, arr, compress)
    return arrays


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """Hide the system Fashion-MNIST copy and the env var so only tmp files count."""
    monkeypatch.setattr(ds, "SYSTEM_FASHION_MNIST_DIR", str(tmp_path / "no-system-copy"))
    monkeypatch.delenv(ds.ENV_VAR, raising=False)


# --------------------------------------------------------------------------- registry


def test_registry_lists_builtin_datasets():
    assert {"digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder"} <= set(list_datasets())
    assert list_datasets() == sorted(list_datasets())


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError) as e:
        load_dataset("mnist-nope")
    for name in ("digits", "fashion-mnist", "cifar10"):
        assert name in str(e.value)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
def test_read_idx_roundtrip(tmp_path, compress, dtype):
    offset = 0 if dtype == np.uint8 else 100  # signed types get negative values too
    arr = (np.arange(30) * 37 % 251 - offset).astype(dtype).reshape(2, 3, 5)
    path = write_idx(tmp_path / "a-idx3-ubyte", arr, compress)
    out = read_idx(path)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_read_idx_bad_magic_names_file(tmp_path):
    path = tmp_path / "junk-idx1-ubyte"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="junk-idx1-ubyte.*magic"):
        read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_truncated_names_file(tmp_path, compress):
    arr = np.zeros((4, 28, 28), np.uint8)
    path = write_idx(tmp_path / "trunc-idx3-ubyte", arr, compress)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 50])
    with pytest.raises(ValueError, match="trunc-idx3-ubyte"):
        read_idx(path)


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_from_data_dir(tmp_path, no_system_data, compress):
    arrays = make_fashion_dir(tmp_path / "fm", compress)
    b = load_dataset("fashion-mnist", data_dir=str(tmp_path / "fm"))
    assert b.train.images.shape == (12, 1, 28, 28) and b.train.images.dtype == torch.uint8
    assert b.test.images.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(b.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(b.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert b.train.labels.dtype == torch.int64
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 1, 28)
    assert len(b.classes) == 10 and len(b.mean) == len(b.std) == 1


def test_fashion_mnist_env_var_and_subfolder(tmp_path, monkeypatch, no_system_data):
    make_fashion_dir(tmp_path / "data" / "fashion-mnist", compress=True)
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "data"))
    assert len(load_dataset("fashion-mnist").train) == 12


def test_fashion_mnist_resize(tmp_path, no_system_data):
    make_fashion_dir(tmp_path, compress=False)
    b = load_dataset("fashion-mnist", data_dir=str(tmp_path), image_size=32)
    assert b.train.images.shape == (12, 1, 32, 32) and b.image_size == 32


def test_fashion_mnist_missing_lists_places_and_install_hint(tmp_path, monkeypatch, no_system_data):
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "envdir"))
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    assert isinstance(e.value, DatasetNotFoundError)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    for place in (tmp_path / "envdir", tmp_path / "no-system-copy"):
        assert str(place) in msg
    assert "DISTILLKIT_DATA" in msg and "data_dir" in msg


def test_explicit_data_dir_never_falls_back_to_another_copy(tmp_path, monkeypatch):
    make_fashion_dir(tmp_path / "envcopy", compress=False)
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "envcopy"))
    assert len(load_dataset("fashion-mnist").train) == 12  # the env copy is found without data_dir
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value)
    assert str(tmp_path / "envcopy") not in str(e.value)


def test_fashion_mnist_corrupt_file_named(tmp_path, no_system_data):
    make_fashion_dir(tmp_path, compress=False)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x01\x02")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_fashion_mnist_count_mismatch(tmp_path, no_system_data):
    make_fashion_dir(tmp_path, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), compress=False)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_system_fashion_mnist(monkeypatch):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    b = load_dataset("fashion-mnist")
    assert b.train.images.shape == (60000, 1, 28, 28)
    assert b.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(b.train.labels).tolist() == [6000] * 10
    assert torch.bincount(b.test.labels).tolist() == [1000] * 10


# --------------------------------------------------------------------------- CIFAR


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    root.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = _cifar_rows(per_batch, i)
        y = [(i + j) % 10 for j in range(per_batch)]
        _dump(root / f"data_batch_{i}", {b"batch_label": b"x", b"data": x, b"labels": y})
        xs.append(x)
        ys.extend(y)
    xt = _cifar_rows(4, 99)
    _dump(root / "test_batch", {b"data": xt, b"labels": [0, 1, 2, 3]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(root / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(xs), np.array(ys), xt


@pytest.mark.parametrize("point_at_parent", [False, True])
def test_cifar10_pickles(tmp_path, monkeypatch, point_at_parent):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    folder = tmp_path / "cifar-10-batches-py"
    x, y, xt = make_cifar10(folder)
    b = load_dataset("cifar10", data_dir=str(tmp_path if point_at_parent else folder))
    assert b.train.images.shape == (15, 3, 32, 32) and b.test.images.shape == (4, 3, 32, 32)
    # Rows are channel-major (1024 R, then G, then B), each 32x32 row-major.
    np.testing.assert_array_equal(b.train.images.numpy(), x.reshape(-1, 3, 32, 32))
    assert b.train.images[2, 1, 0, 5].item() == x[2, 1024 + 5]
    assert b.train.images[2, 2, 3, 4].item() == x[2, 2048 + 3 * 32 + 4]
    np.testing.assert_array_equal(b.train.labels.numpy(), y)
    np.testing.assert_array_equal(b.test.images.numpy(), xt.reshape(-1, 3, 32, 32))
    assert b.classes[0] == "airplane" and b.num_classes == 10 and b.in_channels == 3


def test_cifar100_pickles(tmp_path, monkeypatch):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    x, xt = _cifar_rows(6, 1), _cifar_rows(2, 2)
    fine = [0, 5, 99, 42, 7, 1]
    _dump(root / "train", {b"data": x, b"fine_labels": fine, b"coarse_labels": [0] * 6})
    _dump(root / "test", {b"data": xt, b"fine_labels": [3, 4], b"coarse_labels": [0, 0]})
    names = [f"class{i:02d}".encode() for i in range(100)]
    _dump(root / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    b = load_dataset("cifar100", data_dir=str(tmp_path))
    np.testing.assert_array_equal(b.train.images.numpy(), x.reshape(-1, 3, 32, 32))
    assert b.train.labels.tolist() == fine and b.test.labels.tolist() == [3, 4]
    assert b.num_classes == 100 and b.classes[99] == "class99"


def test_cifar_missing_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and "cifar-10-python.tar.gz" in msg and "data_batch_1" in msg


def test_cifar_rejects_code_in_pickle(tmp_path, monkeypatch):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder)
    _dump(folder / "test_batch", {b"data": _cifar_rows(1, 0), b"labels": [os.getcwd]})
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", data_dir=str(folder))


# --------------------------------------------------------------------------- image folder


def _png(path: Path, color, size=(20, 10), mode="RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_imagefolder_rgb(tmp_path):
    _png(tmp_path / "train" / "zebra" / "a.png", (255, 0, 0))
    _png(tmp_path / "train" / "apple" / "b.png", (0, 255, 0))
    _png(tmp_path / "train" / "apple" / "c.png", (0, 0, 255), size=(7, 30))
    _png(tmp_path / "val" / "zebra" / "d.png", 128, mode="L")
    b = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=16)
    assert b.classes == ["apple", "zebra"]
    assert b.train.images.shape == (3, 3, 16, 16) and b.test.images.shape == (1, 3, 16, 16)
    assert b.train.labels.tolist() == [0, 0, 1]
    assert b.train.images[0, :, 8, 8].tolist() == [0, 255, 0]
    assert b.train.images[2, :, 8, 8].tolist() == [255, 0, 0]
    assert b.test.images[0, :, 8, 8].tolist() == [128, 128, 128]
    assert b.image_size == 16 and b.in_channels == 3 and len(b.mean) == 3


def test_imagefolder_grayscale_default_size(tmp_path):
    # without image_size the images keep their own (common, square) size
    _png(tmp_path / "train" / "b" / "x.png", 10, size=(12, 12), mode="L")
    _png(tmp_path / "train" / "a" / "y.png", 200, size=(12, 12), mode="L")
    _png(tmp_path / "test" / "a" / "z.png", 50, size=(12, 12), mode="L")
    b = load_dataset("imagefolder", data_dir=str(tmp_path))
    assert b.train.images.shape == (2, 1, 12, 12) and b.in_channels == 1 and b.image_size == 12
    assert b.train.labels.tolist() == [0, 1] and b.test.labels.tolist() == [0]
    mean, std = channel_stats(b.train.images)
    assert b.mean == pytest.approx(mean) and mean[0] == pytest.approx(105 / 255, abs=1e-4)


def test_imagefolder_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_dataset("imagefolder", data_dir=str(tmp_path))


# --------------------------------------------------------------------------- digits


def test_digits_fixed_stratified_split():
    a = load_dataset("digits")
    b = load_dataset("digits")
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 450
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    assert int(a.train.images.max()) == 255
    assert a.hflip is False
    tr = torch.bincount(a.train.labels, minlength=10).double() / len(a.train)
    te = torch.bincount(a.test.labels, minlength=10).double() / len(a.test)
    assert (tr - te).abs().max() < 0.01
    from sklearn.datasets import load_digits

    raw = load_digits()
    # Each split image is the sklearn image rescaled from 0..16 to 0..255.
    first = np.rint(raw.images * 255 / 16).astype(np.uint8)
    matches = (first == a.test.images[0, 0].numpy()).all(axis=(1, 2))
    assert matches.any() and raw.target[matches.argmax()] == a.test.labels[0].item()
    assert a.mean == pytest.approx(channel_stats(a.train.images)[0])
