"""`distillkit datasets`: the dataset registry and where each dataset's files come from."""

from __future__ import annotations

import argparse

NOTES = {
    "digits": "scikit-learn's 8x8 digits, bundled (default)",
    "fashion-mnist": "IDX files: data_dir=DIR, $DISTILLKIT_DATA or apt-get install dataset-fashion-mnist",
    "cifar10": "python-pickle batches (cifar-10-batches-py) from data_dir",
    "cifar100": "python-pickle files (cifar-100-python) from data_dir",
    "imagefolder": "data_dir/train/<class>/*.png|jpg (+ test/ or val/, else a validation split "
    "is carved: dataset_kwargs.val_fraction, dataset_kwargs.seed)",
    "npz": "arrays x_train, y_train, x_test, y_test in data_dir=FILE.npz",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `datasets` subcommand."""
    p = subparsers.add_parser("datasets", help="list the datasets")
    p.set_defaults(func=cmd_datasets)


def cmd_datasets(args: argparse.Namespace) -> int:
    """datasets: one line per registered dataset."""
    from distillkit.data.datasets import list_datasets

    for name in list_datasets():
        print(f"{name:<14} {NOTES.get(name, '')}")
    print("also: dataset=path/to/file.py:factory or package.module:factory (see README)")
    return 0
