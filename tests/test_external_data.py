"""Data from outside the registry: .npz arrays, dataset factories, image folders without test/."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from distillkit.data import list_datasets, load_dataset

RNG = np.random.default_rng(7)
# NCHW uint8 reference images; H, W = 4 so the channel axis (3) is unambiguous
X_TRAIN = RNG.integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
X_TEST = RNG.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
Y_TRAIN = np.array([0, 1, 2, 0, 1, 2])
Y_TEST = np.array([3, 0])  # the largest label only occurs in test


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _layouts():
    nhwc = (X_TRAIN.transpose(0, 2, 3, 1), X_TEST.transpose(0, 2, 3, 1))
    nchw = (X_TRAIN, X_TEST)
    return {
        "uint8-nchw": nchw,
        "uint8-nhwc": nhwc,
        "float-nchw": tuple(a.astype(np.float32) / 255.0 for a in nchw),
        "float-nhwc": tuple(a.astype(np.float64) / 255.0 for a in nhwc),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_npz_layouts_and_dtypes_give_same_uint8(tmp_path, layout):
    x_train, x_test = _layouts()[layout]
    f = _npz(tmp_path / "d.npz", x_train=x_train, y_train=Y_TRAIN, x_test=x_test, y_test=Y_TEST)
    b = load_dataset("npz", data_dir=f)
    assert b.train.images.dtype == torch.uint8
    assert np.array_equal(b.train.images.numpy(), X_TRAIN)
    assert np.array_equal(b.test.images.numpy(), X_TEST)
    assert b.train.labels.tolist() == Y_TRAIN.tolist() and b.test.labels.tolist() == [3, 0]
    assert b.num_classes == 4 and b.in_channels == 3 and b.image_size == 4
    assert b.classes == ["0", "1", "2", "3"]
    mean = X_TRAIN.astype(np.float64).mean(axis=(0, 2, 3)) / 255.0
    assert b.mean == pytest.approx(tuple(mean), abs=1e-6)


def test_npz_grayscale_hw_and_class_names(tmp_path):
    gray = X_TRAIN[:, 0]  # (N, H, W)
    f = _npz(
        tmp_path / "g.npz",
        x_train=gray,
        y_train=Y_TRAIN,
        x_test=X_TEST[:, 0],
        y_test=Y_TEST,
        classes=np.array(["a", "b", "c", "d", "e"]),
    )
    b = load_dataset("npz", data_dir=f, image_size=8)
    assert b.in_channels == 1 and b.train.images.shape == (6, 1, 8, 8)
    assert b.classes == ["a", "b", "c", "d", "e"] and b.num_classes == 5


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"x_train": X_TRAIN.astype(np.float32) / 127.5 - 1.0}, "x_train"),
        ({"x_test": X_TEST.astype(np.float32) * 2.0}, "x_test"),
        ({"y_train": Y_TRAIN - 1}, "y_train"),
        ({"y_test": np.array([0, 1, 2])}, "y_test"),
        ({"x_train": RNG.integers(0, 256, (6, 3, 4, 3), dtype=np.uint8)}, "NCHW"),
        ({"x_test": RNG.integers(0, 256, (2, 3, 5, 5), dtype=np.uint8)}, "x_test"),
        ({"y_train": Y_TRAIN.astype(np.float32) + 0.5}, "y_train"),
    ],
)
def test_npz_bad_arrays_are_named(tmp_path, change, needle):
    arrays = {"x_train": X_TRAIN, "y_train": Y_TRAIN, "x_test": X_TEST, "y_test": Y_TEST}
    arrays.update(change)
    f = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError) as err:
        load_dataset("npz", data_dir=f)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_npz_float_range_reported(tmp_path):
    f = _npz(
        tmp_path / "n.npz",
        x_train=np.full((6, 1, 4, 4), -0.5, dtype=np.float32),
        y_train=Y_TRAIN,
        x_test=np.zeros((2, 1, 4, 4), dtype=np.float32),
        y_test=Y_TEST,
    )
    with pytest.raises(ValueError, match=r"x_train.*-0\.5"):
        load_dataset("npz", data_dir=f)


def test_npz_missing_array_and_wrong_file(tmp_path):
    f = _npz(tmp_path / "m.npz", x_train=X_TRAIN, y_train=Y_TRAIN, x_test=X_TEST)
    with pytest.raises(ValueError, match="y_test"):
        load_dataset("npz", data_dir=f)
    npy = tmp_path / "x.npy"
    np.save(npy, X_TRAIN)
    with pytest.raises(ValueError, match=r"\.npz"):
        load_dataset("npz", data_dir=str(npy))
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_dataset("npz", data_dir=str(tmp_path / "nothere.npz"))
    with pytest.raises(FileNotFoundError, match="data_dir="):
        load_dataset("npz")


# --------------------------------------------------------------------------- factories

FACTORY_FILE = textwrap.dedent(
    """
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset


    def arrays(data_dir, image_size=None):
        rng = np.random.default_rng(1)
        return {
            "x_train": rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8),
            "y_train": np.array([0, 1, 0, 1, 0]),
            "x_test": rng.integers(0, 256, (3, 4, 4, 1), dtype=np.uint8),
            "y_test": np.array([1, 1, 0]),
            "classes": [str(data_dir), "other"],
        }


    def datasets():
        g = torch.Generator().manual_seed(2)
        train = TensorDataset(torch.rand(4, 3, 6, 6, generator=g), torch.tensor([0, 1, 2, 1]))
        test = TensorDataset(torch.rand(2, 3, 6, 6, generator=g), torch.tensor([2, 0]))
        return train, test


    def wrong():
        return [1, 2, 3]
    """
)


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "mydata.py"
    path.write_text(FACTORY_FILE)
    return path


def test_factory_returning_dict(factory_file):
    b = load_dataset(f"{factory_file}:arrays", data_dir="somewhere")
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    assert np.array_equal(b.train.images.numpy(), x_train.transpose(0, 3, 1, 2))
    assert b.classes == ["somewhere", "other"] and b.num_classes == 2 and b.in_channels == 1
    assert b.test.labels.tolist() == [1, 1, 0]
    assert b.name == f"{factory_file}:arrays"
    assert not any(":" in n for n in list_datasets()) and "npz" in list_datasets()


def test_factory_returning_torch_datasets(factory_file, monkeypatch):
    monkeypatch.chdir(factory_file.parent)
    b = load_dataset("mydata.py:datasets")
    g = torch.Generator().manual_seed(2)
    x_train = torch.rand(4, 3, 6, 6, generator=g)
    x_test = torch.rand(2, 3, 6, 6, generator=g)
    assert torch.equal(b.train.images, (x_train * 255).round().to(torch.uint8))
    assert torch.equal(b.test.images, (x_test * 255).round().to(torch.uint8))
    assert b.train.labels.tolist() == [0, 1, 2, 1] and b.num_classes == 3
    assert b.image_size == 6 and b.name == f"{factory_file}:datasets"


def test_factory_by_module_path(factory_file, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    try:
        b = load_dataset("mydata:datasets", image_size=3)
        assert b.train.images.shape == (4, 3, 3, 3) and b.name == "mydata:datasets"
    finally:
        sys.modules.pop("mydata", None)


def test_factory_wrong_return_type(factory_file):
    with pytest.raises(ValueError, match=r"wrong.*list.*x_train") as err:
        load_dataset(f"{factory_file}:wrong")
    assert "\n" not in str(err.value)


def test_canonical_dataset_spec(factory_file):
    from distillkit.data import canonical_dataset_spec

    assert canonical_dataset_spec("cifar10") == "cifar10"
    assert canonical_dataset_spec("pkg.data:make") == "pkg.data:make"
    got = canonical_dataset_spec("mydata.py:arrays", base_dir=factory_file.parent)
    assert got == f"{factory_file}:arrays"


# --------------------------------------------------------------------------- image folder


def _png(path: Path, value: int, size=(4, 4)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def _folder(root: Path, counts: dict[str, int]) -> dict[str, int]:
    """One PNG per image with a unique grey value; returns {relative path: value}."""
    values = {}
    v = 0
    for cls, n in counts.items():
        for i in range(n):
            rel = f"train/{cls}/{i:02d}.png"
            _png(root / rel, v)
            values[rel] = v
            v += 1
    return values


def test_imagefolder_carves_stratified_validation(tmp_path):
    values = _folder(tmp_path, {"a": 10, "b": 5, "c": 1, "d": 2})
    b = load_dataset("imagefolder", data_dir=str(tmp_path), val_fraction=0.3, seed=3)
    # per class: round(n * 0.3) held out, at least 1 when n >= 2, never the last image
    assert torch.bincount(b.test.labels, minlength=4).tolist() == [3, 2, 0, 1]
    assert torch.bincount(b.train.labels, minlength=4).tolist() == [7, 3, 1, 1]
    split = b.info["split"]
    held = split["val_files"]
    assert len(held) == 6 and split["seed"] == 3 and split["val_fraction"] == 0.3
    # the held-out images are exactly the listed files
    assert sorted(b.test.images[:, 0, 0, 0].tolist()) == sorted(values[f] for f in held)
    train_values = set(b.train.images[:, 0, 0, 0].tolist())
    assert train_values == set(values.values()) - {values[f] for f in held}
    again = load_dataset("imagefolder", data_dir=str(tmp_path), val_fraction=0.3, seed=3)
    assert again.info["split"]["val_files"] == held
    assert torch.equal(again.test.images, b.test.images)
    assert b.image_size == 4


def test_imagefolder_default_fraction(tmp_path):
    _folder(tmp_path, {"a": 10, "b": 5, "c": 1, "d": 2})
    b = load_dataset("imagefolder", data_dir=str(tmp_path))
    assert torch.bincount(b.test.labels, minlength=4).tolist() == [1, 1, 0, 1]
    assert b.info["split"]["seed"] == 0 and "validation" in b.info["split"]["test"]


def test_imagefolder_with_test_dir_has_no_carve(tmp_path):
    _folder(tmp_path, {"a": 2, "b": 2})
    _png(tmp_path / "test" / "a" / "x.png", 9)
    b = load_dataset("imagefolder", data_dir=str(tmp_path))
    assert len(b.train) == 4 and len(b.test) == 1 and "split" not in b.info


def test_imagefolder_mixed_sizes_error(tmp_path):
    _png(tmp_path / "train" / "a" / "small.png", 1, size=(4, 4))
    _png(tmp_path / "train" / "b" / "big.png", 2, size=(6, 6))
    _png(tmp_path / "test" / "a" / "t.png", 3, size=(4, 4))
    with pytest.raises(ValueError) as err:
        load_dataset("imagefolder", data_dir=str(tmp_path))
    msg = str(err.value)
    assert "small.png" in msg and "big.png" in msg and "4x4" in msg and "6x6" in msg
    assert "image_size" in msg
    b = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=5)
    assert b.train.images.shape == (2, 1, 5, 5)


def test_imagefolder_non_square_needs_image_size(tmp_path):
    _png(tmp_path / "train" / "a" / "wide.png", 1, size=(8, 4))
    _png(tmp_path / "test" / "a" / "t.png", 3, size=(8, 4))
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagefolder", data_dir=str(tmp_path))
    assert load_dataset("imagefolder", data_dir=str(tmp_path), image_size=4).image_size == 4


def test_options_a_loader_does_not_take_are_refused():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=0.2)
