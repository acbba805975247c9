"""In-memory image datasets: a small registry of loaders that return uint8 tensors."""

from __future__ import annotations

import gzip
import inspect
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DataBundle",
    "DatasetNotFoundError",
    "Split",
    "SYSTEM_FASHION_MNIST_DIR",
    "channel_stats",
    "list_datasets",
    "load_dataset",
    "read_idx",
    "register_dataset",
]

ENV_VAR = "DISTILLKIT_DATA"
# Where the Debian package `dataset-fashion-mnist` puts the four gzipped IDX files.
SYSTEM_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Published per-channel statistics of the train splits, in [0, 1] units.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files were not found in any of the places searched."""


@dataclass
class Split:
    """One split of a dataset held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise ValueError(
                f"labels must be 1-D with {len(self.images)} entries, got {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.long()

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.images.shape[0])


@dataclass
class DataBundle:
    """A dataset's train/test splits plus the metadata models and loaders need."""

    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    # Mirroring changes the meaning of some images (digits), so augmentation asks first.
    hflip: bool = field(default=True)
    # Where the data came from and how it was split, for the run directory to record
    # (e.g. info["split"] when the test split is a validation split carved from train/).
    info: dict[str, Any] = field(default_factory=dict)


# fn(data_dir, image_size, **options) -> DataBundle; options are loader-specific keywords
DatasetLoader = Callable[..., DataBundle]
_REGISTRY: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering a loader `fn(data_dir, image_size, **options)` under `name`."""

    def decorator(fn: DatasetLoader) -> DatasetLoader:
        key = name.lower()
        if ":" in key:
            # names with a colon are import paths (file.py:factory), never registry keys
            raise ValueError(f"dataset name {name!r} must not contain ':'")
        if key in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return decorator


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset`, sorted."""
    return sorted(_REGISTRY)


def load_dataset(
    name: str, data_dir: str | None = None, image_size: int | None = None, **options: Any
) -> DataBundle:
    """Load a registered dataset, or one a `file.py:factory` / `module:factory` makes, into memory."""
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if ":" in name:
        from .external import load_factory_dataset

        return load_factory_dataset(name, data_dir, image_size, **options)
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown dataset {name!r}; available: {', '.join(list_datasets())}, "
            "or path/to/file.py:factory or package.module:factory"
        )
    loader = _REGISTRY[key]
    _check_options(name, loader, options)
    return loader(data_dir, image_size, **options)


def _check_options(name: str, loader: DatasetLoader, options: dict[str, Any]) -> None:
    if not options:
        return
    found = list(inspect.signature(loader).parameters.values())[2:]  # after data_dir, image_size
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in found):
        return
    params = [p.name for p in found if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in options:
        if key not in params:
            raise ValueError(
                f"dataset {name!r} takes no option {key!r}; it accepts: "
                f"{', '.join(params) or 'no options'}"
            )


# --------------------------------------------------------------------------- helpers


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W), in [0, 1] units."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    # Chunked so a large dataset never needs a full float64 copy.
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255.0).transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / max(count, 1)
    var = (total_sq / max(count, 1) - mean * mean).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-6)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to (size, size) with antialiased bilinear filtering."""
    if images.shape[-2:] == (size, size):
        return images
    out = []
    for chunk in images.split(4096):
        y = torch.nn.functional.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def _tensor_bundle(
    name: str,
    train: Split,
    test: Split,
    classes: list[str],
    image_size: int | None,
    known_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    hflip: bool = True,
    info: dict[str, Any] | None = None,
) -> DataBundle:
    """A DataBundle of `train`/`test`, resized to `image_size` and with train statistics."""
    native = int(train.images.shape[-1])
    if image_size is not None and image_size != native:
        train = Split(_resize_images(train.images, image_size), train.labels)
        test = Split(_resize_images(test.images, image_size), test.labels)
        known_stats = None  # resampling shifts the statistics slightly; recompute
    mean, std = known_stats if known_stats is not None else channel_stats(train.images)
    return DataBundle(
        name=name,
        train=train,
        test=test,
        num_classes=len(classes),
        in_channels=int(train.images.shape[1]),
        image_size=int(train.images.shape[-1]),
        mean=tuple(mean),
        std=tuple(std),
        classes=list(classes),
        hflip=hflip,
        info=dict(info or {}),
    )


def _dedupe(paths: Iterable[Path]) -> list[Path]:
    seen: set[str] = set()
    out: list[Path] = []
    for p in paths:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _user_roots(data_dir: str | None) -> list[tuple[Path, str]]:
    roots: list[tuple[Path, str]] = []
    if data_dir:
        roots.append((Path(data_dir).expanduser(), "data_dir"))
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append((Path(env).expanduser(), f"${ENV_VAR}"))
    return roots


# --------------------------------------------------------------------------- digits


@register_dataset("digits")
def _load_digits(data_dir: str | None = None, image_size: int | None = None) -> DataBundle:
    """scikit-learn's bundled 8x8 digits with a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.25, random_state=0, stratify=y
    )
    train = Split(torch.from_numpy(images[idx_train]), torch.from_numpy(y[idx_train]))
    test = Split(torch.from_numpy(images[idx_test]), torch.from_numpy(y[idx_test]))
    return _tensor_bundle(
        "digits", train, test, [str(i) for i in range(10)], image_size, hflip=False
    )


# --------------------------------------------------------------------------- IDX / Fashion-MNIST

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or plain), validating its magic number and size."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (not an IDX file?)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header (need {header} bytes, file has {len(raw)})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {dims} ({expected} data bytes) but the file "
            f"holds {len(raw) - header} (truncated or corrupt)"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="))


_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Layouts other tools leave behind, searched under each user root.
_FMNIST_SUBDIRS = ("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST")


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        p = folder / name
        if p.is_file():
            return p
    return None


def _fashion_mnist_candidates(data_dir: str | None) -> list[Path]:
    dirs: list[Path] = []
    for root, _ in _user_roots(data_dir):
        dirs.extend(root / sub if sub else root for sub in _FMNIST_SUBDIRS)
        if data_dir:
            # an explicit data_dir is the user's choice: never silently read another copy
            return _dedupe(dirs)
    dirs.append(Path(SYSTEM_FASHION_MNIST_DIR))
    return _dedupe(dirs)


def find_fashion_mnist(data_dir: str | None = None) -> dict[str, Path]:
    """Locate the four Fashion-MNIST IDX files; raise DatasetNotFoundError listing every place."""
    looked: list[str] = []
    for folder in _fashion_mnist_candidates(data_dir):
        if not folder.is_dir():
            looked.append(f"  - {folder} (no such directory)")
            continue
        found = {k: _find_idx_file(folder, stem) for k, stem in _FMNIST_FILES.items()}
        missing = [_FMNIST_FILES[k] for k, p in found.items() if p is None]
        if not missing:
            return {k: p for k, p in found.items() if p is not None}
        looked.append(f"  - {folder} (missing {', '.join(m + '[.gz]' for m in missing)})")
    raise DatasetNotFoundError(
        "Fashion-MNIST not found. Looked for "
        + ", ".join(s + "[.gz]" for s in _FMNIST_FILES.values())
        + " in:\n"
        + "\n".join(looked)
        + f"\nTo install it system-wide run `{FASHION_MNIST_INSTALL_HINT}` "
        + f"(installs to {SYSTEM_FASHION_MNIST_DIR}), or set data_dir=DIR "
        + f"to a folder with the four IDX files, or set ${ENV_VAR}."
    )


def _check_idx(arr: np.ndarray, path: Path, ndim: int) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != ndim:
        raise ValueError(
            f"{path}: expected a {ndim}-D uint8 IDX array, got {arr.ndim}-D {arr.dtype}"
        )
    return arr


@register_dataset("fashion-mnist")
def _load_fashion_mnist(data_dir: str | None = None, image_size: int | None = None) -> DataBundle:
    """Fashion-MNIST from the standard IDX files."""
    files = find_fashion_mnist(data_dir)
    splits = {}
    for split in ("train", "test"):
        ip, lp = files[f"{split}_images"], files[f"{split}_labels"]
        images = _check_idx(read_idx(ip), ip, 3)
        labels = _check_idx(read_idx(lp), lp, 1)
        if len(images) != len(labels):
            raise ValueError(f"{ip} has {len(images)} images but {lp} has {len(labels)} labels")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{lp}: label {int(labels.max())} out of range 0..9")
        splits[split] = Split(
            torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        )
    return _tensor_bundle(
        "fashion-mnist",
        splits["train"],
        splits["test"],
        FASHION_MNIST_CLASSES,
        image_size,
        known_stats=(FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    )


# --------------------------------------------------------------------------- CIFAR

_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    # CIFAR batches are pickles; only numpy array reconstruction is allowed so that a
    # tampered file in a data folder cannot run arbitrary code.
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    # Real files have bytes keys; accept str keys from re-saved copies too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    if "data" not in batch:
        raise ValueError(f"{path}: missing key b'data'")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32)


def _cifar_labels(batch: dict, key: str, n: int, num_classes: int, path: Path) -> np.ndarray:
    if key not in batch:
        raise ValueError(f"{path}: missing key b'{key}'")
    labels = np.asarray(batch[key], dtype=np.int64).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"{path}: {n} images but {len(labels)} labels")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels outside 0..{num_classes - 1}")
    return labels


def _names(meta: dict, key: str, path: Path) -> list[str]:
    if key not in meta:
        raise ValueError(f"{path}: missing key b'{key}'")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[key]]


def _find_cifar(data_dir: str | None, folder: str, required: Sequence[str], url: str) -> Path:
    looked: list[str] = []
    candidates: list[Path] = []
    for root, _ in _user_roots(data_dir):
        candidates.extend([root, root / folder])
    for d in _dedupe(candidates):
        if not d.is_dir():
            looked.append(f"  - {d} (no such directory)")
            continue
        missing = [r for r in required if not (d / r).is_file()]
        if not missing:
            return d
        looked.append(f"  - {d} (missing {', '.join(missing)})")
    where = "\n".join(looked) if looked else f"  (nowhere: no data_dir given and ${ENV_VAR} unset)"
    raise DatasetNotFoundError(
        f"{folder} not found. Looked for {', '.join(required)} in:\n{where}\n"
        f"Download {url}, extract it, and set data_dir=DIR to the "
        f"extracted {folder} folder (or its parent), or set ${ENV_VAR}."
    )


@register_dataset("cifar10")
def _load_cifar10(data_dir: str | None = None, image_size: int | None = None) -> DataBundle:
    """CIFAR-10 from the python-pickle batches (cifar-10-batches-py)."""
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    root = _find_cifar(
        data_dir,
        "cifar-10-batches-py",
        [*train_files, "test_batch", "batches.meta"],
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    )
    classes = _names(_load_pickle(root / "batches.meta"), "label_names", root / "batches.meta")

    def read(files: list[str]) -> Split:
        xs, ys = [], []
        for name in files:
            path = root / name
            batch = _load_pickle(path)
            x = _cifar_images(batch, path)
            xs.append(x)
            ys.append(_cifar_labels(batch, "labels", len(x), len(classes), path))
        return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    return _tensor_bundle(
        "cifar10",
        read(train_files),
        read(["test_batch"]),
        classes,
        image_size,
        known_stats=(CIFAR10_MEAN, CIFAR10_STD),
    )


@register_dataset("cifar100")
def _load_cifar100(data_dir: str | None = None, image_size: int | None = None) -> DataBundle:
    """CIFAR-100 (fine labels) from the python-pickle files (cifar-100-python)."""
    root = _find_cifar(
        data_dir,
        "cifar-100-python",
        ["train", "test", "meta"],
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    )
    classes = _names(_load_pickle(root / "meta"), "fine_label_names", root / "meta")

    def read(name: str) -> Split:
        path = root / name
        batch = _load_pickle(path)
        x = _cifar_images(batch, path)
        y = _cifar_labels(batch, "fine_labels", len(x), len(classes), path)
        return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))

    return _tensor_bundle(
        "cifar100",
        read("train"),
        read("test"),
        classes,
        image_size,
        known_stats=(CIFAR100_MEAN, CIFAR100_STD),
    )
