"""Datasets from the user's own files: `npz` arrays and `file.py:factory` / `module:factory`.

Both end in the same in-memory bundle as the built-in datasets: uint8 images (N, C, H, W),
int64 labels 0..K-1 and per-channel statistics of the training split.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import DataBundle, DatasetNotFoundError, Split, _tensor_bundle, register_dataset

__all__ = ["ARRAY_KEYS", "arrays_to_bundle", "canonical_dataset_spec", "load_factory_dataset"]

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
_LAYOUTS = ("NCHW", "NHWC")


def canonical_dataset_spec(spec: str, base_dir: Path | None = None) -> str:
    """A dataset spec that works from any cwd: names unchanged, a factory file path made absolute."""
    if ":" not in spec:
        return spec
    from distillkit.models.external import canonical_import_spec

    return canonical_import_spec(spec, base_dir)


def _range(a: np.ndarray) -> str:
    return f"[{a.min():g}, {a.max():g}]"


def _images(value: Any, key: str, source: str, layout: str | None) -> np.ndarray:
    """`value` as uint8 (N, C, H, W), checking shape, layout and value range."""
    a = np.asarray(value)
    if a.ndim == 3:
        a = a[:, None]  # (N, H, W): one channel
    elif a.ndim == 4 and layout is None:
        first, last = a.shape[1] in (1, 3), a.shape[3] in (1, 3)
        if first and last:
            raise ValueError(
                f"{source}: {key} shape {a.shape} is ambiguous (channels on axis 1 or 3?); "
                "store the images as NCHW and add layout='NCHW'"
            )
        if not first and not last:
            raise ValueError(
                f"{source}: {key} shape {a.shape} has no 1- or 3-channel axis; expected "
                "(N, C, H, W) or (N, H, W, C) with C = 1 or 3, or (N, H, W)"
            )
        layout = "NCHW" if first else "NHWC"
    elif a.ndim != 4:
        raise ValueError(
            f"{source}: {key} must be (N, C, H, W), (N, H, W, C) or (N, H, W); got shape {a.shape}"
        )
    if a.ndim == 4 and layout == "NHWC":
        a = a.transpose(0, 3, 1, 2)
    if len(a) == 0:
        raise ValueError(f"{source}: {key} holds no images")
    if a.dtype == np.bool_ or not (
        np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
    ):
        raise ValueError(f"{source}: {key} must be uint8 (0..255) or float (0..1), got {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{source}: {key} contains NaN or infinite values")
        if a.min() < 0.0 or a.max() > 1.0:
            raise ValueError(
                f"{source}: {key} is float with values in {_range(a)}; float images must be in "
                "[0, 1] (unnormalised), or store uint8 0..255"
            )
        a = np.rint(a * 255.0)
    elif a.min() < 0 or a.max() > 255:
        raise ValueError(f"{source}: {key} has integer values in {_range(a)}; expected 0..255")
    h, w = a.shape[-2:]
    if h != w:
        raise ValueError(
            f"{source}: {key} images are {h}x{w} (HxW), not square; crop or pad them to square"
        )
    return np.ascontiguousarray(a.astype(np.uint8))


def _labels(value: Any, key: str, source: str, n: int, images_key: str) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{source}: {key} must be 1-D (N,), got shape {a.shape}")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{source}: {key} must hold integer class indices, got {a.dtype}")
    if len(a) != n:
        raise ValueError(f"{source}: {key} has {len(a)} labels but {images_key} has {n} images")
    if n and a.min() < 0:
        raise ValueError(f"{source}: {key} has label {int(a.min())}; labels must be 0..K-1")
    return a.astype(np.int64)


def arrays_to_bundle(
    name: str,
    arrays: Mapping[str, Any],
    image_size: int | None,
    source: str,
    layout: str | None = None,
    info: dict[str, Any] | None = None,
) -> DataBundle:
    """A DataBundle from x_train, y_train, x_test, y_test (+ optional classes, hflip, layout)."""
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"{source}: missing {', '.join(missing)} (found: {', '.join(sorted(arrays)) or 'none'}); "
            f"needs {', '.join(ARRAY_KEYS)}"
        )
    if layout is None and "layout" in arrays:
        layout = str(np.asarray(arrays["layout"]).item()).upper()
        if layout not in _LAYOUTS:
            raise ValueError(f"{source}: layout must be 'NCHW' or 'NHWC', got {layout!r}")
    x_train = _images(arrays["x_train"], "x_train", source, layout)
    x_test = _images(arrays["x_test"], "x_test", source, layout)
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(
            f"{source}: x_test images are (C, H, W) = {x_test.shape[1:]} but x_train images are "
            f"{x_train.shape[1:]}"
        )
    y_train = _labels(arrays["y_train"], "y_train", source, len(x_train), "x_train")
    y_test = _labels(arrays["y_test"], "y_test", source, len(x_test), "x_test")
    top = int(max(y_train.max(), y_test.max()))
    if arrays.get("classes") is not None:
        classes = [str(c) for c in np.asarray(arrays["classes"]).reshape(-1).tolist()]
        if len(classes) <= top:
            raise ValueError(
                f"{source}: classes names {len(classes)} classes but the labels go up to {top}"
            )
    else:
        classes = [str(i) for i in range(top + 1)]
    hflip = bool(np.asarray(arrays["hflip"]).item()) if "hflip" in arrays else True
    train = Split(torch.from_numpy(x_train), torch.from_numpy(y_train))
    test = Split(torch.from_numpy(x_test), torch.from_numpy(y_test))
    return _tensor_bundle(name, train, test, classes, image_size, hflip=hflip, info=info)


@register_dataset("npz")
def _load_npz(data_dir: str | None = None, image_size: int | None = None) -> DataBundle:
    """Arrays x_train, y_train, x_test, y_test (+ optional classes) from data_dir=FILE.npz."""
    if not data_dir:
        raise DatasetNotFoundError(
            f"npz needs data_dir=FILE.npz: a NumPy .npz (np.savez) holding {', '.join(ARRAY_KEYS)}"
        )
    path = Path(data_dir).expanduser().absolute()
    if path.suffix.lower() != ".npz":
        raise ValueError(
            f"npz: data_dir must name a .npz file (np.savez with {', '.join(ARRAY_KEYS)}), "
            f"got {path}"
        )
    if not path.is_file():
        raise DatasetNotFoundError(f"npz: {path} not found (data_dir=FILE.npz)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable .npz file ({first})") from e
    return arrays_to_bundle("npz", arrays, image_size, str(path), info={"source": str(path)})


def _looks_like_dataset(obj: Any) -> bool:
    return isinstance(obj, torch.utils.data.Dataset) or (
        hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, str)
    )


def _label(y: Any, where: str) -> int:
    """An integer class index from an int, a NumPy integer or a one-element integer tensor."""
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not y.is_floating_point():
        y = y.item()
    elif isinstance(y, np.ndarray) and y.size == 1 and np.issubdtype(y.dtype, np.integer):
        y = y.item()
    if isinstance(y, np.integer):
        y = int(y)
    if not isinstance(y, int) or isinstance(y, bool):
        raise ValueError(f"{where}: label must be an int, got {y!r}")
    return y


def _materialise(ds: Any, which: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Stack a dataset of (image C x H x W or H x W, int label) into (N, C, H, W) and (N,)."""
    items: Iterable[Any]
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        items = (ds[i] for i in range(len(ds)))
    else:
        items = iter(ds)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(
                f"{source}: {which} item {i} is {type(item).__name__}; expected (image, label)"
            )
        x = item[0]
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if not isinstance(x, np.ndarray) or x.ndim not in (2, 3):
            raise ValueError(
                f"{source}: {which} item {i}: image must be a C x H x W (or H x W) tensor, got "
                f"{type(x).__name__} {getattr(x, 'shape', '')}"
            )
        x = x[None] if x.ndim == 2 else x
        if images and x.shape != images[0].shape:
            raise ValueError(
                f"{source}: {which} item {i} has shape {x.shape}, item 0 has {images[0].shape}"
            )
        images.append(x)
        labels.append(_label(item[1], f"{source}: {which} item {i}"))
    if not images:
        raise ValueError(f"{source}: the {which} dataset is empty")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_factory_dataset(
    spec: str, data_dir: str | None = None, image_size: int | None = None, **options: Any
) -> DataBundle:
    """Load the dataset a `file.py:factory` or `package.module:factory` returns."""
    from distillkit.models.external import call_accepting, resolve_import_spec

    name = canonical_dataset_spec(spec)
    what = f"dataset factory {spec!r}"
    fn = resolve_import_spec(spec, "dataset")
    if not callable(fn):
        raise ValueError(f"{what} is a {type(fn).__name__}, not a function")
    offered = {"data_dir": data_dir, "image_size": image_size}
    out = call_accepting(fn, offered, options, what, "dataset_kwargs")
    info = {"source": name}
    if isinstance(out, Mapping):
        return arrays_to_bundle(name, out, image_size, what, info=info)
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(map(_looks_like_dataset, out)):
        x_train, y_train = _materialise(out[0], "train", what)
        x_test, y_test = _materialise(out[1], "test", what)
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        return arrays_to_bundle(name, arrays, image_size, what, layout="NCHW", info=info)
    raise ValueError(
        f"{what} returned {type(out).__name__}; expected a dict with {', '.join(ARRAY_KEYS)} "
        "(and optional classes) or a (train, test) pair of torch Datasets"
    )
