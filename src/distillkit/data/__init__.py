"""In-memory datasets, batched transforms and a deterministic sharded batch loader."""

# imagefolder and external register their datasets on import, completing the registry.
from . import imagefolder  # noqa: F401
from .datasets import (
    DataBundle,
    DatasetNotFoundError,
    Split,
    channel_stats,
    list_datasets,
    load_dataset,
    read_idx,
    register_dataset,
)
from .external import arrays_to_bundle, canonical_dataset_spec
from .loader import BatchLoader, derive_seed, make_loaders
from .transforms import normalize, random_crop_flip, to_float

__all__ = [
    "BatchLoader",
    "DataBundle",
    "DatasetNotFoundError",
    "Split",
    "arrays_to_bundle",
    "canonical_dataset_spec",
    "channel_stats",
    "derive_seed",
    "list_datasets",
    "load_dataset",
    "make_loaders",
    "normalize",
    "random_crop_flip",
    "read_idx",
    "register_dataset",
    "to_float",
]
