"""The `imagefolder` dataset: one folder of images per class under train/ and test/ (or val/).

Without a test/ or val/ folder a stratified, seeded validation split is carved from train/ and
recorded in ``bundle.info["split"]``. Images keep their own size unless ``image_size`` is given;
images of different sizes, or non-square ones, need an explicit ``image_size`` (each image is
then scaled on its short side and centre-cropped, so its aspect ratio is kept).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import DataBundle, DatasetNotFoundError, Split, _tensor_bundle, register_dataset

__all__ = ["IMAGE_EXTENSIONS", "carve_validation"]

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _list_class_images(split_dir: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        out[class_dir.name] = files
    return out


def carve_validation(
    files: dict[str, list[Path]], classes: list[str], seed: int, val_fraction: float
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Split each class's files into (train, validation), stratified and seeded.

    A class of n >= 2 images gives round(n * val_fraction) (half up) to validation, at least
    one and at most n - 1; a class of one image stays in train.
    """
    rng = np.random.default_rng(seed)
    train: dict[str, list[Path]] = {}
    val: dict[str, list[Path]] = {}
    for c in classes:
        paths = files.get(c, [])
        n = len(paths)
        k = min(max(math.floor(n * val_fraction + 0.5), 1), n - 1) if n >= 2 else 0
        held = set(rng.permutation(n)[:k].tolist())
        val[c] = [p for i, p in enumerate(paths) if i in held]
        train[c] = [p for i, p in enumerate(paths) if i not in held]
    return train, val


def _scan(paths: list[Path]) -> tuple[set[str], dict[tuple[int, int], Path]]:
    """Image modes seen, and the first file of each (width, height) seen."""
    from PIL import Image

    modes: set[str] = set()
    sizes: dict[tuple[int, int], Path] = {}
    for p in paths:
        try:
            with Image.open(p) as img:
                modes.add(img.mode)
                sizes.setdefault(tuple(img.size), p)
        except OSError as e:
            raise ValueError(f"{p}: cannot read image ({e})") from e
    return modes, sizes


def _native_size(sizes: dict[tuple[int, int], Path]) -> int:
    """The common square size of all images; ValueError naming files when there is none."""
    found = list(sizes.items())
    if len(found) > 1:
        (w1, h1), p1 = found[0]
        (w2, h2), p2 = found[1]
        raise ValueError(
            f"imagefolder: images differ in size: {p1} is {w1}x{h1}, {p2} is {w2}x{h2}; "
            "set image_size=N to scale and centre-crop them all to NxN"
        )
    (w, h), p = found[0]
    if w != h:
        raise ValueError(
            f"imagefolder: images are {w}x{h}, not square (e.g. {p}); "
            "set image_size=N to scale and centre-crop them to NxN"
        )
    return w


def _read_image(path: Path, mode: str, size: int) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if img.size != (size, size):
                # Scale the short side to `size` and centre-crop, so aspect ratio is preserved.
                img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@register_dataset("imagefolder")
def _load_imagefolder(
    data_dir: str | None = None,
    image_size: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> DataBundle:
    """One sub-folder per class under `data_dir/train` and `data_dir/test` (or `val`)."""
    if not data_dir:
        raise DatasetNotFoundError(
            "imagefolder needs data_dir=DIR: a folder with train/ and "
            "test/ (or val/) sub-folders, each holding one folder of images per class"
        )
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"imagefolder: val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(data_dir).expanduser()
    train_dir = root / "train"
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train_dir.is_dir():
        raise DatasetNotFoundError(
            f"imagefolder: {train_dir} not found; expected one folder of images per class in "
            f"{train_dir} and optionally in {root / 'test'} (or {root / 'val'})"
        )
    train_files = _list_class_images(train_dir)
    classes = sorted(c for c, files in train_files.items() if files)
    if not classes:
        raise DatasetNotFoundError(
            f"imagefolder: no images with {IMAGE_EXTENSIONS} under {train_dir}"
        )
    info: dict[str, Any] = {"source": str(root.absolute())}
    if test_dir is not None:
        test_files = _list_class_images(test_dir)
        unknown = sorted(c for c, files in test_files.items() if files and c not in classes)
        if unknown:
            raise ValueError(
                f"imagefolder: classes {unknown} in {test_dir} do not occur in {train_dir}"
            )
    else:
        train_files, test_files = carve_validation(train_files, classes, seed, val_fraction)
        held = [p for c in classes for p in test_files[c]]
        if not held:
            raise ValueError(
                f"imagefolder: no {root / 'test'} or {root / 'val'} folder, and no class under "
                f"{train_dir} has two images to carve a validation split from"
            )
        info["split"] = {
            "test": "validation split carved from train/ (no test/ or val/ folder)",
            "seed": int(seed),
            "val_fraction": float(val_fraction),
            "val_files": [p.relative_to(root).as_posix() for p in held],
        }
    index = {c: i for i, c in enumerate(classes)}
    items = {
        name: [(p, index[c]) for c in classes for p in files.get(c, [])]
        for name, files in (("train", train_files), ("test", test_files))
    }
    modes, sizes = _scan([p for p, _ in items["train"] + items["test"]])
    size = _native_size(sizes) if image_size is None else image_size
    mode = "L" if modes <= _GRAY_MODES else "RGB"
    channels = 1 if mode == "L" else 3

    def read(pairs: list[tuple[Path, int]]) -> Split:
        images = np.zeros((len(pairs), channels, size, size), dtype=np.uint8)
        for i, (p, _) in enumerate(pairs):
            images[i] = _read_image(p, mode, size)
        labels = np.array([y for _, y in pairs], dtype=np.int64)
        return Split(torch.from_numpy(images), torch.from_numpy(labels))

    return _tensor_bundle(
        "imagefolder", read(items["train"]), read(items["test"]), classes, None, info=info
    )
